"""Megatron's schedule contract for OPD: ``forward_step(data_iterator, model)``.

``forward_step`` runs the student on one trimmed micro-batch and returns the output with a
``loss_func``. On the last pipeline stage ``loss_func`` receives the vocab-sharded logits
``[r, P, V/TP]``, gathers the student's log-probs at exactly the ids the loss needs
(vocabulary-parallel, with grad), and calls :func:`megatron_opd.losses.opd_loss`.

PPO "old" log-probs. With one optimizer update per rollout the behaviour policy *is* the
current policy, so they are the detached current ones (the ratio is 1 in value; its
gradient is the policy gradient), which keeps the ratio free of any numerical difference
between forwards. With several updates per rollout (``training.num_mini_batches`` or
``num_epochs`` > 1) the later updates are off-policy: the old log-probs are then the
scoring pass's student log-probs (same model and kernels as training, before this step's
first update), and the PPO ratio and clip bound how far each update moves.

Temperature. As in the authors' release, the student's training (and scoring) logits are
divided by the rollout's sampling temperature, so the log-probs the loss moves are those
of the policy that sampled (and the teacher's by ``loss.teacher_temperature``).

The loss is summed over tokens and the returned ``num_tokens`` is the micro-batch's share
of the *untrimmed* valid-token count, so with ``calculate_per_token_loss`` Megatron divides
the gradients by the same normaliser whether or not the batch was trimmed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from megatron_opd.config.prune import LossConfig
from megatron_opd.losses import build_id_set, opd_loss
from megatron_opd.ops.vocab_parallel import vocab_parallel_log_probs
from megatron_opd.training.micro_batches import TrainMicroBatch

_TOPK_SET_KINDS = ("topk_reverse_kl_pg", "topk_reverse_kl")
_TEACHER_TOPK_KINDS = ("forward_topk_kl", "gkd_jsd")


def loss_tensor_names(
    loss_config: LossConfig, *, old_from_scoring: bool = False
) -> tuple[str, ...]:
    """RolloutBatch fields the loss of ``loss_config.kind`` reads (beyond masks/weights);
    ``old_from_scoring``: the PPO old log-probs come from scoring (several updates per step)."""
    if loss_config.kind in _TOPK_SET_KINDS:
        names = ["student_topk_ids", "teacher_topk_ids", "teacher_log_probs_at_student_ids"]
        if loss_config.id_set in ("only_tch", "union"):
            names.append("teacher_topk_log_probs")
        if old_from_scoring and loss_config.kind == "topk_reverse_kl_pg":
            names.append("student_topk_log_probs")
            if loss_config.id_set in ("only_tch", "union"):
                names.append("student_log_probs_at_teacher_ids")
        return tuple(names)
    if loss_config.kind in _TEACHER_TOPK_KINDS:
        return ("teacher_topk_ids", "teacher_topk_log_probs")
    if old_from_scoring:
        return ("teacher_sampled_log_probs", "student_sampled_log_probs")
    return ("teacher_sampled_log_probs",)


def _scored_old_log_probs(loss_config: LossConfig, inputs: dict[str, torch.Tensor]):
    """Scoring-time student log-probs at the id set, in :func:`build_id_set`'s layout."""
    if loss_config.id_set in ("only_stu", "intersection"):
        return inputs["student_topk_log_probs"]
    if loss_config.id_set == "only_tch":
        return inputs["student_log_probs_at_teacher_ids"]
    return torch.cat(
        [inputs["student_topk_log_probs"], inputs["student_log_probs_at_teacher_ids"]], dim=-1
    )


