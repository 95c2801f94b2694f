"""Load HF safetensors straight into this rank's Megatron model chunk(s).

Every rank first checks the checkpoint's tensor names and shapes against what the
config implies (:func:`validate_hf_checkpoint`), so a missing, extra or misshapen tensor
raises the same ValueError on all ranks before any rank blocks in a collective. Then each
rank reads, per parameter, only the slices of its TP shard and of its PP stage's layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_opd.conversion.families import (
    IGNORED_HF_TENSORS,
    expected_hf_tensors,
    mappings_for,
    match,
)
from megatron_opd.conversion.hf_io import SafetensorsReader
from megatron_opd.distributed import ParallelGroups
from megatron_opd.models.fp8 import copy_into_parameter
from megatron_opd.models.hf_config import ModelInfo

_MAX_LISTED = 8


def layer_offset(chunk: torch.nn.Module) -> int:
    """Global index of the chunk's first transformer layer (0 when it has none)."""
    layers = chunk.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def model_tensors(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The chunk's weights by name (Transformer Engine ``_extra_state`` left out)."""
    return {
        name: tensor
        for name, tensor in chunk.state_dict(keep_vars=True).items()
        if not name.endswith("_extra_state") and tensor is not None
    }


def mapped_tensors(chunks: list[torch.nn.Module], info: ModelInfo):
    """Yield ``(name, tensor, mapping, hf_names)`` for every weight of the chunks: its
    Megatron name, the tensor, and the family mapping that converts it to HF names."""
    mappings = mappings_for(info)
    for chunk in chunks:
        offset = layer_offset(chunk)
        for name, tensor in model_tensors(chunk).items():
            found = match(mappings, name, offset)
            assert found is not None, f"no HF mapping for Megatron parameter {name}"
            mapping, hf_names = found
            yield name, tensor, mapping, hf_names


def _listing(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def validate_hf_checkpoint(reader: SafetensorsReader, info: ModelInfo) -> None:
    """ValueError listing missing, unexpected and misshapen tensors of the checkpoint."""
    expected = expected_hf_tensors(info)
    present = {n for n in reader.names() if not IGNORED_HF_TENSORS.match(n)}
    problems = []
    missing = set(expected) - present
    extra = present - set(expected)
    if info.tie_word_embeddings:
        # Some tied checkpoints still store a copy of the output layer; it must equal the
        # embedding, which is what the tied model uses.
        extra.discard("lm_head.weight")
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_listing(extra)}")
    wrong = [
        f"{name} has shape {list(reader.shape(name))}, expected {list(shape)}"
        for name, shape in expected.items()
        if name in present and reader.shape(name) != shape
    ]
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong[:_MAX_LISTED]))
    if problems:
        raise ValueError(
            f"HF checkpoint {info.hf_dir or '?'} does not match its config.json "
            f"({info.architecture}, {info.num_layers} layers): " + " | ".join(problems)
        )


@torch.no_grad()
def load_hf_weights(
    model_chunks: list[torch.nn.Module] | torch.nn.Module,
    hf_dir: str | Path,
    info: ModelInfo,
    groups: ParallelGroups,
) -> None:
    """Copy the HF checkpoint in ``hf_dir`` into this rank's chunks (TP/PP shards only)."""
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    with SafetensorsReader(hf_dir) as reader:
        validate_hf_checkpoint(reader, info)
        for name, param, mapping, hf_names in mapped_tensors(chunks, info):
            shard = mapping.load_shard(reader, hf_names, info, groups.tp_rank, groups.tp_size)
            assert shard.shape == param.shape, (name, shard.shape, param.shape)
            copy_into_parameter(param, shard)
