"""Megatron-native rollouts: KV-cached batched sampling with the student's own GPTModel.

Each generation micro-batch runs one prefill and then one decode step per new token
through a KV-cached decoder (:mod:`megatron_opd.rollout.kv_decoder`) that holds the keys
and values of every layer, so a decode step feeds only the newest token of each running
row and never recomputes the prefix. Where the model allows it (``rollout.lean_decode``,
one pipeline stage, the local layer spec) that is the lean plain-torch forward over the
student's own parameter tensors (:mod:`megatron_opd.rollout.lean_decoder`, tested equal
to Megatron's training forward); otherwise ``GPTModel.forward`` with a Megatron
``StaticInferenceContext``.

Ragged prompts are LEFT-padded to the longest prompt ``p`` so that all rows decode in
lockstep at the same cache offset. Each row gets ``position_ids = column - pad`` (its
real positions) and an explicit attention mask that hides the pad keys: ``causal |
pad_key`` of shape ``[m, 1, p, p]`` at prefill and ``pad_key`` of shape ``[a, 1, 1,
cur + 1]`` per decode step (no mask at all when no row is padded). Output is converted
to the RolloutBatch's right-padded layout. Caveat: Transformer Engine's attention on GPU
may apply its own causal / no-mask type and ignore a custom padding mask; validate the
KV-cached result against recomputation once per layer spec (tests do it for the local
spec).

A row that emits an EOS id, reaches the token budget, or is stopped by the chunk
listener leaves the running batch: its entries are dropped from the batch dimension of
every layer's cache, so later steps cost only the rows still running.

Parallelism (process groups come from :class:`ParallelGroups`, never from globals):

- TP: on the lean path with ``top_p = 1`` (the default) each TP rank keeps its
  ``[a, V / TP]`` logits and the ranks draw together
  (:mod:`megatron_opd.rollout.vocab_parallel_sampling`: each rank draws a candidate from
  its shard, one small all-gather per step picks the shard). Otherwise
  (Megatron's inference forward, top-p) the logits are gathered over the TP group, so
  every TP rank holds the same ``[a, V]`` logits and samples them with its own generator
  seeded identically, giving identical tokens with no extra communication.
- PP: each stage receives ``[s, a, h]`` hidden states from the previous stage, runs its
  layers (with its own KV cache) and sends its output on; the last stage samples and
  broadcasts the new tokens over the pipeline group, so every stage knows which rows
  are still running. Sampled log-probs and student top-K ids live on the last stage
  only (None elsewhere).

Recorded log-probs are ``log_softmax(logits / temperature)`` (unfiltered by top-p; the
raw logits for greedy decoding) at the sampled id: the sampling policy, the one the
trainer's scoring and training log-probs are taken under (the release divides them by
the rollout temperature too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.distributed import ParallelGroups
from megatron_opd.rollout.batch import RolloutBatch
from megatron_opd.rollout.engine import (
    ChunkListener,
    GenerationChunk,
    PromptBlock,
    at_response_columns,
    right_padded_batch,
)
from megatron_opd.rollout.kv_decoder import make_kv_decoder
from megatron_opd.rollout.sampling import sample_step
from megatron_opd.rollout.vocab_parallel_sampling import vocab_parallel_sample_step
from megatron_opd.scoring import eval_without_sequence_parallel


class MegatronRolloutEngine:
    """KV-cached sampling with this stage's part of the student GPTModel."""

    def __init__(
        self,
        model: torch.nn.Module,
        groups: ParallelGroups,
        config: RolloutConfig,
        *,
        eos_token_ids: Sequence[int],
        pad_id: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        """
        Args:
            model: this pipeline stage's GPTModel (the student; shared with training,
                so a rollout always sees the current weights).
            groups: the process groups of this rank.
            config: the ``rollout`` section (engine must be ``megatron``).
            eos_token_ids: ids that end a response (kept as its last token).
            pad_id: id written right of every sequence in the RolloutBatch.
            vocab_size: real vocabulary size; Megatron's padding ids above it are never
                sampled (None: every logit column is a real id).
        """
        if config.engine != "megatron":
            raise ValueError(
                f"MegatronRolloutEngine needs rollout.engine='megatron', got {config.engine!r}"
            )
        self.model = model
        self.groups = groups
        self.config = config
        self.eos_token_ids = torch.tensor(sorted(set(int(i) for i in eos_token_ids)))
        self.pad_id = int(pad_id)
        self.vocab_size = vocab_size
        self.device = groups.platform.device
        self.decode_steps_on_shards = 0
        """Decode steps sampled on the TP ranks' vocabulary shards so far (see module)."""

    records_student_scores = True
    """:meth:`generate` can record the scoring pass's student fields (``student_top_k``)."""

    def sync_weights(self) -> None:
        """Nothing to do: the engine samples from the training model itself."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        seed: int,
        chunk_listener: ChunkListener | None = None,
        student_top_k: int = 0,
    ) -> RolloutBatch:
        """Sample ``n_samples_per_prompt`` responses per prompt (see RolloutEngine).

        ``student_top_k = K > 0``: also fill the batch's ``student_topk_ids``,
        ``student_topk_log_probs`` and ``student_sampled_log_probs`` (last stage) from the
        logits each token was sampled from, at the sampling temperature: what a no-grad
        student scoring pass would compute (the same exact top-K op; every id, in id
        order, when K is the vocabulary), so scoring can skip that forward.
        """
        num_new = self._check_call(prompts, max_new_tokens, chunk_listener)
        listener_k = int(chunk_listener.student_top_k) if chunk_listener is not None else 0
        if student_top_k and listener_k and student_top_k != listener_k:
            raise ValueError(
                f"student_top_k={student_top_k} differs from the chunk listener's "
                f"student_top_k={listener_k}; both are prune.top_k"
            )
        n = self.config.n_samples_per_prompt
        rows = [list(map(int, p)) for p in prompts for _ in range(n)]
        prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
        mb = self.config.generation_batch_size or len(rows)
        generator = torch.Generator(device=self.device).manual_seed(int(seed))

        responses, log_probs, topk_ids, topk_log_probs = [], [], [], []
        with eval_without_sequence_parallel(self.model):
            for begin in range(0, len(rows), mb):
                out = self._generate_block(
                    rows[begin : begin + mb],
                    torch.arange(begin, min(begin + mb, len(rows))),
                    num_samples=len(rows),
                    num_new=num_new,
                    generator=generator,
                    listener=chunk_listener,
                    record_k=int(student_top_k),
                )
                responses.extend(out[0])
                log_probs.extend(out[1])
                topk_ids.extend(out[2])
                topk_log_probs.extend(out[3])
        batch = right_padded_batch(
            rows, responses, log_probs, prompt_index, pad_id=self.pad_id, device=self.device
        )
        if student_top_k and self.groups.is_last_stage:
            batch.student_topk_ids = at_response_columns(batch, topk_ids)
            batch.student_topk_log_probs = at_response_columns(batch, topk_log_probs)
            batch.student_sampled_log_probs = batch.sampled_log_probs.clone()
        return batch

    def _check_call(self, prompts, max_new_tokens: int, listener) -> int:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token id lists")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if listener is not None and self.config.chunk_size == 0:
            raise ValueError(
                "a chunk_listener was passed but rollout.chunk_size is 0; set "
                "rollout.chunk_size > 0 to generate in chunks"
            )
        num_new = min(max_new_tokens, self.config.max_new_tokens)
        longest = max(len(p) for p in prompts)
        model_max = getattr(self.model, "max_sequence_length", None)
        learned = getattr(self.model, "position_embedding_type", "") == "learned_absolute"
        if learned and model_max is not None and longest + num_new > model_max:
            raise ValueError(
                f"longest prompt ({longest}) + max_new_tokens ({num_new}) exceeds the model's "
                f"max_sequence_length {model_max} (learned absolute positions); lower "
                "rollout.max_new_tokens or the data's max prompt length"
            )
        return num_new

    @torch.no_grad()
    def _generate_block(
        self,
        prompts: list[list[int]],
        sample_index: torch.Tensor,
        *,
        num_samples: int,
        num_new: int,
        generator: torch.Generator,
        listener: ChunkListener | None,
        record_k: int = 0,
    ) -> tuple[list[torch.Tensor], ...]:
        """Generate one micro-batch; per row its response ids, and (last stage; else None)
        its log-probs, student top-K ids and their log-probs (``record_k``; else None)."""
        groups, dev, cfg = self.groups, self.device, self.config
        last_stage = groups.is_last_stage
        m = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        p = int(lengths.max())
        total = p + num_new
        tokens = torch.full((m, p), self.pad_id, dtype=torch.long, device=dev)
        for i, prompt in enumerate(prompts):
            tokens[i, p - len(prompt) :] = torch.tensor(prompt, device=dev)
        pad = p - lengths
        columns = torch.arange(total, device=dev)
        key_valid = columns[None, :] >= pad[:, None]  # [m, total]
        positions = (columns[None, :] - pad[:, None]).clamp(min=0)  # [m, total]
        padded = bool((pad > 0).any())
        eos = self.eos_token_ids.to(dev)

        chunk_size = cfg.chunk_size if listener is not None else 0
        top_k = int(listener.student_top_k) if listener is not None else 0
        top_k = top_k or record_k
        if listener is not None:
            listener.start(
                PromptBlock(
                    sample_index=sample_index.to(dev),
                    prompt_tokens=tokens.clone(),
                    prompt_lengths=lengths.clone(),
                    num_samples=num_samples,
                    max_new_tokens=num_new,
                )
            )

        out_tokens = torch.full((m, num_new), self.pad_id, dtype=torch.long, device=dev)
        out_log_probs = torch.zeros(m, num_new, device=dev) if last_stage else None
        out_topk = (
            torch.zeros(m, num_new, top_k, dtype=torch.long, device=dev)
            if last_stage and top_k
            else None
        )
        out_topk_lp = (
            torch.zeros(m, num_new, top_k, device=dev) if last_stage and record_k else None
        )
        response_lengths = torch.zeros(m, dtype=torch.long, device=dev)
        running = torch.arange(m, device=dev)  # rows still in the KV cache, in cache order
        chunk_rows, chunk_start = running, 0
        done = torch.zeros(m, dtype=torch.bool, device=dev)

        decoder = make_kv_decoder(self.model, groups, rows=m, max_len=total, lean=cfg.lean_decode)
        shard = self._samples_vocab_shards(decoder, top_k)
        workspace = None  # the sampler's exp pass, one buffer for every step of the block
        next_ids = None
        for step in range(num_new):
            offset = decoder.offset
            if step == 0:
                inputs, pos = tokens, positions[:, :p]
            else:
                inputs, pos = next_ids[:, None], positions[running, offset : offset + 1]
            valid = key_valid[running] if padded else None
            if shard:
                logits = decoder.forward(inputs, pos, valid, last_only=True, vocab_parallel=True)
            else:
                logits = decoder.forward(inputs, pos, valid, last_only=True)

            if last_stage:
                if workspace is None:
                    columns = self._sampled_columns(logits.shape[-1], shard)
                    workspace = torch.empty(m, columns, device=dev)
                if shard:
                    self.decode_steps_on_shards += 1
                    step_out = vocab_parallel_sample_step(
                        logits[:, -1], temperature=cfg.temperature, generator=generator,
                        vocab_size=self.vocab_size or logits.shape[-1] * groups.tp_size,
                        tp_group=groups.tp_group, top_k=top_k, workspace=workspace,
                    )  # fmt: skip
                else:
                    step_out = sample_step(
                        logits[:, -1], temperature=cfg.temperature, top_p=cfg.top_p,
                        generator=generator, vocab_size=self.vocab_size, top_k=top_k,
                        workspace=workspace,
                    )  # fmt: skip
                next_ids, log_probs, ids, topk_log_probs = step_out
                out_log_probs[running, step] = log_probs
                if out_topk is not None:
                    out_topk[running, step] = ids
                if out_topk_lp is not None:
                    out_topk_lp[running, step] = topk_log_probs
            else:
                next_ids = torch.empty(running.numel(), dtype=torch.long, device=dev)
            if groups.pp_size > 1:
                dist.broadcast(next_ids, src=groups.last_stage_global_rank, group=groups.pp_group)
            out_tokens[running, step] = next_ids
            response_lengths[running] += 1
            finished = torch.isin(next_ids, eos) | (step + 1 == num_new)
            done[running[finished]] = True
            keep = ~finished

            chunk_len = step + 1 - chunk_start
            if chunk_size and (chunk_len == chunk_size or bool(finished.all())):
                stop = self._call_listener(
                    listener, chunk_rows, chunk_start, step + 1, out_tokens, response_lengths,
                    done, out_topk, sample_index,
                )  # fmt: skip
                keep &= ~torch.isin(running, chunk_rows[stop])
                chunk_start = step + 1
                chunk_rows = running[keep]
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                decoder.keep_rows(keep)
                running, next_ids = running[keep], next_ids[keep]

        responses = [out_tokens[i, : response_lengths[i]] for i in range(m)]

        def per_row(values):
            if values is None:
                return [None] * m
            return [values[i, : response_lengths[i]] for i in range(m)]

        return (responses, per_row(out_log_probs), per_row(out_topk if record_k else None),
                per_row(out_topk_lp))  # fmt: skip

    def _samples_vocab_shards(self, decoder, top_k: int) -> bool:
        """Whether this block samples on the TP ranks' vocabulary shards (see module)."""
        if self.groups.tp_size == 1 or not decoder.shards_vocab or self.config.top_p < 1.0:
            return False
        # Recording every id in id order (exact full-vocabulary losses) needs them all.
        return top_k < (self.vocab_size or decoder.vocab_size)

    def _sampled_columns(self, width: int, shard: bool) -> int:
        """Real vocabulary columns of this rank's ``width``-column logits."""
        if not shard:
            return min(self.vocab_size or width, width)
        vocab = self.vocab_size or width * self.groups.tp_size
        return max(0, min(width, vocab - self.groups.tp_rank * width))

    def _call_listener(
        self,
        listener: ChunkListener,
        chunk_rows: torch.Tensor,
        start: int,
        end: int,
        out_tokens: torch.Tensor,
        response_lengths: torch.Tensor,
        done: torch.Tensor,
        out_topk: torch.Tensor | None,
        sample_index: torch.Tensor,
    ) -> torch.Tensor:
        chunk = GenerationChunk(
            sample_index=sample_index.to(self.device)[chunk_rows],
            start=start,
            tokens=out_tokens[chunk_rows, start:end].clone(),
            lengths=(response_lengths[chunk_rows] - start).clamp(min=0),
            finished=done[chunk_rows].clone(),
            student_topk_ids=None if out_topk is None else out_topk[chunk_rows, start:end],
        )
        stop = listener.on_chunk(chunk)
        if stop.shape != (chunk_rows.numel(),):
            raise ValueError(
                f"chunk_listener.on_chunk must return a [{chunk_rows.numel()}] bool tensor "
                f"(one per chunk row), got shape {tuple(stop.shape)}"
            )
        return stop.to(self.device, torch.bool)
