"""Megatron model -> HF tensors: an HF checkpoint on disk, or every rank's weight push.

Export: only the data-parallel replica 0 takes part. Per parameter, the TP ranks of a
stage all-gather their shards and TP rank 0 turns them into HF tensors with the family's
mapping; stages other than the first send those tensors, one at a time, to global rank
0 over the pipeline group. Rank 0 streams them into bounded safetensors shards, so no
rank ever holds the whole model. Output is atomic: ``<out>.tmp-<pid>`` renamed at the end.

Weight push (:func:`broadcast_hf_weights`, for an inference engine colocated on every
rank): every stage in turn announces its tensors' names, shapes and dtypes, then
broadcasts each full HF tensor over the pipeline group, so every rank of the replica
sees every tensor of the whole model, one at a time, in the same order.

Receive buffers live on the platform's device: NCCL can only send and receive CUDA
tensors (gloo takes CPU ones), so a CPU buffer would fail every PP > 1 transfer on GPUs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.conversion.hf_io import (
    ShardedSafetensorsWriter,
    atomic_output_dir,
    copy_tokenizer_files,
)
from megatron_opd.conversion.hf_loader import mapped_tensors
from megatron_opd.distributed import ParallelGroups
from megatron_opd.models.hf_config import ModelInfo

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _stage_weights(chunks, info: ModelInfo):
    """``(name, param, mapping, hf_names)`` of this stage's weights that HF stores."""
    for name, param, mapping, hf_names in mapped_tensors(chunks, info):
        if name.startswith("output_layer.") and info.tie_word_embeddings:
            continue  # the tied copy on the last stage; HF stores only the embedding
        yield name, param, mapping, hf_names


def _hf_tensors_of_stage(
    chunks, info: ModelInfo, groups: ParallelGroups, dtype, *, every_tp_rank: bool = False
):
    """Yield (HF name, full tensor) for this stage, in ``hf_names`` order; only TP rank 0
    gets items unless ``every_tp_rank``."""
    for _, param, mapping, hf_names in _stage_weights(chunks, info):
        local = param.detach()
        if groups.tp_size > 1:
            shards = [torch.empty_like(local) for _ in range(groups.tp_size)]
            dist.all_gather(shards, local.contiguous(), group=groups.tp_group)
        else:
            shards = [local]
        if groups.tp_rank == 0 or every_tp_rank:
            converted = mapping.to_hf(shards, hf_names, info)
            for hf_name in hf_names:
                tensor = converted[hf_name]
                yield hf_name, tensor.to(dtype or tensor.dtype).contiguous()


