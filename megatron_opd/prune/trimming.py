"""Training-side trimming: cut tokens whose loss weight is 0 and re-pack what is left.

With causal attention a token only influences the outputs at its own and later
positions. So if a sample's last non-zero loss weight is at position ``t`` (entry ``t``
predicts ``tokens[t]`` from ``tokens[:t]``, as in RolloutBatch), the training forward
and backward need ``tokens[: t + 1]`` and nothing after: the kept length is ``t + 1``
(prompt included). A sample without any non-zero loss weight is dropped.

Kept samples are re-packed into micro-batches deterministically: sorted by kept length
(longest first, ties by row index), then filled in order while

    rows * padded_length <= max_tokens   and   rows <= max_rows

where ``padded_length`` is the first (longest) row's length rounded up to
``pad_to_multiple``. A single row longer than ``max_tokens`` gets a micro-batch of its
own (sequences are never split). Every kept token lands in exactly one micro-batch.

The plan lives on the last pipeline stage (where the logits are) and is broadcast to
every stage before the schedule starts: :meth:`TrimPlan.to_tensor` /
:meth:`TrimPlan.from_tensor` give a flat int64 encoding. :meth:`TrimPlan.pack` cuts a
``[b, s, ...]`` tensor into the micro-batches and :meth:`TrimPlan.scatter_back` puts
per-micro-batch results back in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MAGIC = 0x7072756E  # "prun": guards from_tensor against a wrong tensor.


@dataclass(kw_only=True)
class MicroBatchPlan:
    """One training micro-batch of the plan."""

    rows: list[int]
    """Rows of the original ``[b, s]`` batch, in micro-batch order."""

    lengths: list[int]
    """Kept length of each row (tokens ``[0, length)`` of the row)."""

    padded_length: int
    """Sequence length of the micro-batch (>= every length; a multiple of the padding
    multiple unless capped at the original ``s``)."""

    @property
    def num_tokens(self) -> int:
        """Kept tokens in this micro-batch."""
        return sum(self.lengths)


@dataclass(kw_only=True)
class TrimPlan:
    """Kept lengths of a batch and its re-packing into micro-batches."""

    batch_size: int
    """``b`` of the original batch."""

    seq_length: int
    """``s`` of the original batch."""

    kept_lengths: torch.Tensor
    """``[b]`` int64: tokens kept per row (0: row dropped)."""

    micro_batches: list[MicroBatchPlan]
    """The micro-batches, in schedule order."""

    @property
    def num_kept_tokens(self) -> int:
        """Tokens kept over the whole batch."""
        return int(self.kept_lengths.sum().item())

    @property
    def max_padded_length(self) -> int:
        """Longest micro-batch (for schedules that need one shape)."""
        return max((mb.padded_length for mb in self.micro_batches), default=0)

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Flat int64 encoding on ``device``: ``[magic, b, s, n_mb, kept_lengths (b), then
        per micro-batch: n_rows, padded_length, rows...]``."""
        values = [_MAGIC, self.batch_size, self.seq_length, len(self.micro_batches)]
        values += self.kept_lengths.tolist()
        for mb in self.micro_batches:
            values += [len(mb.rows), mb.padded_length, *mb.rows]
        return torch.tensor(values, dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, encoded: torch.Tensor) -> TrimPlan:
        """Inverse of :meth:`to_tensor` (on any device)."""
        values = encoded.reshape(-1).tolist()
        if len(values) < 4 or values[0] != _MAGIC:
            raise ValueError("tensor is not a TrimPlan encoding (bad magic number)")
        batch_size, seq_length, num_micro_batches = values[1:4]
        kept = values[4 : 4 + batch_size]
        cursor = 4 + batch_size
        micro_batches = []
        for _ in range(num_micro_batches):
            num_rows, padded_length = values[cursor], values[cursor + 1]
            rows = values[cursor + 2 : cursor + 2 + num_rows]
            cursor += 2 + num_rows
            micro_batches.append(
                MicroBatchPlan(
                    rows=rows, lengths=[kept[r] for r in rows], padded_length=padded_length
                )
            )
        if cursor != len(values):
            raise ValueError("TrimPlan encoding has trailing values; it is corrupt")
        return cls(
            batch_size=batch_size,
            seq_length=seq_length,
            kept_lengths=torch.tensor(kept, dtype=torch.int64),
            micro_batches=micro_batches,
        )

    def pack(self, tensor: torch.Tensor, pad_value: float | int = 0) -> list[torch.Tensor]:
        """Cut ``tensor [b, s, ...]`` into ``[rows_i, padded_length_i, ...]`` pieces; columns
        past a row's kept length are ``pad_value``."""
        if tensor.shape[:2] != (self.batch_size, self.seq_length):
            raise ValueError(
                f"tensor has shape {tuple(tensor.shape)}, the plan is for "
                f"[{self.batch_size}, {self.seq_length}, ...]"
            )
        pieces = []
        for mb in self.micro_batches:
            piece = tensor.new_full((len(mb.rows), mb.padded_length, *tensor.shape[2:]), pad_value)
            for i, (row, length) in enumerate(zip(mb.rows, mb.lengths)):
                piece[i, :length] = tensor[row, :length]
            pieces.append(piece)
        return pieces

    def scatter_back(
        self, per_micro_batch_tensors: Sequence[torch.Tensor], fill_value: float | int = 0
    ) -> torch.Tensor:
        """Put per-micro-batch results ``[rows_i, >= padded_length_i, ...]`` back into a
        ``[b, s, ...]`` tensor; trimmed positions and dropped rows get ``fill_value``."""
        if len(per_micro_batch_tensors) != len(self.micro_batches):
            raise ValueError(
                f"got {len(per_micro_batch_tensors)} tensors for {len(self.micro_batches)} "
                "micro-batches"
            )
        if not per_micro_batch_tensors:
            raise ValueError("the plan has no micro-batches; nothing to scatter back")
        first = per_micro_batch_tensors[0]
        out = first.new_full((self.batch_size, self.seq_length, *first.shape[2:]), fill_value)
        for piece, mb in zip(per_micro_batch_tensors, self.micro_batches):
            if piece.shape[0] != len(mb.rows) or piece.shape[1] < max(mb.lengths):
                raise ValueError(
                    f"micro-batch piece has shape {tuple(piece.shape)}, expected "
                    f"[{len(mb.rows)}, {mb.padded_length}, ...]"
                )
            for i, (row, length) in enumerate(zip(mb.rows, mb.lengths)):
                out[row, :length] = piece[i, :length]
        return out


