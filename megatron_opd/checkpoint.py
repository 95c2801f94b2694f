"""Atomic, resumable checkpoints: Megatron dist_checkpointing plus the trainer's own state.

Layout of ``save_dir``::

    step_00000010/                 one complete checkpoint
        model_optim/               dist_checkpointing (model + optimizer), layout-agnostic
        trainer_state.json         step, ResponseBudget, data position, config, metrics tail
        rng/rank_00000.pt          per-rank RNG states (torch, Megatron's tracker, numpy, random)
        COMPLETE                   written last: a directory without it is never loaded
    latest                         text file naming the newest complete step directory

Atomicity: every rank writes into ``.tmp-step_XXXXXXXX``; after a barrier, rank 0 writes
``COMPLETE``, renames the directory into place, then replaces ``latest`` with an
``os.replace`` of a temporary file. A run that dies mid-save leaves only a ``.tmp-*``
directory, which is ignored (and removed by the next save), so the previous checkpoint
stays the one that loads. Old checkpoints beyond ``keep_last`` are removed after the new
one is in place. A shared filesystem across nodes is assumed, as with Megatron-LM.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_opd.distributed import ParallelGroups

_STEP_PREFIX = "step_"
_COMPLETE = "COMPLETE"
_LATEST = "latest"


def _step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (restored by :func:`restore_rng_state`)."""
    from megatron.core import tensor_parallel

    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "random": random.getstate(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside any wrappers (Megatron DDP, Float16Module)."""
    # Wrappers (Megatron DDP, Float16Module) prefix state keys with "module." and do not all
    # accept them back; save and load the innermost GPTModel, whatever wraps it.
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state_dict(model_chunks, optimizer, is_loading: bool) -> dict:
    model_sd = {}
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        model_sd[key] = unwrap_model(chunk).sharded_state_dict()
    merged = dict(model_sd)
    if optimizer is not None:
        flat_model_sd = {}
        for value in model_sd.values():
            flat_model_sd.update(value)
        merged["optimizer"] = optimizer.sharded_state_dict(flat_model_sd, is_loading=is_loading)
    return merged


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    *,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    trainer_state: dict[str, Any],
    groups: ParallelGroups,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically on all ranks; returns its directory.

    ``trainer_state`` must be JSON-serialisable and identical on every rank.
    """
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = save_dir / _step_dir_name(step)
    tmp = save_dir / f".tmp-{final.name}"
    if groups.rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in save_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "model_optim").mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    state = _sharded_state_dict(model_chunks, optimizer, is_loading=False)
    dist_checkpointing.save(state, str(tmp / "model_optim"))
    torch.save(capture_rng_state(), tmp / "rng" / f"rank_{groups.rank:05d}.pt")
    if groups.rank == 0:
        full_state = dict(trainer_state)
        full_state["step"] = step
        if scheduler is not None:
            full_state["lr_scheduler"] = scheduler.state_dict()
        (tmp / "trainer_state.json").write_text(json.dumps(full_state, indent=1, default=_json))
    _barrier()
    if groups.rank == 0:
        (tmp / _COMPLETE).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = save_dir / f".{_LATEST}.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, save_dir / _LATEST)
        _prune(save_dir, keep_last)
    _barrier()
    return final


def _json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON-serialisable in trainer_state: {type(value).__name__}")


def _prune(save_dir: Path, keep_last: int) -> None:
    complete = sorted(
        p for p in save_dir.glob(f"{_STEP_PREFIX}*") if (p / _COMPLETE).is_file()
    )  # fmt: skip
    for old in complete[: max(0, len(complete) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def find_latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``save_dir`` (or ``save_dir`` itself if it is
    one), or None. Directories without COMPLETE are never returned."""
    save_dir = Path(save_dir)
    if (save_dir / _COMPLETE).is_file():
        return save_dir
    latest = save_dir / _LATEST
    if latest.is_file():
        candidate = save_dir / latest.read_text().strip()
        if (candidate / _COMPLETE).is_file():
            return candidate
    complete = sorted(p for p in save_dir.glob(f"{_STEP_PREFIX}*") if (p / _COMPLETE).is_file())
    return complete[-1] if complete else None


def load_checkpoint(
    checkpoint_dir: str | Path,
    *,
    model_chunks: list[torch.nn.Module],
    optimizer: Any,
    scheduler: Any,
    groups: ParallelGroups,
    expected_model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load model, optimizer, scheduler and this rank's RNG; return the trainer state.

    ``expected_model`` (e.g. the student's architecture summary) is compared with the one
    saved in the trainer state; a checkpoint of another model is refused with the fields
    that differ, before any tensor is read.
    """
    from megatron.core import dist_checkpointing

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / _COMPLETE).is_file():
        raise ValueError(
            f"{checkpoint_dir} is not a complete checkpoint (no {_COMPLETE} marker); point "
            "checkpoint.load_dir at a step_* directory or at the save directory"
        )
    trainer_state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    if expected_model is not None and "model" in trainer_state:
        saved = trainer_state["model"]
        diffs = [
            f"{key}: checkpoint {saved.get(key)!r} vs run {value!r}"
            for key, value in expected_model.items()
            if saved.get(key) != value
        ]
        if diffs:
            raise ValueError(
                f"checkpoint {checkpoint_dir} was written for another model ("
                + "; ".join(diffs)
                + "); load a checkpoint of this student or start without checkpoint.load_dir"
            )
    state = _sharded_state_dict(model_chunks, optimizer, is_loading=True)
    loaded = dist_checkpointing.load(state, str(checkpoint_dir / "model_optim"))
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        unwrap_model(chunk).load_state_dict(loaded[key])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "lr_scheduler" in trainer_state:
        scheduler.load_state_dict(trainer_state["lr_scheduler"])
    rng_file = checkpoint_dir / "rng" / f"rank_{groups.rank:05d}.pt"
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
