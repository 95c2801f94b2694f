"""The student's Megatron DDP wrapper, optimizer and learning-rate schedule."""

from __future__ import annotations

import torch

from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.config.training import TrainingConfig
from megatron_opd.distributed import ParallelGroups


def uses_distributed_optimizer(
    parallel: ParallelConfig, groups: ParallelGroups, *, fp8_param: bool = False
) -> bool:
    """Megatron's DistributedOptimizer: with ``parallel.use_distributed_optimizer`` on
    DP > 1 (nothing to shard at DP=1), and always with FP8 parameters (only it re-quantizes
    them from FP32 master shards; OPDConfig refuses fp8_param without the flag)."""
    return parallel.use_distributed_optimizer and (groups.dp_size > 1 or fp8_param)


def wrap_student_for_training(
    chunks: list[torch.nn.Module], parallel: ParallelConfig, groups: ParallelGroups
) -> list[torch.nn.Module]:
    """Megatron DDP around each student chunk (contiguous grad buffers, DP reduction).

    Sets the schedule flags OPD relies on: per-token loss normalisation (the loss_func
    returns a token sum and a token count) and variable micro-batch shapes (trimming).
    FP8 parameters (``fp8_param``) are all-gathered in FP8 (DDP's ``fp8_param_gather``).
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    wrapped = []
    for chunk in chunks:
        config = chunk.config
        fp8_param = bool(getattr(config, "fp8_param", False))
        config.calculate_per_token_loss = True
        config.variable_seq_lengths = True
        config.finalize_model_grads_func = finalize_model_grads
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=uses_distributed_optimizer(
                parallel, groups, fp8_param=fp8_param
            ),
            fp8_param_gather=fp8_param,
            check_for_nan_in_grad=False,
        )
        wrapped.append(DistributedDataParallel(config, ddp_config, chunk))
    return wrapped


def build_optimizer(
    wrapped: list[torch.nn.Module], training: TrainingConfig, parallel: ParallelConfig,
    groups: ParallelGroups,
):  # fmt: skip
    """``(optimizer, scheduler)``: Megatron Adam (AdamW decay) and its LR/WD schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model_config = wrapped[0].config
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=training.lr,
        min_lr=training.min_lr,
        weight_decay=training.weight_decay,
        adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2,
        clip_grad=training.clip_grad,
        bf16=bool(model_config.bf16),
        fp16=False,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=uses_distributed_optimizer(
            parallel, groups, fp8_param=bool(getattr(model_config, "fp8_param", False))
        ),
    )
    optimizer = get_megatron_optimizer(optimizer_config, wrapped)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if training.lr_warmup_steps else training.lr,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_steps,
        lr_decay_steps=max(training.num_steps, training.lr_warmup_steps + 1),
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.num_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def gradients_are_finite(wrapped: list[torch.nn.Module], groups: ParallelGroups) -> bool:
    """True when every gradient on every rank is finite (one all-reduce)."""
    import torch.distributed as dist

    bad = torch.zeros(1, dtype=torch.float32, device=groups.platform.device)
    for chunk in wrapped:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None and not torch.isfinite(grad).all():
                bad.fill_(1.0)
                break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0