def kept_lengths(loss_weights: torch.Tensor) -> torch.Tensor:
    """``[b]`` int64: one past the last position with a non-zero loss weight (0 if none)
    of ``loss_weights [b, s]``."""
    if loss_weights.dim() != 2:
        raise ValueError(f"loss_weights must be [b, s], got shape {tuple(loss_weights.shape)}")
    if loss_weights.shape[1] == 0:
        return torch.zeros(loss_weights.shape[0], dtype=torch.int64)
    positions = torch.arange(1, loss_weights.shape[1] + 1, device=loss_weights.device)
    return torch.where(loss_weights != 0, positions, 0).amax(dim=-1).to(torch.int64)


def plan_trimming(
    loss_weights: torch.Tensor,
    *,
    max_tokens: int | None = None,
    max_rows: int | None = None,
    pad_to_multiple: int = 1,
    trim: bool = True,
) -> TrimPlan:
    """Kept lengths of ``loss_weights [b, s]`` and their packing into micro-batches.

    Args:
        loss_weights: ``[b, s]`` aligned with tokens (entry t predicts ``tokens[t]``).
        max_tokens: at most ``rows * padded_length`` tokens per micro-batch (None: no cap).
        max_rows: at most this many rows per micro-batch (None: no cap).
        pad_to_multiple: round each micro-batch's padded length up to a multiple of this
            (e.g. the tensor-parallel size with sequence parallelism), capped at ``s``.
        trim: False keeps every row whole (length ``s``) but still drops rows without
            any non-zero loss weight and packs the same way.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens (training.micro_batch_tokens) must be >= 1, got {max_tokens}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows (training.max_micro_batch_rows) must be >= 1, got {max_rows}")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    lengths = kept_lengths(loss_weights).cpu()
    batch_size, seq_length = loss_weights.shape
    if not trim:
        lengths = torch.where(lengths > 0, seq_length, 0)
    order = sorted(
        (row for row in range(batch_size) if lengths[row] > 0),
        key=lambda row: (-int(lengths[row]), row),
    )

    def padded(length: int) -> int:
        return min(-(-length // pad_to_multiple) * pad_to_multiple, seq_length)

    micro_batches: list[MicroBatchPlan] = []
    current: list[int] = []
    for row in order:
        if current:
            width = padded(int(lengths[current[0]]))
            fits_tokens = max_tokens is None or (len(current) + 1) * width <= max_tokens
            fits_rows = max_rows is None or len(current) + 1 <= max_rows
            if not (fits_tokens and fits_rows):
                micro_batches.append(_micro_batch(current, lengths, padded))
                current = []
        current.append(row)
    if current:
        micro_batches.append(_micro_batch(current, lengths, padded))
    return TrimPlan(
        batch_size=batch_size,
        seq_length=seq_length,
        kept_lengths=lengths,
        micro_batches=micro_batches,
    )


def _micro_batch(rows: list[int], lengths: torch.Tensor, padded) -> MicroBatchPlan:
    row_lengths = [int(lengths[r]) for r in rows]
    return MicroBatchPlan(
        rows=list(rows), lengths=row_lengths, padded_length=padded(max(row_lengths))
    )
