"""Parameter mappings between HF tensors and Megatron tensor-parallel shards.

A mapping pairs one Megatron parameter name with the HF tensor(s) it is made of, both as
patterns where ``*`` stands for the (global) layer index. Each mapping knows:

- ``hf_shapes(info)``: the full shapes the HF tensors must have (checked before loading);
- ``load_shard(reader, hf_names, info, tp_rank, tp_size)``: this TP rank's shard, reading
  only the rows/columns it needs from the safetensors file (``reader.read`` slices);
- ``to_hf(shards, hf_names, info)``: the HF tensors from the TP shards in rank order.

Layouts (Megatron 0.16, rows = output features):

- column-parallel weights split dim 0, row-parallel weights split dim 1, norms replicate;
- vocabulary-parallel embedding/output: rows padded with zeros from ``vocab_size`` to
  ``padded_vocab_size``, then split dim 0;
- ``linear_qkv``: for each of the ``g`` query groups in order, its ``n/g`` query heads,
  then its key head, then its value head (``head_dim`` rows each). A TP shard is a
  contiguous run of whole groups, which is why TP must divide the number of kv heads;
- ``linear_fc1`` (SwiGLU): each TP shard is ``[gate_shard; up_shard]``, so gathering the
  shards is not a plain concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_opd.models.hf_config import ModelInfo


class TensorReader(Protocol):
    """Reads (slices of) named HF tensors; see ``hf_io.SafetensorsReader``."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int = 0):
        """Whole tensor, or ``[start, end)`` along ``dim``."""
        ...


def _split(size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    assert size % tp_size == 0, (size, tp_size)
    per_rank = size // tp_size
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


@dataclass(frozen=True)
class Mapping:
    """Base: Megatron name pattern and the HF name patterns it is built from."""

    megatron: str
    """Megatron parameter name, ``*`` for the layer index."""
    hf: tuple[str, ...]
    """HF tensor names, ``*`` for the layer index."""

    def hf_shapes(self, info: ModelInfo) -> tuple[tuple[int, ...], ...]:
        raise NotImplementedError

    def load_shard(self, reader, hf_names, info, tp_rank, tp_size) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, shards: list[torch.Tensor], hf_names, info) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class Replicated(Mapping):
    """Same tensor on every TP rank (norm weights)."""

    size: str = "hidden_size"
    """ModelInfo field giving the length of this 1-D tensor."""

    def hf_shapes(self, info):
        return ((getattr(info, self.size),),)

    def load_shard(self, reader, hf_names, info, tp_rank, tp_size):
        return reader.read(hf_names[0])

    def to_hf(self, shards, hf_names, info):
        return {hf_names[0]: shards[0]}


@dataclass(frozen=True)
class Linear(Mapping):
    """A weight split along ``tp_dim`` (0: column-parallel, 1: row-parallel)."""

    tp_dim: int = 0
    """Dimension split over TP ranks."""
    rows: str = "hidden_size"
    """ModelInfo expression for dim 0 of the HF weight."""
    cols: str = "hidden_size"
    """ModelInfo expression for dim 1 of the HF weight."""

    def hf_shapes(self, info):
        return ((_size(info, self.rows), _size(info, self.cols)),)

    def load_shard(self, reader, hf_names, info, tp_rank, tp_size):
        start, end = _split(reader.shape(hf_names[0])[self.tp_dim], tp_rank, tp_size)
        return reader.read(hf_names[0], self.tp_dim, start, end)

    def to_hf(self, shards, hf_names, info):
        return {hf_names[0]: torch.cat(shards, dim=self.tp_dim)}


@dataclass(frozen=True)
class VocabRows(Mapping):
    """Embedding or output layer: ``[vocab, h]`` padded to ``[padded_vocab, h]``, dim 0."""

    def hf_shapes(self, info):
        return ((info.vocab_size, info.hidden_size),)

    def load_shard(self, reader, hf_names, info, tp_rank, tp_size):
        start, end = _split(info.padded_vocab_size, tp_rank, tp_size)
        real_end = min(end, info.vocab_size)
        shard = torch.zeros((end - start, info.hidden_size), dtype=reader.dtype(hf_names[0]))
        if real_end > start:
            shard[: real_end - start] = reader.read(hf_names[0], 0, start, real_end)
        return shard

    def to_hf(self, shards, hf_names, info):
        return {hf_names[0]: torch.cat(shards, dim=0)[: info.vocab_size].clone()}


@dataclass(frozen=True)
class FusedQKV(Mapping):
    """q, k, v projections (weights ``[*, h]`` or biases ``[*]``) into ``linear_qkv``."""

    def hf_shapes(self, info):
        q_rows = info.num_attention_heads * info.head_dim
        kv_rows = info.num_query_groups * info.head_dim
        tail = () if self.megatron.endswith("bias") else (info.hidden_size,)
        return ((q_rows, *tail), (kv_rows, *tail), (kv_rows, *tail))

    def load_shard(self, reader, hf_names, info, tp_rank, tp_size):
        d = info.head_dim
        groups = info.num_query_groups
        heads_per_group = info.num_attention_heads // groups
        g0, g1 = _split(groups, tp_rank, tp_size)
        q = reader.read(hf_names[0], 0, g0 * heads_per_group * d, g1 * heads_per_group * d)
        k = reader.read(hf_names[1], 0, g0 * d, g1 * d)
        v = reader.read(hf_names[2], 0, g0 * d, g1 * d)
        tail = q.shape[1:]
        local_groups = g1 - g0
        q = q.reshape(local_groups, heads_per_group * d, *tail)
        k = k.reshape(local_groups, d, *tail)
        v = v.reshape(local_groups, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)

    def to_hf(self, shards, hf_names, info):
        d = info.head_dim
        groups = info.num_query_groups
        heads_per_group = info.num_attention_heads // groups
        fused = torch.cat(shards, dim=0)
        tail = fused.shape[1:]
        fused = fused.reshape(groups, (heads_per_group + 2) * d, *tail)
        q, k, v = torch.split(fused, [heads_per_group * d, d, d], dim=1)
        return {
            hf_names[0]: q.reshape(-1, *tail).clone(),
            hf_names[1]: k.reshape(-1, *tail).clone(),
            hf_names[2]: v.reshape(-1, *tail).clone(),
        }


@dataclass(frozen=True)
class GatedMLP(Mapping):
    """gate and up projections ``[ffn, h]`` into ``linear_fc1`` (per shard [gate; up])."""

    def hf_shapes(self, info):
        return ((info.ffn_hidden_size, info.hidden_size),) * 2

    def load_shard(self, reader, hf_names, info, tp_rank, tp_size):
        start, end = _split(info.ffn_hidden_size, tp_rank, tp_size)
        gate = reader.read(hf_names[0], 0, start, end)
        up = reader.read(hf_names[1], 0, start, end)
        return torch.cat([gate, up], dim=0)

    def to_hf(self, shards, hf_names, info):
        halves = [torch.chunk(shard, 2, dim=0) for shard in shards]
        return {
            hf_names[0]: torch.cat([gate for gate, _ in halves], dim=0),
            hf_names[1]: torch.cat([up for _, up in halves], dim=0),
        }


def _size(info: ModelInfo, expression: str) -> int:
    """``"num_attention_heads*head_dim"`` -> the product of those ModelInfo fields."""
    value = 1
    for name in expression.split("*"):
        value *= getattr(info, name)
    return value
