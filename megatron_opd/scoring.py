"""SCORE: no-grad student and teacher forward passes over a rollout batch.

For every response position ``t`` of a :class:`RolloutBatch` this computes, from the
logits at ``t - 1`` (the batch's alignment: entry ``t`` is about predicting
``tokens[:, t]``):

- the student's top-K ids and log-probs, and its log-prob of the sampled token;
- the teacher's top-K ids and log-probs, its log-probs at the student's top-K ids and
  at the sampled token;
- the overlap ratio ``|S_t ∩ T_t| / K`` (the Prune-OPD drift signal).

Logits stay sharded over the tensor-parallel group (``[b, s, V/TP]``: the ordinary
eval-mode forward, no KV cache, so Megatron does not gather them); the vocabulary-parallel
ops of :mod:`megatron_opd.ops.vocab_parallel` exchange ``O(K * TP)`` values per token.
Rows are scored ``micro_batch_size`` at a time, each micro-batch cut to its own longest
sequence, so the largest fp32 tensor is one micro-batch of logits.

With pipeline parallelism every stage runs its layers and passes ``[s, b, h]`` hidden
states to the next stage over ``groups.pp_group`` (:func:`forward_through_stages`); only
the last stage has logits, so every scoring result lives on the last stage (other stages
get None). What the other stages need (lengths, trimming plans) travels with
:func:`broadcast_from_last_stage`. Right padding needs no special mask: padding sits after
every real token, and causal attention never lets it change a real position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_opd.distributed import ParallelGroups
from megatron_opd.mcore_compat import inference_mode
from megatron_opd.ops.vocab_parallel import vocab_parallel_log_probs, vocab_parallel_topk_log_probs
from megatron_opd.prune.compat import overlap_ratio
from megatron_opd.rollout.batch import RolloutBatch

_MAX_DIMS = 4


def _pipeline_dtype(model: torch.nn.Module) -> torch.dtype:
    config = model.config
    return getattr(config, "pipeline_dtype", None) or config.params_dtype


def forward_through_stages(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    groups: ParallelGroups,
    *,
    inference_context=None,
    runtime_gather_output: bool | None = None,
) -> torch.Tensor | None:
    """One forward of this stage's part of a GPTModel, with p2p between stages.

    Args:
        model: this stage's GPTModel (pre_process on the first, post_process on the last).
        input_ids: ``[b, s]`` int64 (used by the first stage; shapes only elsewhere).
        position_ids: ``[b, s]`` int64.
        attention_mask: ``[b or 1, 1, s, s_keys]`` bool, True = masked, or None.
        groups: this rank's groups; hidden states go to the next rank of ``pp_group``.
        inference_context: Megatron KV-cache context (rollouts) or None (scoring).
        runtime_gather_output: gather logits over TP (Megatron requires True with a
            context); None keeps them sharded.

    Returns:
        ``[b, s_out, V or V/TP]`` logits on the last stage, None on the others.
    """
    b, s = input_ids.shape
    if not groups.is_first_stage:
        hidden = torch.empty(
            s, b, model.config.hidden_size, dtype=_pipeline_dtype(model), device=input_ids.device
        )
        dist.recv(hidden, src=groups.pp_global_ranks[groups.pp_rank - 1], group=groups.pp_group)
        model.set_input_tensor(hidden)
    # Megatron-Core 0.18+ treats a forward with a context as inference (last-token logits
    # unless the context asks for all) only inside its InferenceMode (mcore_compat).
    mode = inference_mode() if inference_context is not None else contextlib.nullcontext()
    with mode:
        output = model(
            input_ids,
            position_ids,
            attention_mask,
            inference_context=inference_context,
            runtime_gather_output=runtime_gather_output,
        )
    if not groups.is_last_stage:
        dist.send(
            output.contiguous(),
            dst=groups.pp_global_ranks[groups.pp_rank + 1],
            group=groups.pp_group,
        )
        return None
    return output


@contextlib.contextmanager
def eval_without_sequence_parallel(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode with sequence parallel off, then restore both.

    Megatron uses its KV cache only outside training mode, and sequence parallel cannot
    split the one-token inputs of decode steps (nor ragged scoring lengths).
    """
    was_training = model.training
    sequence_parallel = bool(getattr(model.config, "sequence_parallel", False))
    if sequence_parallel:
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        set_model_to_sequence_parallel(model, False)
    model.eval()
    try:
        yield
    finally:
        if sequence_parallel:
            set_model_to_sequence_parallel(model, True)
        model.train(was_training)


