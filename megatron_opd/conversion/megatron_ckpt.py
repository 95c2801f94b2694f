"""HF <-> Megatron dist_checkpointing conversion, and loading either format into a model.

HF -> Megatron builds the model at the current layout, streams the HF weights into it
and saves ``{"model": sharded_state_dict}`` with dist_checkpointing (torch_dist). The
saved tensors are global with shard offsets, so the checkpoint reloads at any TP/PP.
Megatron -> HF builds the model from the checkpoint's own ``hf_config/``, loads it, and
exports with :func:`export_hf_from_model`. Both write atomically (temporary directory
renamed at the end; a ``COMPLETE`` file marks a finished Megatron checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.config.model import ModelConfig
from megatron_opd.conversion.export import export_hf_from_model, write_hf_config_files
from megatron_opd.conversion.hf_io import copy_tokenizer_files
from megatron_opd.conversion.hf_loader import load_hf_weights
from megatron_opd.distributed import ParallelGroups
from megatron_opd.mcore_compat import check_checkpoint_readable
from megatron_opd.models.builder import build_model
from megatron_opd.models.fp8 import keep_loaded_high_precision_values
from megatron_opd.models.hf_config import HF_CONFIG_SUBDIR, ModelInfo
from megatron_opd.models.megatron_checkpoint import (
    COMPLETE_FILE,
    FORMAT_TAG,
    METADATA_FILE,
    MODEL_SUBDIR,
    read_conversion_metadata,
)


def _chunks(model_chunks) -> list[torch.nn.Module]:
    return model_chunks if isinstance(model_chunks, list) else [model_chunks]


def _sharded_state_dict(chunks) -> dict:
    assert len(chunks) == 1, "virtual pipeline chunks are not supported by the conversion"
    return {"model": chunks[0].sharded_state_dict()}


def _broadcast(value, src: int = 0):
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def save_megatron_checkpoint(
    model_chunks,
    out_dir: str | Path,
    info: ModelInfo,
    groups: ParallelGroups,
    *,
    overwrite: bool = False,
) -> Path:
    """Collective: save the model as a converted Megatron checkpoint at ``out_dir``."""
    from megatron.core import dist_checkpointing

    chunks = _chunks(model_chunks)
    out_dir = Path(out_dir)
    problem = None
    if groups.rank == 0 and out_dir.exists() and not overwrite:
        problem = f"output directory {out_dir} already exists; remove it or pass --overwrite"
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    problem, tmp = _broadcast((problem, tmp))
    if problem:
        raise ValueError(problem)
    if groups.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / MODEL_SUBDIR).mkdir(parents=True)
    dist.barrier()
    try:
        dist_checkpointing.save(_sharded_state_dict(chunks), str(tmp / MODEL_SUBDIR))
        dist.barrier()
        if groups.rank == 0:
            hf_out = tmp / HF_CONFIG_SUBDIR
            hf_out.mkdir()
            dtype = next(chunks[0].parameters()).dtype
            write_hf_config_files(info, hf_out, dtype)
            copy_tokenizer_files(info.hf_dir, hf_out)
            metadata = {
                "format": FORMAT_TAG,
                "architecture": info.architecture,
                "vocab_size": info.vocab_size,
                "padded_vocab_size": info.padded_vocab_size,
                "num_layers": info.num_layers,
                "written_with": {"tp": groups.tp_size, "pp": groups.pp_size},
                "source": info.hf_dir,
            }
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
            (tmp / COMPLETE_FILE).write_text("ok\n")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
    except BaseException:
        if groups.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return out_dir


def load_megatron_checkpoint(model_chunks, ckpt_dir: str | Path) -> None:
    """Collective: load a converted Megatron checkpoint into the model (any TP/PP)."""
    from megatron.core import dist_checkpointing

    chunks = _chunks(model_chunks)
    read_conversion_metadata(ckpt_dir)  # ValueError when incomplete
    check_checkpoint_readable(Path(ckpt_dir) / MODEL_SUBDIR)
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(Path(ckpt_dir) / MODEL_SUBDIR))
    result = chunks[0].load_state_dict(state["model"], strict=False)
    keep_loaded_high_precision_values(chunks[0], state["model"])
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing:
        raise ValueError(f"checkpoint {ckpt_dir} lacks parameters of this model: {missing[:8]}")


def load_model_weights(model_chunks, model_config: ModelConfig, info: ModelInfo, groups) -> None:
    """Load ``model_config.path`` (HF directory or converted checkpoint) into the model."""
    if read_conversion_metadata(model_config.path) is not None:
        load_megatron_checkpoint(model_chunks, model_config.path)
    else:
        load_hf_weights(model_chunks, model_config.path, info, groups)


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    groups: ParallelGroups,
    *,
    dtype: str = "float32",
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
) -> Path:
    """Collective: HF directory -> converted Megatron checkpoint, at the current layout."""
    model_config = ModelConfig(
        path=str(hf_dir),
        dtype=dtype,
        transformer_impl="local",
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    chunks, info = build_model(model_config, groups)
    load_hf_weights(chunks, hf_dir, info, groups)
    return save_megatron_checkpoint(chunks, out_dir, info, groups, overwrite=overwrite)


def convert_megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    groups: ParallelGroups,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
) -> Path | None:
    """Collective: converted Megatron checkpoint -> HF directory (safetensors + config)."""
    metadata = read_conversion_metadata(ckpt_dir)
    if metadata is None:
        raise ValueError(
            f"{ckpt_dir} is not a converted Megatron checkpoint (no {METADATA_FILE}); "
            "write one with convert_hf_to_megatron"
        )
    hf_config = json.loads((Path(ckpt_dir) / HF_CONFIG_SUBDIR / "config.json").read_text())
    weights_dtype = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    model_config = ModelConfig(
        path=str(ckpt_dir),
        dtype="bfloat16" if weights_dtype == "bfloat16" else "float32",
        transformer_impl="local",
    )
    chunks, info = build_model(model_config, groups)
    load_megatron_checkpoint(chunks, ckpt_dir)
    return export_hf_from_model(
        chunks,
        out_dir,
        info,
        groups,
        tokenizer_dir=Path(ckpt_dir) / HF_CONFIG_SUBDIR,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )
