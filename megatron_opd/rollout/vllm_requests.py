"""vLLM requests and results as plain data: what the vLLM engine sends and what it keeps.

Pure Python/tensor code (no vLLM import), so every rule below is tested on CPU:

- **One request per sample.** A prompt's ``n`` samples are ``n`` rows, each its own
  request with ``n=1`` and its own seed (:func:`request_seed` of the call's seed, the
  row and the response offset): the samples of a prompt differ, every TP rank of a vLLM
  instance draws the same tokens (vLLM's ``external_launcher`` requires identical
  inputs and sampling on all of them), and a resubmitted chunk continues with a fresh,
  reproducible stream. vLLM's prefix cache shares the prompt's KV blocks between rows.
- **Rows over pipeline stages.** With Megatron PP > 1 each stage's TP group hosts a
  whole vLLM instance; a call's rows are cut into contiguous blocks, one per stage
  (:func:`stage_rows`), and the stages' results are all-gathered.
- **Results.** :func:`unpack_completion` turns vLLM's ``CompletionOutput`` (token ids,
  per-token ``{id: Logprob}`` dicts holding the top ``k`` ids plus the sampled one,
  finish reason) into the sampled ids, their log-probs and the ``[len, k]`` top-k ids
  ranked by vLLM's ``Logprob.rank``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_opd.config.rollout import RolloutConfig

_SEED_MODULUS = 2**31 - 1


def request_seed(seed: int, row: int, start: int = 0) -> int:
    """A 31-bit sampling seed for ``row`` of a call with ``seed``, for the response tokens
    from offset ``start`` on (a splitmix64 mix: distinct rows get unrelated streams)."""
    value = int(seed) * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + start * 0x94D049BB133111EB
    value &= 2**64 - 1
    value ^= value >> 31
    value = (value * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    value ^= value >> 29
    return value % _SEED_MODULUS


def sampling_kwargs(
    config: RolloutConfig,
    *,
    max_tokens: int,
    seed: int,
    eos_token_ids: Sequence[int],
    num_logprobs: int = 0,
) -> dict:
    """Keyword arguments of one ``vllm.SamplingParams`` (one row, ``n=1``).

    Greedy (temperature 0) is vLLM's temperature 0. EOS ids become ``stop_token_ids``
    and stay in the output (the Megatron engine keeps them too); no detokenisation.
    ``logprobs``: vLLM returns the top ``num_logprobs`` ids of each position plus the
    sampled id (0: the sampled id only), as raw log-probs (``logprobs_mode``).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return dict(
        n=1,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=-1 if config.temperature > 0 else 1,
        max_tokens=int(max_tokens),
        seed=int(seed),
        stop_token_ids=sorted({int(i) for i in eos_token_ids}),
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        detokenize=False,
        logprobs=int(num_logprobs),
    )


def stage_rows(rows: Sequence[int], pp_rank: int, pp_size: int) -> list[int]:
    """The contiguous block of ``rows`` that pipeline stage ``pp_rank`` generates (the
    first ``len % pp_size`` stages take one row more)."""
    per_stage, extra = divmod(len(rows), pp_size)
    begin = pp_rank * per_stage + min(pp_rank, extra)
    end = begin + per_stage + (1 if pp_rank < extra else 0)
    return list(rows[begin:end])


@dataclass(kw_only=True)
class Completion:
    """One row's result of one vLLM request."""

    token_ids: list[int]
    """Sampled ids (an EOS id, when sampled, is the last one)."""

    log_probs: list[float]
    """Raw log-prob of each sampled id."""

    topk_ids: torch.Tensor
    """``[len(token_ids), k]`` int64: vLLM's top-k ids of each position, best first."""

    stopped: bool
    """vLLM ended the request before ``max_tokens`` (EOS, or the context limit)."""


def unpack_completion(output, num_logprobs: int, max_tokens: int) -> Completion:
    """A :class:`Completion` from a vLLM ``CompletionOutput``."""
    ids = [int(t) for t in output.token_ids]
    per_token = output.logprobs if output.logprobs is not None else [None] * len(ids)
    if len(per_token) != len(ids):
        raise ValueError(
            f"vLLM returned {len(per_token)} log-prob entries for {len(ids)} tokens; "
            "the engine must request logprobs for every generated token"
        )
    log_probs, topk = [], []
    for token, candidates in zip(ids, per_token):
        if candidates is None or token not in candidates:
            raise ValueError(
                "vLLM returned no log-prob for a sampled token; pass logprobs >= 0 in "
                "SamplingParams (the engine needs the behaviour policy's log-probs)"
            )
        log_probs.append(float(candidates[token].logprob))
        ranked = sorted(
            candidates.items(),
            key=lambda kv: (_rank(kv[1]), -kv[1].logprob, kv[0]),
        )
        best = [t for t, lp in ranked if _rank(lp) <= num_logprobs][:num_logprobs]
        if len(best) < num_logprobs:
            raise ValueError(
                f"vLLM returned {len(best)} top log-probs where {num_logprobs} were asked"
            )
        topk.append(best)
    topk_ids = torch.tensor(topk, dtype=torch.long).reshape(len(ids), num_logprobs)
    return Completion(
        token_ids=ids,
        log_probs=log_probs,
        topk_ids=topk_ids,
        stopped=len(ids) < max_tokens,
    )


def _rank(logprob) -> int:
    # vLLM's Logprob.rank: the id's 1-based rank in the vocabulary (None in old versions).
    rank = getattr(logprob, "rank", None)
    return int(rank) if rank is not None else 1
