"""One rank's slice of a tensor-parallel vocabulary, and the input checks every op shares.

Megatron shards the output layer over the tensor-parallel (TP) group: rank ``r`` of ``TP``
holds the logits of global ids ``[r * V_local, (r + 1) * V_local)`` (``VocabUtility``), where
``V_local * TP`` is the *padded* vocabulary. Ids at or above the real ``vocab_size`` are
Megatron's padding: their logits are garbage, they never win a top-K and carry no
probability. Rather than masking them to ``-inf`` in a copy, every op here reads only the
first :attr:`VocabShard.num_valid` columns of its shard (a view), which is the same thing.

Errors and hangs. A rank that raises while the others enter a collective would leave the
others blocked until the process-group timeout. So every op first exchanges a few numbers
that describe its arguments (shard width, token count, ids shape and checksum, k, vocab_size,
temperature) in one tiny all-gather, and only then checks them: every rank sees the same
table and raises the same ``ValueError``. NaN and ``+inf`` logits are found per chunk on the
rank that holds them; the ops poison that row's exchanged values with NaN, so every rank sees
it after the exchange it was going to do anyway and raises together at the end of the call.
``-inf`` is accepted as a mask (probability 0) as long as enough ids remain.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
"""Per-chunk working-set target: tokens per chunk = this / (4 bytes * local vocab width)."""


@dataclass(frozen=True, kw_only=True)
class VocabShard:
    """Where this rank's ``[..., V_local]`` logits sit in the global vocabulary."""

    tp_group: dist.ProcessGroup | None
    """Tensor-parallel group the vocabulary is split over (None: not split)."""
    tp_rank: int
    """This rank's position in ``tp_group``."""
    tp_size: int
    """Ranks in ``tp_group``."""
    local_size: int
    """``V_local``: columns of this rank's logits (padded vocabulary / TP)."""
    vocab_size: int
    """Real vocabulary size; ids ``>= vocab_size`` are padding."""

    @property
    def padded_vocab_size(self) -> int:
        """``V_local * TP``."""
        return self.local_size * self.tp_size

    @property
    def vocab_start(self) -> int:
        """First global id of this shard."""
        return self.tp_rank * self.local_size

    @property
    def num_valid(self) -> int:
        """Columns of this shard below ``vocab_size`` (the rest is padding)."""
        return max(0, min(self.local_size, self.vocab_size - self.vocab_start))

    @property
    def distributed(self) -> bool:
        """True when collectives are needed (TP > 1)."""
        return self.tp_size > 1


def group_rank_and_size(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, size)`` of ``tp_group``; ``(0, 1)`` for None or without a process group."""
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def all_gather_stacked(tensor: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """``[TP, *tensor.shape]``: every rank's ``tensor``, in TP-rank order."""
    if not shard.distributed:
        return tensor.unsqueeze(0)
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(shard.tp_size)]
    dist.all_gather(parts, tensor, group=shard.tp_group)
    return torch.stack(parts)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-chunk math: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_chunk(raw: torch.Tensor, temperature: float) -> tuple[torch.Tensor, bool]:
    """``raw / temperature`` in the compute dtype, and whether it is a private copy.

    ``raw`` is a ``[c, v]`` view of the caller's logits. A float32 input at temperature 1
    is returned as is (no copy; it must not be written to); anything else is one
    chunk-sized buffer the caller may overwrite.
    """
    dtype = compute_dtype(raw.dtype)
    if raw.dtype == dtype:
        if temperature == 1.0:
            return raw, False
        return raw / temperature, True
    out = raw.to(dtype)
    if temperature != 1.0:
        out.div_(temperature)
    return out, True


def chunk_ranges(num_tokens: int, chunk_tokens: int) -> Iterator[tuple[int, int]]:
    """``[start, end)`` token ranges of at most ``chunk_tokens``."""
    for start in range(0, num_tokens, chunk_tokens):
        yield start, min(num_tokens, start + chunk_tokens)


def chunk_tokens_for(chunk_size: int | None, local_size: int) -> int:
    """Tokens per chunk: ``chunk_size`` or the :data:`DEFAULT_CHUNK_BYTES` budget."""
    if chunk_size is not None:
        return chunk_size
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, local_size)))


def raise_if_nonfinite(bad_rows: torch.Tensor, name: str, shard: VocabShard) -> None:
    """Raise (identically on every rank) when any token's logits were non-finite.

    ``bad_rows`` is ``[N]`` bool, already identical on every rank (derived from exchanged
    values), so no extra collective is needed here.
    """
    if bad_rows.numel() and bool(bad_rows.any()):
        first = int(bad_rows.nonzero()[0, 0])
        count = int(bad_rows.sum())
        raise ValueError(
            f"{name} holds NaN or +inf in the real vocabulary (ids < vocab_size="
            f"{shard.vocab_size}), or too few entries above -inf (none, or fewer than k), at "
            f"{count} token(s), the first at flattened token {first}; fix the model output "
            "(e.g. overflow in low precision) or the mask (-inf marks a masked id)"
        )