def _ids_and_teacher_log_probs(loss_config: LossConfig, inputs: dict[str, torch.Tensor]):
    """``(ids [r, P, m], id_mask [r, P, m] or None, teacher_log_probs [r, P, m])``."""
    if loss_config.kind in _TEACHER_TOPK_KINDS:
        return inputs["teacher_topk_ids"], None, inputs["teacher_topk_log_probs"]
    ids, id_mask = build_id_set(
        inputs["student_topk_ids"], inputs["teacher_topk_ids"], loss_config.id_set
    )
    at_student = inputs["teacher_log_probs_at_student_ids"]
    if loss_config.id_set in ("only_stu", "intersection"):
        teacher = at_student
    elif loss_config.id_set == "only_tch":
        teacher = inputs["teacher_topk_log_probs"]
    else:  # union: student ids first, then the teacher's (layout of build_id_set)
        teacher = torch.cat([at_student, inputs["teacher_topk_log_probs"]], dim=-1)
    return ids, id_mask, teacher


def compute_micro_batch_loss(
    logits: torch.Tensor,
    micro_batch: TrainMicroBatch,
    *,
    loss_config: LossConfig,
    tp_group,
    vocab_size: int,
    old_from_scoring: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, num_tokens, report)`` of one micro-batch from its sharded logits;
    ``old_from_scoring``: PPO old log-probs from scoring instead of the detached current ones
    (module essay); ``temperature``: the logits are divided by it (the rollout's)."""
    inputs = micro_batch.loss_inputs
    valid = inputs["valid_mask"].bool()
    loss_weights = inputs["loss_weights"].to(torch.float32)
    if loss_config.kind == "sampled_reverse_kl_pg":
        ids = inputs["target_ids"][..., None]
        student = vocab_parallel_log_probs(
            logits, ids, tp_group, vocab_size=vocab_size, temperature=temperature
        )[..., 0]
        tensors = {
            "student_log_probs": student,
            "old_student_log_probs": inputs["student_sampled_log_probs"].to(torch.float32)
            if old_from_scoring
            else student.detach(),
            "teacher_log_probs": inputs["teacher_sampled_log_probs"].to(torch.float32),
        }
    else:
        ids, id_mask, teacher = _ids_and_teacher_log_probs(loss_config, inputs)
        student = vocab_parallel_log_probs(
            logits, ids, tp_group, vocab_size=vocab_size, temperature=temperature
        )
        tensors = {"student_log_probs": student, "teacher_log_probs": teacher.to(torch.float32)}
        if loss_config.kind == "topk_reverse_kl_pg":
            tensors["old_student_log_probs"] = (
                _scored_old_log_probs(loss_config, inputs).to(torch.float32)
                if old_from_scoring
                else student.detach()
            )
        if id_mask is not None:
            tensors["id_mask"] = id_mask
    loss_sum, _, metrics = opd_loss(
        loss_config, valid_mask=valid, loss_weights=loss_weights, **tensors
    )
    num_tokens = torch.tensor(micro_batch.num_tokens, dtype=torch.int, device=loss_sum.device)
    report = {"loss": torch.stack([loss_sum.detach().float(), num_tokens.float()])}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            report[key] = value.detach().float().reshape(1)
    return loss_sum, num_tokens, report


def make_forward_step(
    *,
    loss_config: LossConfig,
    tp_group,
    vocab_size: int,
    is_last_stage: bool,
    device: torch.device,
    old_from_scoring: bool = False,
    temperature: float = 1.0,
) -> Callable:
    """The ``forward_step_func`` for ``get_forward_backward_func()`` (``old_from_scoring``,
    ``temperature``: see :func:`compute_micro_batch_loss`)."""

    def forward_step(data_iterator: Iterator[TrainMicroBatch], model):
        micro_batch = next(data_iterator).to(device)
        output = model(micro_batch.tokens, micro_batch.position_ids, None)

        def loss_func(output_tensor: torch.Tensor):
            assert is_last_stage
            return compute_micro_batch_loss(
                output_tensor,
                micro_batch,
                loss_config=loss_config,
                tp_group=tp_group,
                vocab_size=vocab_size,
                old_from_scoring=old_from_scoring,
                temperature=temperature,
            )

        return output, loss_func

    return forward_step
