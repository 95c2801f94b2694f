"""The rollout engine protocol: what the trainer calls to sample responses.

An engine turns prompts into a :class:`~megatron_opd.rollout.batch.RolloutBatch`
(tokens, prompt/response lengths and the student's temperature-1 log-prob of every
sampled token). Two implementations sit behind it: the Megatron-native KV-cached sampler
(:mod:`megatron_opd.rollout.megatron_engine`, CPU and GPU) and vLLM
(:mod:`megatron_opd.rollout.vllm_engine`, GPU only).

Chunked online stop. When ``rollout.chunk_size = C > 0`` and a :class:`ChunkListener` is
passed, generation runs in lockstep chunks of ``C`` new tokens. After every chunk (and
after the last, shorter one) the listener receives the chunk of every row that was still
running when the chunk began and returns which rows must stop. A stopped row leaves the
running batch at once; **its response keeps every token of the chunk it was stopped in**
(the response ends at the chunk's end, or earlier at EOS): stopping is decided only after
the chunk was scored, and the reliability weights already zero those tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from megatron_opd.rollout.batch import RolloutBatch


@dataclass(kw_only=True)
class PromptBlock:
    """The prompts of one generation micro-batch as the engine lays them out."""

    sample_index: torch.Tensor
    """``[m]`` int64: the rows of the call's batch these prompts belong to."""

    prompt_tokens: torch.Tensor
    """``[m, p]`` int64: prompts LEFT-padded to the longest one ``p`` (pad columns hold
    ``pad_id`` and must be masked out)."""

    prompt_lengths: torch.Tensor
    """``[m]`` int64: real prompt tokens of each row (``p - prompt_lengths`` pads on the
    left)."""

    num_samples: int
    """Rows of the whole call (all micro-batches)."""

    max_new_tokens: int
    """New tokens at most per row in this call."""


@dataclass(kw_only=True)
class GenerationChunk:
    """New tokens of the rows that were running when a chunk began."""

    sample_index: torch.Tensor
    """``[r]`` int64: row of the call's batch of each chunk row."""

    start: int
    """Response offset of the chunk's first column (the same for every row: lockstep)."""

    tokens: torch.Tensor
    """``[r, c]`` int64: the chunk's new tokens, ``pad_id`` after a row's length."""

    lengths: torch.Tensor
    """``[r]`` int64: valid tokens of each row in this chunk (shorter after EOS)."""

    finished: torch.Tensor
    """``[r]`` bool: the row ended in this chunk (EOS or the token budget); it has left
    the batch whatever the listener answers."""

    student_topk_ids: torch.Tensor | None
    """``[r, c, k]`` int64: the student's top-K ids of the logits that predicted each
    token (last pipeline stage only; None elsewhere or when the listener asked for k=0).
    Entries past a row's length are meaningless."""

    def valid_mask(self) -> torch.Tensor:
        """``[r, c]`` bool: True on the chunk's generated tokens."""
        columns = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return columns[None, :] < self.lengths[:, None]


@runtime_checkable
class ChunkListener(Protocol):
    """Receives generation chunk by chunk and decides which rows stop (online stop).

    Every rank of a model replica (all TP ranks, all PP stages) calls it with the same
    tokens; it must return the same answer on all of them.
    """

    student_top_k: int
    """K of the student top-K ids the engine records per token (0: none)."""

    def start(self, prompts: PromptBlock) -> None:
        """A generation micro-batch begins with these prompts."""

    def on_chunk(self, chunk: GenerationChunk) -> torch.Tensor:
        """Score a chunk; return ``[r]`` bool, True for rows that must stop."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples responses from the current student."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        seed: int,
        chunk_listener: ChunkListener | None = None,
    ) -> RolloutBatch:
        """Sample ``n_samples_per_prompt`` responses to each prompt.

        Args:
            prompts: token ids of each prompt (no padding).
            max_new_tokens: this step's response budget (capped by the config's).
            seed: sampling seed, equal on every rank of a model replica
                (:func:`~megatron_opd.config.rollout.rollout_seed`).
            chunk_listener: the online-stop scorer (needs ``rollout.chunk_size > 0``).

        Returns:
            A RolloutBatch with rows ``prompt 0 sample 0..n-1, prompt 1 ...`` and
            ``prompt_index`` set.
        """

    def sync_weights(self) -> None:
        """Make the engine sample from the student's current weights."""


def right_padded_batch(
    rows: Sequence[Sequence[int]],
    responses: Sequence[torch.Tensor],
    log_probs: Sequence[torch.Tensor | None],
    prompt_index: torch.Tensor,
    *,
    pad_id: int,
    device: torch.device,
) -> RolloutBatch:
    """The RolloutBatch an engine returns: each row's prompt then response, right-padded.

    Args:
        rows: prompt token ids of each of the ``b`` rows.
        responses: ``[r_i]`` int64 response ids of each row.
        log_probs: ``[r_i]`` sampled-token log-probs of each row, or all None (a rank
            without the logits, e.g. not the last pipeline stage: no sampled_log_probs).
        prompt_index: ``[b]`` which prompt each row samples.
        pad_id: id written right of every sequence.
        device: where the batch's tensors live.
    """
    prompt_lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    response_lengths = torch.tensor(
        [int(r.numel()) for r in responses], dtype=torch.long, device=device
    )
    seq = int((prompt_lengths + response_lengths).max())
    tokens = torch.full((len(rows), seq), pad_id, dtype=torch.long, device=device)
    has_log_probs = log_probs and log_probs[0] is not None
    sampled = torch.zeros(len(rows), seq, device=device) if has_log_probs else None
    for i, (prompt, response) in enumerate(zip(rows, responses)):
        start, end = len(prompt), len(prompt) + response.numel()
        tokens[i, :start] = torch.tensor(prompt, device=device)
        tokens[i, start:end] = response.to(device)
        if sampled is not None:
            sampled[i, start:end] = log_probs[i].to(device)
    return RolloutBatch(
        tokens=tokens,
        prompt_lengths=prompt_lengths,
        response_lengths=response_lengths,
        pad_id=pad_id,
        sampled_log_probs=sampled,
        prompt_index=prompt_index.to(device),
    )


def at_response_columns(batch: RolloutBatch, per_row: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[b, s, ...]``: each row's ``[r_i, ...]`` values at its response columns of
    ``batch`` (right-padded layout), 0 elsewhere."""
    first = per_row[0]
    out = torch.zeros(*batch.tokens.shape, *first.shape[1:], dtype=first.dtype,
                      device=batch.tokens.device)  # fmt: skip
    for i, values in enumerate(per_row):
        start = int(batch.prompt_lengths[i])
        out[i, start : start + values.shape[0]] = values.to(out.device)
    return out