def stage_hf_metadata(
    chunks, info: ModelInfo, dtype: torch.dtype | None = None
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(HF name, full shape, dtype)`` of every tensor this stage yields, in order (no
    communication: the shapes come from the family's mapping table)."""
    metadata = []
    for _, param, mapping, hf_names in _stage_weights(chunks, info):
        for hf_name, shape in zip(hf_names, mapping.hf_shapes(info)):
            metadata.append((hf_name, tuple(shape), dtype or param.dtype))
    return metadata


def receive_buffer(shape, dtype: torch.dtype, groups: ParallelGroups) -> torch.Tensor:
    """An empty tensor to receive into: on the platform's device (CUDA under NCCL)."""
    return torch.empty(tuple(shape), dtype=dtype, device=groups.platform.device)


def broadcast_hf_weights(
    chunks, info: ModelInfo, groups: ParallelGroups, *, dtype: torch.dtype | None = None
):
    """Collective over the model replica (every TP rank of every PP stage): yield every
    ``(HF name, full tensor)`` of the whole model on every rank, one tensor at a time.

    The caller must exhaust the generator on every rank (each item is a collective).
    Peak extra memory is one full HF tensor plus one stage's TP shards of it.
    """
    for stage in range(groups.pp_size):
        src = groups.pp_global_ranks[stage]
        owner = stage == groups.pp_rank
        if groups.pp_size == 1:
            yield from _hf_tensors_of_stage(chunks, info, groups, dtype, every_tp_rank=True)
            return
        box = [stage_hf_metadata(chunks, info, dtype) if owner else None]
        dist.broadcast_object_list(box, src=src, group=groups.pp_group)
        if owner:
            produced = _hf_tensors_of_stage(chunks, info, groups, dtype, every_tp_rank=True)
            for (hf_name, tensor), (meta_name, shape, _) in zip(produced, box[0], strict=True):
                assert hf_name == meta_name and tuple(tensor.shape) == shape, (hf_name, shape)
                dist.broadcast(tensor, src=src, group=groups.pp_group)
                yield hf_name, tensor
        else:
            for hf_name, shape, tensor_dtype in box[0]:
                tensor = receive_buffer(shape, tensor_dtype, groups)
                dist.broadcast(tensor, src=src, group=groups.pp_group)
                yield hf_name, tensor


def _stream_to_rank0(chunks, info, groups: ParallelGroups, dtype, sink) -> None:
    """Send every stage's HF tensors to global rank 0, where ``sink(name, tensor)`` runs."""
    pp_ranks = groups.pp_global_ranks
    for stage in range(groups.pp_size):
        if stage == groups.pp_rank:
            for hf_name, tensor in _hf_tensors_of_stage(chunks, info, groups, dtype):
                if groups.pp_rank == 0:
                    sink(hf_name, tensor)
                else:
                    meta = [(hf_name, tuple(tensor.shape), tensor.dtype)]
                    dist.send_object_list(meta, dst=pp_ranks[0], group=groups.pp_group)
                    dist.send(tensor, dst=pp_ranks[0], group=groups.pp_group)
            if groups.pp_rank != 0 and groups.tp_rank == 0:
                dist.send_object_list([None], dst=pp_ranks[0], group=groups.pp_group)
        elif groups.pp_rank == 0 and groups.tp_rank == 0:
            while True:
                meta = [None]
                dist.recv_object_list(meta, src=pp_ranks[stage], group=groups.pp_group)
                if meta[0] is None:
                    break
                hf_name, shape, tensor_dtype = meta[0]
                tensor = receive_buffer(shape, tensor_dtype, groups)
                dist.recv(tensor, src=pp_ranks[stage], group=groups.pp_group)
                sink(hf_name, tensor)


def write_hf_config_files(info: ModelInfo, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json (the source's, with the dtype of the weights) and generation_config.json."""
    config = dict(info.hf_config)
    name = _DTYPE_NAMES.get(dtype, "float32")
    for key in ("dtype", "torch_dtype"):  # transformers 5 writes "dtype", 4 "torch_dtype"
        if key in config:
            config[key] = name
    if "dtype" not in config and "torch_dtype" not in config:
        config["dtype"] = name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = Path(info.hf_dir) / "generation_config.json" if info.hf_dir else None
    if source is not None and source.is_file():
        shutil.copy2(source, out_dir / "generation_config.json")
    else:
        generation = {
            key: config[key]
            for key in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(key) is not None
        }
        generation["transformers_version"] = config.get("transformers_version", "")
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


@torch.no_grad()
def export_hf_from_model(
    model_chunks: list[torch.nn.Module] | torch.nn.Module,
    out_dir: str | Path,
    info: ModelInfo,
    groups: ParallelGroups,
    tokenizer_dir: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> Path | None:
    """Collective over all ranks: write the model as an HF directory ``out_dir``.

    ``dtype`` None keeps the parameters' dtype. Tokenizer files are copied from
    ``tokenizer_dir`` (default: the directory the config came from). Returns the path on
    global rank 0, None elsewhere.
    """
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    out_dir = Path(out_dir)
    if dtype is None:
        dtype = next(chunks[0].parameters()).dtype
    error = [None]
    if groups.rank == 0 and out_dir.exists() and not overwrite:
        error[0] = f"output directory {out_dir} already exists; remove it or pass overwrite"
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ValueError(error[0])
    if groups.dp_rank == 0:
        if groups.rank == 0:
            with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
                writer = ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
                _stream_to_rank0(chunks, info, groups, dtype, writer.add)
                writer.close()
                write_hf_config_files(info, tmp, dtype)
                if tokenizer_dir or info.hf_dir:
                    copy_tokenizer_files(tokenizer_dir or info.hf_dir, tmp)
        else:
            _stream_to_rank0(chunks, info, groups, dtype, sink=None)
    dist.barrier()
    return out_dir if groups.rank == 0 else None
