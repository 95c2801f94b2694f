"""Training micro-batches cut from a scored RolloutBatch by the trimming plan.

Alignment: a micro-batch of padded length ``P`` feeds ``tokens[:, :P]`` to the model; the
logits at input position ``j`` predict ``tokens[:, j + 1]``, so every per-token tensor of
the RolloutBatch (entry ``t`` predicts ``tokens[:, t]``) is shifted left by one: micro-batch
column ``j`` holds entry ``j + 1``. The last column has no target and gets weight 0.

Only the last pipeline stage holds the loss inputs (scores, weights); the first stage
needs the tokens; every stage needs the shapes, which come from the plan broadcast before
the schedule starts.

FP8: Transformer Engine's FP8 GEMMs need the token count (rows x padded length) to be a
multiple of 16 (32 for MXFP8), per TP rank under sequence parallelism. ``pad_to_multiple``
(:func:`micro_batch_token_multiple`) widens every micro-batch to a multiple of it with
pad tokens of zero loss weight after every real token: the loss and its gradients do not
change (causal attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_opd.config.model import ModelConfig
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.models.fp8 import fp8_align_size
from megatron_opd.prune.trimming import TrimPlan
from megatron_opd.rollout.batch import RolloutBatch


@dataclass(kw_only=True)
class TrainMicroBatch:
    """One micro-batch of the training schedule."""

    tokens: torch.Tensor
    """``[r, P]`` int64 model input."""

    position_ids: torch.Tensor
    """``[r, P]`` int64."""

    num_tokens: int
    """Normaliser contribution: valid response tokens of these rows in the *untrimmed*
    batch (plus those of dropped rows on the first micro-batch), so trimming never changes
    the token-mean."""

    loss_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Last stage only: per-token loss tensors ``[r, P, ...]`` already shifted to the input
    positions (``valid_mask``, ``loss_weights``, ``target_ids``, and the scores the loss
    kind needs)."""

    def to(self, device: torch.device) -> TrainMicroBatch:
        """This micro-batch with every tensor on ``device``."""
        return TrainMicroBatch(
            tokens=self.tokens.to(device),
            position_ids=self.position_ids.to(device),
            num_tokens=self.num_tokens,
            loss_inputs={k: v.to(device) for k, v in self.loss_inputs.items()},
        )


def micro_batch_token_multiple(student: ModelConfig, parallel: ParallelConfig) -> int:
    """Padded length multiple of a training micro-batch: the FP8 GEMM alignment (1 without
    FP8), times the TP size under sequence parallelism (each rank holds ``P / TP``)."""
    align = fp8_align_size(student)
    if parallel.sequence_parallel:
        return align * parallel.tensor_parallel_size
    return align


def _pad_columns(piece: torch.Tensor, multiple: int, value) -> torch.Tensor:
    width = piece.shape[1]
    target = -(-width // multiple) * multiple
    if target == width:
        return piece
    padded = piece.new_full((piece.shape[0], target, *piece.shape[2:]), value)
    padded[:, :width] = piece
    return padded


def _shift_left(pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    shifted = []
    for piece in pieces:
        out = torch.zeros_like(piece)
        out[:, :-1] = piece[:, 1:]
        shifted.append(out)
    return shifted


def build_micro_batches(
    batch: RolloutBatch,
    plan: TrimPlan,
    *,
    is_last_stage: bool,
    loss_tensor_names: tuple[str, ...],
    pad_to_multiple: int = 1,
) -> list[TrainMicroBatch]:
    """Cut ``batch`` into the plan's micro-batches (an empty plan gives one zero-weight
    micro-batch so data-parallel gradient reductions stay in step); each micro-batch's
    width is rounded up to ``pad_to_multiple`` (FP8; see the module docstring)."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    if not plan.micro_batches:
        plan = _placeholder_plan(batch)
        dropped_all = True
    else:
        dropped_all = False
    response_mask = batch.response_mask()
    valid_per_row = response_mask.sum(dim=1)
    kept = plan.kept_lengths > 0
    dropped_tokens = int(valid_per_row[~kept.to(valid_per_row.device)].sum().item())
    token_pieces = plan.pack(batch.tokens, pad_value=batch.pad_id)
    loss_pieces: dict[str, list[torch.Tensor]] = {}
    if is_last_stage:
        sources = {
            "valid_mask": response_mask,
            "target_ids": batch.tokens,
            "loss_weights": torch.zeros_like(batch.loss_weights)
            if dropped_all
            else batch.loss_weights,
        }
        for name in loss_tensor_names:
            value = getattr(batch, name, None)
            if value is None:
                value = batch.extras.get(name)
            if value is None:
                raise ValueError(f"the loss needs {name!r}, which scoring did not produce")
            sources[name] = value
        for name, value in sources.items():
            loss_pieces[name] = _shift_left(plan.pack(value))
    if pad_to_multiple > 1:
        token_pieces = [_pad_columns(p, pad_to_multiple, batch.pad_id) for p in token_pieces]
        loss_pieces = {
            name: [_pad_columns(p, pad_to_multiple, 0) for p in pieces]
            for name, pieces in loss_pieces.items()
        }
    micro_batches = []
    for index, (mb, tokens) in enumerate(zip(plan.micro_batches, token_pieces)):
        rows = torch.tensor(mb.rows, dtype=torch.long)
        num_tokens = int(valid_per_row[rows].sum().item())
        if index == 0:
            num_tokens += dropped_tokens
        if dropped_all:
            num_tokens = int(valid_per_row.sum().item()) if index == 0 else 0
        positions = torch.arange(tokens.shape[1], dtype=torch.long)[None, :].expand_as(tokens)
        micro_batches.append(
            TrainMicroBatch(
                tokens=tokens,
                position_ids=positions.contiguous(),
                num_tokens=num_tokens,
                loss_inputs={name: pieces[index] for name, pieces in loss_pieces.items()},
            )
        )
    return micro_batches


def _placeholder_plan(batch: RolloutBatch) -> TrimPlan:
    from megatron_opd.prune.trimming import MicroBatchPlan

    length = min(2, batch.seq_length)
    kept = torch.zeros(batch.batch_size, dtype=torch.int64)
    return TrimPlan(
        batch_size=batch.batch_size,
        seq_length=batch.seq_length,
        kept_lengths=kept,
        micro_batches=[MicroBatchPlan(rows=[0], lengths=[length], padded_length=length)],
    )