def _meta_row(
    logits: torch.Tensor,
    *,
    global_ids: torch.Tensor | None,
    k: int | None,
    vocab_size: int | None,
    temperature: float,
    chunk_size: int | None,
) -> list[float]:
    """Numbers describing one rank's arguments; built without raising on bad input."""
    lead = math.prod(logits.shape[:-1]) if logits.ndim >= 1 else -1
    row = [
        float(logits.ndim),
        float(logits.shape[-1]) if logits.ndim >= 1 else -1.0,
        float(lead),
        float(k) if isinstance(k, int) else -1.0,
        float(vocab_size) if isinstance(vocab_size, int) else -1.0,
        float(temperature) if isinstance(temperature, (int, float)) else -1.0,
        float(chunk_size) if isinstance(chunk_size, int) else -1.0,
        -1.0,
        0.0,
    ]
    if isinstance(global_ids, torch.Tensor):
        row[7] = float(global_ids.numel())
        if global_ids.numel() and not global_ids.is_floating_point():
            row[8] = float(global_ids.sum().item())
    return row


_META_FIELDS = (
    "logits.ndim",
    "logits.shape[-1] (local vocabulary shard V_local)",
    "tokens (product of logits' leading dims)",
    "k",
    "vocab_size",
    "temperature",
    "chunk_size",
    "global_ids.numel()",
    "global_ids checksum",
)


def agree_across_ranks(shard_group, tp_size: int, row: list[float], device) -> None:
    """All-gather ``row`` over the TP group; raise the same ValueError on every rank if the
    ranks disagree (different shard widths, token counts, ids, k, ...)."""
    if tp_size <= 1:
        return
    mine = torch.tensor(row, dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(tp_size)]
    dist.all_gather(parts, mine, group=shard_group)
    table = torch.stack(parts).cpu()
    for column, field in enumerate(_META_FIELDS):
        values = table[:, column]
        if bool((values != values[0]).any()):
            listed = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(values.tolist()))
            if column == 1:
                fix = (
                    "every tensor-parallel rank must hold an equal slice of the padded "
                    "vocabulary; pad the vocabulary to a multiple of "
                    "make_vocab_size_divisible_by * tensor_parallel_size"
                )
            else:
                fix = (
                    "pass the same token layout, ids and options on every tensor-parallel "
                    "rank (only the vocabulary is split)"
                )
            raise ValueError(f"{field} differs across tensor-parallel ranks ({listed}); {fix}")


def make_shard(
    logits: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    *,
    name: str = "logits",
    vocab_size: int | None,
    temperature: float,
    chunk_size: int | None,
    k: int | None = None,
    global_ids: torch.Tensor | None = None,
    ids_name: str = "global_ids",
) -> VocabShard:
    """Check an op's arguments (same verdict on every rank) and describe the shard."""
    tp_rank, tp_size = group_rank_and_size(tp_group)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [..., V_local], got {type(logits)}")
    if tp_size > 1:
        row = _meta_row(
            logits,
            global_ids=global_ids,
            k=k,
            vocab_size=vocab_size,
            temperature=temperature,
            chunk_size=chunk_size,
        )
        agree_across_ranks(tp_group, tp_size, row, logits.device)
    if logits.ndim < 1 or not logits.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor [..., V_local] (last dim = this rank's "
            f"vocabulary shard), got dtype {logits.dtype} and shape {tuple(logits.shape)}"
        )
    local_size = logits.shape[-1]
    if local_size < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension; pass [..., V_local]")
    padded = local_size * tp_size
    if vocab_size is None:
        vocab_size = padded
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(
            f"vocab_size must be a positive int (the real vocabulary), got {vocab_size!r}"
        )
    if vocab_size > padded:
        raise ValueError(
            f"vocab_size={vocab_size} is larger than the padded vocabulary {padded} = "
            f"{name}.shape[-1] ({local_size}) * tensor-parallel size ({tp_size}); pass the "
            "real vocabulary size, and this rank's [..., V/TP] shard as logits"
        )
    if (
        not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(
            f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}"
        )
    if k is not None and (
        not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab_size
    ):
        raise ValueError(
            f"k={k!r} must be an int in [1, vocab_size={vocab_size}]; choose a smaller k"
        )
    if global_ids is not None:
        check_ids(global_ids, logits, vocab_size, name=name, ids_name=ids_name)
    return VocabShard(
        tp_group=tp_group,
        tp_rank=tp_rank,
        tp_size=tp_size,
        local_size=local_size,
        vocab_size=vocab_size,
    )


def check_ids(
    global_ids: torch.Tensor, logits: torch.Tensor, vocab_size: int, *, name: str, ids_name: str
) -> None:
    """``global_ids`` must be integer ``[..., n]`` with ``logits``' leading dims, in range."""
    if (
        not isinstance(global_ids, torch.Tensor)
        or global_ids.is_floating_point()
        or (global_ids.dtype == torch.bool)
    ):
        raise ValueError(f"{ids_name} must be an integer tensor [..., n] of global vocabulary ids")
    if global_ids.ndim != logits.ndim or global_ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"{ids_name} has shape {tuple(global_ids.shape)} but {name} has "
            f"{tuple(logits.shape)}; {ids_name} must be [..., n] with the same leading dims "
            f"{tuple(logits.shape[:-1])}"
        )
    if global_ids.numel():
        low, high = int(global_ids.min()), int(global_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{ids_name} holds ids in [{low}, {high}] but must lie in [0, vocab_size="
                f"{vocab_size}); ids are global vocabulary ids (not shard-local), padding ids "
                "are not allowed"
            )
