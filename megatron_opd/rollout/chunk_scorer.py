"""Online stop: score every generated chunk with the teacher and stop hopeless samples.

The :class:`ChunkScorer` is the :class:`~megatron_opd.rollout.engine.ChunkListener` of
Prune-OPD's per-sample early stop (PRUNE_OPD.md section 5.1). It keeps the teacher's own
KV cache next to the student's: at the start of a generation micro-batch it prefills the
teacher with the same left-padded prompts, then feeds each new chunk of ``c`` tokens as
one chunked-prefill forward (explicit ``[r, 1, c, offset + c]`` mask: causal inside the
chunk, pad keys hidden), so the teacher never recomputes a prefix.

Alignment: the teacher's distribution for the chunk's token ``j`` comes from the logits at
the previous position, so the chunk's predictions are ``[pending, logits[:, :c - 1]]``
where ``pending`` is the last logits row of the previous forward (the prompt's last
position for the first chunk). From these the scorer takes the teacher's top-K ids and
log-probs with the vocabulary-parallel ops (Megatron's KV-cache path gathers logits over
TP, so each rank passes its own vocabulary slice to the ops; the results equal the
batch scorer's), forms the drift events of ``prune.metric`` against the student's top-K
ids the engine recorded, and feeds them to an
:class:`~megatron_opd.prune.online_stop.OnlineStopper`. The stopper's answer is decided
on the last pipeline stage and broadcast over the pipeline group.

Deferred chunks. A chunk after which no running sample could reach a stop point, even if
every one of its tokens were a drift event (:meth:`~megatron_opd.prune.online_stop.
OnlineStopper.could_stop_within`), is not scored when it arrives: the teacher reads it
together with the next chunk, in one forward instead of two (each forward has a fixed
cost: eight 16-token forwards of the CPU test teacher cost ~1.6x one 128-token
forward; ``bench/vs_trl.py --prune`` prints both). The stop decisions are the same as
scoring every chunk (a stop could not have happened in a deferred chunk); a chunk in
which a row finished, and any chunk under pipeline parallelism (where the stopper lives
on the last stage only), is scored at once.
With a small ``w_drop`` the first ``~1 / w_drop`` tokens are read in one forward; with
``online_stop`` off, the whole response is. ``chunks_scored`` and ``chunks_deferred``
count both per call.

The weights it accumulates equal those of scoring the finished rollout as a whole
(:func:`~megatron_opd.scoring.score_rollouts` + ``reliability_weights``): same top-K op,
same integer drift counts. :meth:`ChunkScorer.fill_batch` writes them into the batch.

Fused teacher scoring. Every generated token passes through the teacher here, so the
scorer also keeps what the SCORE stage needs from the teacher: its top-K ids and
log-probs, and its log-probs at the sampled token and at the student's top-K ids (the
ids the rollout engine recorded at each decode step, from the same weights).
:meth:`ChunkScorer.fill_scores` writes them into the batch, and
:func:`~megatron_opd.scoring.score_rollouts` then runs only the student: the teacher
reads each response once per step instead of twice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.distributed import ParallelGroups
from megatron_opd.ops.vocab_parallel import vocab_parallel_gather, vocab_parallel_topk_log_probs
from megatron_opd.prune.compat import drift_events
from megatron_opd.prune.online_stop import OnlineStopper
from megatron_opd.prune.weights import ReliabilityWeights
from megatron_opd.rollout.batch import RolloutBatch
from megatron_opd.rollout.engine import GenerationChunk, PromptBlock
from megatron_opd.rollout.kv_decoder import make_kv_decoder
from megatron_opd.rollout.lean_decoder import LeanDecoder
from megatron_opd.scoring import eval_without_sequence_parallel, naming_the_model


class ChunkScorer:
    """Teacher scoring chunk by chunk, driving an OnlineStopper (a ChunkListener)."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        groups: ParallelGroups,
        prune_config,
        *,
        vocab_size: int | None = None,
        teacher_temperature: float = 1.0,
        lean_decode: bool = True,
    ) -> None:
        """
        Args:
            teacher: this stage's teacher GPTModel (same pipeline layout as the student).
            groups: this rank's groups.
            prune_config: the ``prune`` section (:class:`~megatron_opd.config.prune.
                PruneConfig`): metric, threshold, top_k, weights and stop rules.
            vocab_size: real vocabulary size (padding ids never enter a top-K).
            teacher_temperature: the teacher's logits are divided by it (as in scoring).
            lean_decode: feed the teacher through the lean KV-cached forward where it
                supports the model (``rollout.lean_decode``; :mod:`.kv_decoder`).
        """
        self.lean_decode = bool(lean_decode)
        self.teacher_temperature = float(teacher_temperature)
        self.teacher = teacher
        self.groups = groups
        self.config = prune_config
        self.vocab_size = vocab_size
        self.student_top_k = int(prune_config.top_k)
        self.stopper: OnlineStopper | None = None
        self._records: list[tuple[torch.Tensor, int, torch.Tensor, dict[str, torch.Tensor]]] = []
        self.stopped_early = torch.zeros(0, dtype=torch.bool)
        """``[b]`` bool: generation of the sample was ended by the online stop (before its
        EOS and its token budget); on every rank."""
        self._overlap: list[tuple[torch.Tensor, int, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._decoder = None
        self._rows: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None
        self._prompt: torch.Tensor | None = None
        self._deferred: GenerationChunk | None = None
        self.chunks_scored = 0
        """Teacher forwards over generated chunks since the call began (all blocks)."""
        self.chunks_deferred = 0
        """Chunks left for the next forward since the call began (module docstring)."""

    def start(self, prompts: PromptBlock) -> None:
        """Prefill the teacher with the block's prompts (a new call resets the stopper)."""
        device = self.groups.platform.device
        if self.stopper is None or int(prompts.sample_index.min()) == 0:
            self.stopper = OnlineStopper.from_config(
                prompts.num_samples, self.config, device=device
            )
            self.stopped_early = torch.zeros(prompts.num_samples, dtype=torch.bool, device=device)
            self.chunks_scored = self.chunks_deferred = 0
            self._overlap = []
            self._records = []
        tokens = prompts.prompt_tokens.to(device)
        m, p = tokens.shape
        total = p + prompts.max_new_tokens
        pad = p - prompts.prompt_lengths.to(device)
        columns = torch.arange(total, device=device)
        self._key_valid = columns[None, :] >= pad[:, None]  # [m, total]
        self._positions = (columns[None, :] - pad[:, None]).clamp(min=0)
        self._sample_index = prompts.sample_index.to(device)
        self._rows = torch.arange(m, device=device)  # block rows in the teacher's cache
        self._decoder = make_kv_decoder(
            self.teacher, self.groups, rows=m, max_len=total, lean=self.lean_decode,
            all_logits=True, decode_after_first=False,
        )  # fmt: skip
        self._pending = None
        self._prompt = None
        self._deferred = None
        if isinstance(self._decoder, LeanDecoder):
            # The lean decoder prefills the prompt together with the first chunk (one
            # forward fewer), projecting only the columns that predict chunk tokens.
            self._prompt = tokens
            return
        logits = self._forward(tokens)
        if logits is not None:
            self._pending = logits[:, -1:]

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, *, logits_from: int = 0) -> torch.Tensor | None:
        """Feed ``tokens [r, c]`` of the running rows after the cached prefix."""
        decoder, rows = self._decoder, self._rows
        offset, c = decoder.offset, tokens.shape[1]
        args = (tokens, self._positions[rows, offset : offset + c], self._key_valid[rows])
        if isinstance(decoder, LeanDecoder):  # never calls a module: no mode to switch
            return decoder.forward(*args, logits_from=logits_from)
        with eval_without_sequence_parallel(self.teacher):
            return decoder.forward(*args)

    def on_chunk(self, chunk: GenerationChunk) -> torch.Tensor:
        """Score the chunk, update the stopper; ``[r]`` bool rows to stop."""
        groups, device = self.groups, self.groups.platform.device
        block_ids = self._sample_index[self._rows]
        if not torch.equal(block_ids, chunk.sample_index.to(device)):
            raise ValueError(
                "ChunkScorer got a chunk for rows "
                f"{chunk.sample_index.tolist()} but its teacher cache holds {block_ids.tolist()};"
                " pass the same ChunkScorer to every generate call from its start"
            )
        if self._deferred is not None:
            chunk, self._deferred = _joined(self._deferred, chunk), None
        if self._may_defer(chunk):
            self._deferred = chunk
            self.chunks_deferred += 1
            return torch.zeros(chunk.tokens.shape[0], dtype=torch.bool, device=device)
        self.chunks_scored += 1
        tokens = chunk.tokens.to(device)
        if self._prompt is not None:  # first chunk of a lean block: prompt + chunk at once
            p = self._prompt.shape[1]
            logits = self._forward(torch.cat([self._prompt, tokens], dim=1), logits_from=p - 1)
            self._prompt, self._pending = None, logits[:, :1]
            logits = logits[:, 1:]
        else:
            logits = self._forward(tokens)
        stop = torch.zeros(tokens.shape[0], dtype=torch.long, device=device)
        if groups.is_last_stage:
            predictions = torch.cat([self._pending, logits[:, :-1]], dim=1).float()
            self._pending = logits[:, -1:]
            stop = self._score(chunk, predictions).to(torch.long)
        if groups.pp_size > 1:
            dist.broadcast(stop, src=groups.last_stage_global_rank, group=groups.pp_group)
        stop = stop.bool()
        finished = chunk.finished.to(device)
        self.stopped_early[chunk.sample_index.to(device)[stop & ~finished]] = True
        keep = ~(stop | finished)
        if not bool(keep.all()):
            self._decoder.keep_rows(keep)
            self._rows = self._rows[keep]
            if self._pending is not None:
                self._pending = self._pending[keep]
        return stop

    def _may_defer(self, chunk: GenerationChunk) -> bool:
        """Whether ``chunk`` (all tokens not yet read) can wait for the next one."""
        if self.groups.pp_size > 1 or bool(chunk.finished.any()):
            return False
        if not self.config.online_stop:
            return True
        return not self.stopper.could_stop_within(chunk.tokens.shape[1], chunk.sample_index)

    def _score(self, chunk: GenerationChunk, predictions: torch.Tensor) -> torch.Tensor:
        """Teacher top-K of the chunk's predictions ``[r, c, V]``, drift events, stopper."""
        groups, config = self.groups, self.config
        start, end = groups.vocab_partition(predictions.shape[-1])
        with naming_the_model("teacher", "scoring a rollout chunk"):
            teacher_log_probs, teacher_ids, teacher_lse = vocab_parallel_topk_log_probs(
                predictions[..., start:end],
                self.student_top_k,
                groups.tp_group,
                vocab_size=self.vocab_size,
                temperature=self.teacher_temperature,
            )
        valid = chunk.valid_mask().to(predictions.device)
        bad, overlap = drift_events(
            metric=config.metric,
            threshold=config.threshold,
            valid_mask=valid,
            student_topk_ids=chunk.student_topk_ids,
            teacher_topk_ids=teacher_ids,
            sampled_ids=chunk.tokens.to(predictions.device),
            teacher_topk_log_probs=teacher_log_probs,
        )
        if chunk.student_topk_ids is not None:
            ids = torch.cat([chunk.tokens.to(predictions.device)[..., None],
                             chunk.student_topk_ids], dim=-1)  # fmt: skip
            # log-probs at the ids = scaled logits there - the top-K op's log-sum-exp
            # (no second pass over the vocabulary).
            at_ids = vocab_parallel_gather(
                predictions[..., start:end], ids, groups.tp_group,
                vocab_size=self.vocab_size, temperature=self.teacher_temperature,
            ) - teacher_lse[..., None]  # fmt: skip
            scores = {
                "teacher_topk_ids": teacher_ids,
                "teacher_topk_log_probs": teacher_log_probs,
                "teacher_sampled_log_probs": at_ids[..., 0],
                "teacher_log_probs_at_student_ids": at_ids[..., 1:],
                "student_topk_ids": chunk.student_topk_ids,
            }
            self._records.append((chunk.sample_index, chunk.start, chunk.lengths, scores))
        result = self.stopper.update(bad, valid, sample_index=chunk.sample_index)
        if overlap is not None:
            self._overlap.append((chunk.sample_index, chunk.start, chunk.lengths,
                                  {"overlap_ratio": overlap}))  # fmt: skip
        if not config.online_stop:
            return torch.zeros_like(result.should_stop)
        return result.should_stop

    def result(self) -> ReliabilityWeights:
        """Weights so far in response coordinates (``[b, max response]``; last stage)."""
        if self.stopper is None:
            raise ValueError("ChunkScorer.result() before any generation")
        return self.stopper.result()

    def fill_scores(self, batch: RolloutBatch) -> RolloutBatch:
        """Write the teacher's SCORE fields (``teacher_topk_ids``, ``teacher_topk_log_probs``,
        ``teacher_sampled_log_probs``, ``teacher_log_probs_at_student_ids``) and the
        rollout's ``student_topk_ids`` into ``batch``, in place; 0 off the response; last
        stage only (other stages hold no scores)."""
        if not self.groups.is_last_stage:
            return batch
        if not self._records:
            raise ValueError(
                "ChunkScorer.fill_scores: no teacher scores were kept (the engine recorded no "
                "student top-K ids); score the batch with score_rollouts and a teacher"
            )
        out = _at_batch_columns(self._records, batch)
        for name, value in out.items():
            setattr(batch, name, value)
        batch.extras["teacher_scored"] = True
        return batch

    def fill_batch(self, batch: RolloutBatch) -> RolloutBatch:
        """Write ``weights``, ``loss_weights``, ``effective_lengths`` (and ``overlap_ratio``
        for the overlap metric) into ``batch``'s layout, in place; last stage only."""
        if not self.groups.is_last_stage:
            return batch
        weights = self.result()
        device = batch.tokens.device
        # Response coordinates -> the batch's columns, all rows at once.
        lengths = batch.response_lengths.to(device)
        offsets = torch.arange(weights.weights.shape[1], device=device)
        valid = offsets[None, :] < lengths[:, None]  # [b, r]
        rows = torch.arange(batch.batch_size, device=device)[:, None].expand_as(valid)[valid]
        cols = (batch.prompt_lengths.to(device)[:, None] + offsets[None, :])[valid]
        full_w = torch.zeros(batch.tokens.shape, dtype=torch.float32, device=device)
        full_lw = torch.zeros_like(full_w)
        full_w[rows, cols] = weights.weights.to(device)[valid]
        full_lw[rows, cols] = weights.loss_weights.to(device)[valid]
        batch.weights, batch.loss_weights = full_w, full_lw
        batch.effective_lengths = weights.effective_length.to(device)
        if self._overlap:
            batch.overlap_ratio = _at_batch_columns(self._overlap, batch)["overlap_ratio"]
        return batch


def _joined(first: GenerationChunk, second: GenerationChunk) -> GenerationChunk:
    """One chunk of ``first`` (deferred: no row finished in it) and the next one."""
    topk = None
    if first.student_topk_ids is not None:
        topk = torch.cat([first.student_topk_ids, second.student_topk_ids], dim=1)
    return GenerationChunk(
        sample_index=first.sample_index,
        start=first.start,
        tokens=torch.cat([first.tokens, second.tokens], dim=1),
        lengths=first.lengths + second.lengths,
        finished=second.finished,
        student_topk_ids=topk,
    )


def _at_batch_columns(records, batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """Chunk records ``(sample_index [r], start, lengths [r], {name: [r, c, ...]})`` placed
    at their rows' response columns of ``batch`` (``[b, s, ...]`` each, 0 elsewhere)."""
    b, s = batch.tokens.shape
    device = batch.tokens.device
    prompt = batch.prompt_lengths.to(device)
    out: dict[str, torch.Tensor] = {}
    for sample_index, start, lengths, values in records:
        rows = sample_index.to(device)
        c = next(iter(values.values())).shape[1]
        offsets = torch.arange(c, device=device)
        keep = offsets[None, :] < lengths.to(device)[:, None]  # [r, c]
        cols = (prompt[rows][:, None] + start + offsets[None, :])[keep]
        at_rows = rows[:, None].expand(-1, c)[keep]
        for name, value in values.items():
            if name not in out:
                out[name] = torch.zeros(b, s, *value.shape[2:], dtype=value.dtype, device=device)
            out[name][at_rows, cols] = value.to(device)[keep]
    return out