def broadcast_from_last_stage(
    tensors: Sequence[torch.Tensor | None], groups: ParallelGroups
) -> list[torch.Tensor]:
    """The last pipeline stage's ``tensors`` on every stage (same dtypes and shapes).

    The last stage passes its tensors (up to 4-D each); the other stages pass a sequence
    of the same length (entries ignored, e.g. None). One broadcast of all shapes and
    dtypes, then one per tensor. Without PP the tensors are returned as they are.
    """
    if groups.pp_size == 1:
        return [t for t in tensors]
    device = groups.platform.device
    src = groups.last_stage_global_rank
    dtypes = [
        torch.bool, torch.uint8, torch.int32, torch.int64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64,
    ]  # fmt: skip
    header = torch.zeros(len(tensors), _MAX_DIMS + 2, dtype=torch.int64, device=device)
    if groups.is_last_stage:
        for i, tensor in enumerate(tensors):
            if tensor is None or tensor.dim() > _MAX_DIMS or tensor.dtype not in dtypes:
                raise ValueError(
                    f"broadcast_from_last_stage: tensor {i} must be a tensor of at most "
                    f"{_MAX_DIMS} dims with one of {dtypes} on the last stage"
                )
            header[i, 0] = dtypes.index(tensor.dtype)
            header[i, 1] = tensor.dim()
            header[i, 2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    dist.broadcast(header, src=src, group=groups.pp_group)
    out = []
    for i, row in enumerate(header.tolist()):
        dtype, dims = dtypes[row[0]], row[2 : 2 + row[1]]
        if groups.is_last_stage:
            data = tensors[i].to(device).contiguous()
        else:
            data = torch.empty(dims, dtype=dtype, device=device)
        dist.broadcast(data, src=src, group=groups.pp_group)
        out.append(data)
    return out


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, length, length]`` bool, True above the diagonal (Megatron: True = masked)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)[None, None]


@torch.no_grad()
def model_logits(
    model: torch.nn.Module, tokens: torch.Tensor, groups: ParallelGroups, *, lean: bool = False
) -> torch.Tensor | None:
    """``[b, s, V/TP]`` vocab-sharded logits of right-padded ``tokens [b, s]`` (last stage;
    None elsewhere). The caller puts the model in eval mode. ``lean``: where the model
    allows it, the lean plain-torch forward over its own parameters
    (:mod:`megatron_opd.rollout.lean_decoder`, no KV cache kept) instead of Megatron's."""
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device)[None].expand(b, s)
    if lean:
        from megatron_opd.rollout.lean_decoder import LeanDecoder, lean_unsupported

        if lean_unsupported(model, groups) is None:
            decoder = LeanDecoder(model, groups, rows=b, max_len=s, use_cache=False)
            return decoder.forward(tokens, positions, None, vocab_parallel=True)
    return forward_through_stages(model, tokens, positions, causal_mask(s, tokens.device), groups)


@contextlib.contextmanager
def naming_the_model(role: str, where: str = "scoring the rollouts") -> Iterator[None]:
    """Prefix a ValueError of the vocabulary-parallel ops (NaN / +inf logits) with the
    model whose logits they were, so the message says where to look."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{where}, the {role}'s {err}") from None


def _topk_scores(logits, k: int, tp, *, full_vocab: bool, temperature: float, vocab_size):
    """``(log_probs [.., k], ids [.., k])`` of the top-``k`` of ``logits / temperature``;
    with ``full_vocab`` (k is the whole vocabulary) every id in id order, with no sort."""
    if full_vocab:
        ids = torch.arange(k, device=logits.device).expand(*logits.shape[:-1], k)
        lp = vocab_parallel_log_probs(
            logits, ids, tp, temperature=temperature, vocab_size=vocab_size
        )
        return lp, ids
    lp, ids, _ = vocab_parallel_topk_log_probs(
        logits, k, tp, temperature=temperature, vocab_size=vocab_size
    )
    return lp, ids


def score_rollouts(
    batch: RolloutBatch,
    *,
    student: torch.nn.Module | None,
    teacher: torch.nn.Module | None,
    groups: ParallelGroups,
    top_k: int,
    micro_batch_size: int,
    vocab_size: int | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    lean_forward: bool = False,
) -> RolloutBatch:
    """Fill the batch's SCORE fields in place (last stage) and return it.

    Sets ``student_topk_ids``, ``student_topk_log_probs``, ``student_sampled_log_probs``,
    ``teacher_topk_ids``, ``teacher_topk_log_probs``, ``teacher_log_probs_at_student_ids``,
    ``student_log_probs_at_teacher_ids``, ``teacher_sampled_log_probs`` and
    ``overlap_ratio``; every value is 0 off the response
    (see :class:`RolloutBatch`). Other stages only run their layers; their fields stay None.

    ``teacher=None``: the teacher fields and ``student_topk_ids`` are already in the batch
    (fused teacher scoring during a chunked rollout,
    :meth:`~megatron_opd.rollout.chunk_scorer.ChunkScorer.fill_scores`), so only the
    student runs, and its log-probs are taken at those ids.

    ``student=None``: the student fields ``student_topk_ids``, ``student_topk_log_probs``
    and ``student_sampled_log_probs`` are already in the batch (recorded by the rollout
    engine from the logits it sampled from, ``generate(student_top_k=K)``), so the
    student does not run; ``student_log_probs_at_teacher_ids`` is then left None (only
    several updates per step with a teacher-side id set read it).

    A ``top_k`` equal to the vocabulary takes every id in id order (no sort; the overlap
    ratio is 1 on every response token).

    Args:
        batch: tokens and lengths on every stage (identical on all ranks of a replica).
        student, teacher: this stage's GPTModels (same pipeline layout and TP group).
        groups: this rank's groups.
        top_k: K of the top-K sets (``prune.top_k``).
        micro_batch_size: rows per forward pass.
        vocab_size: real vocabulary size (Megatron's padding ids are ignored).
        student_temperature: the student's logits are divided by it (the rollout's
            sampling temperature: its log-probs are then the sampling policy's).
        teacher_temperature: the teacher's logits are divided by it.
        lean_forward: run the no-grad forwards on the lean path where the models allow it
            (``rollout.lean_decode``; :func:`model_logits`).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if top_k < 1:
        raise ValueError(f"top_k (prune.top_k) must be >= 1, got {top_k}")
    device = groups.platform.device
    tokens = batch.tokens.to(device)
    b, s = tokens.shape
    last = groups.is_last_stage
    fused = teacher is None
    recorded = student is None
    if fused and last and (batch.teacher_topk_ids is None or batch.student_topk_ids is None):
        raise ValueError(
            "score_rollouts(teacher=None) needs the teacher's scores and the student's top-K "
            "ids in the batch (ChunkScorer.fill_scores); pass the teacher to score it here"
        )
    student_fields = ("student_topk_ids", "student_topk_log_probs", "student_sampled_log_probs")
    if recorded and last and any(getattr(batch, name) is None for name in student_fields):
        raise ValueError(
            "score_rollouts(student=None) needs the student's top-K ids, their log-probs and "
            "the sampled log-probs in the batch (generate(student_top_k=K)); pass the student "
            "to score it here"
        )
    if last:
        f32 = dict(dtype=torch.float32, device=device)
        fields = {}
        if not recorded:
            fields.update(
                student_topk_log_probs=torch.zeros(b, s, top_k, **f32),
                student_sampled_log_probs=torch.zeros(b, s, **f32),
                student_log_probs_at_teacher_ids=torch.zeros(b, s, top_k, **f32),
            )
            if not fused:
                fields["student_topk_ids"] = torch.zeros(b, s, top_k, dtype=torch.long,
                                                         device=device)  # fmt: skip
        if not fused:
            fields.update(
                teacher_topk_ids=torch.zeros(b, s, top_k, dtype=torch.long, device=device),
                teacher_topk_log_probs=torch.zeros(b, s, top_k, **f32),
                teacher_log_probs_at_student_ids=torch.zeros(b, s, top_k, **f32),
                teacher_sampled_log_probs=torch.zeros(b, s, **f32),
            )
    total = batch.total_lengths().to(device)
    prompt = batch.prompt_lengths.to(device)
    tp = groups.tp_group
    models = tuple(m for m in (student, teacher) if m is not None)
    full_vocab = False
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(eval_without_sequence_parallel(model))
        for begin in range(0, b, micro_batch_size if models else b):
            if not models:
                break
            rows = slice(begin, min(b, begin + micro_batch_size))
            length = int(total[rows].max())
            # Predictions of response tokens come from columns [first - 1, length - 1).
            first = max(int(prompt[rows].min()), 1)
            mb_tokens = tokens[rows, :length]
            lean = dict(lean=lean_forward)
            student_logits = None if recorded else model_logits(student, mb_tokens, groups, **lean)
            teacher_logits = None if fused else model_logits(teacher, mb_tokens, groups, **lean)
            if not last:
                continue
            any_logits = student_logits if student_logits is not None else teacher_logits
            real_vocab = vocab_size or any_logits.shape[-1] * groups.tp_size
            full_vocab = top_k >= real_vocab
            targets = mb_tokens[:, first:length, None]
            cols = slice(first, length)
            student_t = dict(temperature=student_temperature, vocab_size=vocab_size)
            teacher_t = dict(temperature=teacher_temperature, vocab_size=vocab_size)
            if fused:
                student_logits = student_logits[:, first - 1 : length - 1]
                s_ids = batch.student_topk_ids[rows, cols].to(device)
                t_ids = batch.teacher_topk_ids[rows, cols].to(device)
                with naming_the_model("student"):
                    s_at = vocab_parallel_log_probs(
                        student_logits, torch.cat([targets, s_ids, t_ids], dim=-1), tp,
                        **student_t,
                    )  # fmt: skip
                fields["student_topk_log_probs"][rows, cols] = s_at[..., 1 : 1 + top_k]
                fields["student_sampled_log_probs"][rows, cols] = s_at[..., 0]
                fields["student_log_probs_at_teacher_ids"][rows, cols] = s_at[..., 1 + top_k :]
                continue
            teacher_logits = teacher_logits[:, first - 1 : length - 1]
            with naming_the_model("teacher"):
                t_lp, t_ids = _topk_scores(teacher_logits, top_k, tp, full_vocab=full_vocab,
                                           **teacher_t)  # fmt: skip
            if recorded:
                s_ids = batch.student_topk_ids[rows, cols].to(device)
            else:
                student_logits = student_logits[:, first - 1 : length - 1]
                with naming_the_model("student"):
                    s_lp, s_ids = _topk_scores(student_logits, top_k, tp,
                                               full_vocab=full_vocab, **student_t)  # fmt: skip
            if full_vocab:  # every id in id order on both sides: read, don't gather again
                t_at_student = t_lp
                t_sampled = t_lp.gather(-1, targets)[..., 0]
            else:
                with naming_the_model("teacher"):
                    t_at = vocab_parallel_log_probs(
                        teacher_logits, torch.cat([targets, s_ids], dim=-1), tp, **teacher_t
                    )
                t_at_student, t_sampled = t_at[..., 1:], t_at[..., 0]
            fields["teacher_topk_ids"][rows, cols] = t_ids
            fields["teacher_topk_log_probs"][rows, cols] = t_lp
            fields["teacher_sampled_log_probs"][rows, cols] = t_sampled
            fields["teacher_log_probs_at_student_ids"][rows, cols] = t_at_student
            if recorded:
                continue
            if full_vocab:
                s_at_teacher, s_sampled = s_lp, s_lp.gather(-1, targets)[..., 0]
            else:
                with naming_the_model("student"):
                    s_at = vocab_parallel_log_probs(
                        student_logits, torch.cat([targets, t_ids], dim=-1), tp, **student_t
                    )
                s_at_teacher, s_sampled = s_at[..., 1:], s_at[..., 0]
            fields["student_topk_ids"][rows, cols] = s_ids
            fields["student_topk_log_probs"][rows, cols] = s_lp
            fields["student_sampled_log_probs"][rows, cols] = s_sampled
            fields["student_log_probs_at_teacher_ids"][rows, cols] = s_at_teacher
    if not last:
        return batch
    response = batch.response_mask().to(device)
    for name, value in fields.items():
        mask = response if value.dim() == 2 else response[..., None]
        setattr(batch, name, torch.where(mask, value, torch.zeros_like(value)))
    if recorded:
        batch.student_log_probs_at_teacher_ids = None
    if full_vocab:  # both sets are the whole vocabulary
        batch.overlap_ratio = response.float()
    else:
        batch.overlap_ratio, _ = overlap_ratio(
            batch.student_topk_ids, batch.teacher_topk_ids, response
        )
    return batch
