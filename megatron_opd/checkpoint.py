"""Atomic, resumable checkpoints: Megatron dist_checkpointing plus the trainer's own state.

Layout of ``save_dir``::

    step_00000010/                 one complete checkpoint
        model_optim/               dist_checkpointing (model + optimizer), layout-agnostic
        trainer_state.json         step, ResponseBudget, data position, config, metrics tail
        rng/rank_00000.pt          per-rank RNG states (torch, Megatron's tracker, numpy, random),
                                   tensors and plain values only: read with weights_only=True
        COMPLETE                   written last: a directory without it is never loaded
    latest                         text file naming the newest complete step directory

Atomicity: every rank writes into ``.tmp-step_XXXXXXXX``; after a barrier, rank 0 writes
``COMPLETE``, renames the directory into place, then replaces ``latest`` with an
``os.replace`` of a temporary file. A run that dies mid-save leaves only a ``.tmp-*``
directory, which is ignored (and removed by the next save), so the previous checkpoint
stays the one that loads. Old checkpoints beyond ``keep_last`` are removed after the new
one is in place. A shared filesystem across nodes is assumed, as with Megatron-LM.

A complete checkpoint can still be damaged later (a truncated copy, a full disk on a
restore, bit rot). :func:`verify_checkpoint_files` reads every small file and compares
each shard file's size with the byte ranges its metadata records, without loading a
tensor, so a damaged checkpoint is refused before any process group exists, naming the
previous complete checkpoint to resume from; :func:`load_checkpoint` reports read errors
the same way.
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
from megatron_opd.mcore_compat import check_checkpoint_readable, checkpoint_layout

_STEP_PREFIX = "step_"
_COMPLETE = "COMPLETE"
_LATEST = "latest"


def _step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (restored by :func:`restore_rng_state`).

    Only tensors, numbers, strings and containers of them, so that ``torch.load(...,
    weights_only=True)`` reads it back: a checkpoint received from someone else cannot
    run code on load (numpy's and Python's states are stored as int64 tensors).
    """
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "random": {
            "version": int(version),
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["random"]
    # Checkpoints of earlier versions hold the raw tuples; weights_only reads them only
    # where numpy's reconstructors are allow-listed (Megatron-Core registers them).
    if isinstance(numpy_state, dict):
        numpy_state = (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    np.random.set_state(numpy_state)
    if isinstance(python_state, dict):
        python_state = (
            python_state["version"],
            tuple(int(x) for x in python_state["internal"].tolist()),
            python_state["gauss_next"],
        )
    random.setstate(python_state)
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

    from megatron_opd.checkpoint_queue import install_checkpoint_results_queue

    install_checkpoint_results_queue()
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


def checkpoint_to_resume(checkpoint_config) -> Path | None:
    """The complete checkpoint a run resumes from: ``load_dir`` (a step directory or a save
    directory) or else the newest in ``save_dir``; None for a fresh start. ValueError when
    ``load_dir`` is set but holds no complete checkpoint."""
    source = checkpoint_config.load_dir or checkpoint_config.save_dir
    if source is None:
        return None
    found = find_latest_checkpoint(source)
    if found is None and checkpoint_config.load_dir is not None:
        raise ValueError(
            f"checkpoint.load_dir={checkpoint_config.load_dir} holds no complete checkpoint; "
            "point it at a step_* directory or remove it to start fresh"
        )
    return found


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


def check_steps_left(checkpoint_step: int, num_steps: int, checkpoint: str | Path) -> None:
    """ValueError when a checkpoint is past ``training.num_steps`` (resuming it would
    otherwise end the run at once, silently)."""
    if checkpoint_step > num_steps:
        raise ValueError(
            f"checkpoint {checkpoint} is at step {checkpoint_step}, past training.num_steps="
            f"{num_steps}; raise training.num_steps to continue that run, or set "
            "checkpoint.save_dir (and checkpoint.load_dir) elsewhere to start a new one"
        )


class DamagedCheckpointError(ValueError):
    """A complete-looking checkpoint whose files cannot be read; the message names the
    previous complete checkpoint to resume from."""


def previous_complete_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint beside ``checkpoint_dir`` older than it, or None."""
    checkpoint_dir = Path(checkpoint_dir)
    siblings = sorted(
        p
        for p in checkpoint_dir.parent.glob(f"{_STEP_PREFIX}*")
        if (p / _COMPLETE).is_file() and p.name < checkpoint_dir.name
    )
    return siblings[-1] if siblings else None


def _damaged(checkpoint_dir: Path, what: str, err: BaseException) -> DamagedCheckpointError:
    previous = previous_complete_checkpoint(checkpoint_dir)
    if previous is not None:
        fix = (
            f"the previous complete checkpoint is {previous}: resume from it with "
            f"checkpoint.load_dir={previous}, or move {checkpoint_dir} out of "
            f"{checkpoint_dir.parent} (the run then resumes from {previous.name} by itself)"
        )
    else:
        fix = (
            f"there is no earlier complete checkpoint in {checkpoint_dir.parent}; move "
            f"{checkpoint_dir} away to start from step 0"
        )
    detail = f"{type(err).__name__}: {err}".strip().rstrip(":")
    return DamagedCheckpointError(
        f"checkpoint {checkpoint_dir} is damaged: {what} cannot be read ({detail}); {fix}"
    )


def read_trainer_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint; DamagedCheckpointError if unreadable."""
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step' in it")
    except (OSError, ValueError) as err:
        raise _damaged(checkpoint_dir, path.name, err) from None
    return state


def _read_rng_file(checkpoint_dir: Path, rng_file: Path) -> dict[str, Any]:
    try:
        return torch.load(rng_file, weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncation, garbage, or a pickle we refuse
        raise _damaged(checkpoint_dir, f"rng/{rng_file.name}", err) from None


def verify_checkpoint_files(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Check that every file of a complete checkpoint is readable and whole, without
    loading a tensor or needing a process group; return its trainer state.

    Reads trainer_state.json, Megatron's metadata.json and common.pt, the torch
    distributed-checkpoint index (``.metadata``) and every RNG file, and checks that each
    shard file is at least as long as the byte ranges the index records in it (a copy cut
    short fails here). Raises DamagedCheckpointError naming the file and the previous
    complete checkpoint.
    """
    from torch.distributed.checkpoint import FileSystemReader

    checkpoint_dir = Path(checkpoint_dir)
    state = read_trainer_state(checkpoint_dir)
    model_optim = checkpoint_dir / "model_optim"
    try:
        json.loads((model_optim / "metadata.json").read_text())
    except (OSError, ValueError) as err:
        raise _damaged(checkpoint_dir, "model_optim/metadata.json", err) from None
    # 0.16-0.18 write the common state to common.pt; 0.19 embeds it in the .distcp files
    # (megatron_opd/mcore_compat.py). An older Megatron-Core cannot read the latter.
    check_checkpoint_readable(model_optim)
    if checkpoint_layout(model_optim) == "common.pt":
        try:
            torch.load(model_optim / "common.pt", weights_only=True)
        except Exception as err:  # noqa: BLE001
            raise _damaged(checkpoint_dir, "model_optim/common.pt", err) from None
    try:
        index = FileSystemReader(str(model_optim)).read_metadata()
    except Exception as err:  # noqa: BLE001 - unpickling a cut file raises anything
        raise _damaged(checkpoint_dir, "model_optim/.metadata", err) from None
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = model_optim / name
        actual = path.stat().st_size if path.is_file() else None
        if actual is None or actual < size:
            have = "missing" if actual is None else f"{actual} bytes"
            err = OSError(f"the index records {size} bytes, the file has {have}")
            raise _damaged(checkpoint_dir, f"model_optim/{name}", err)
    for rng_file in sorted((checkpoint_dir / "rng").glob("rank_*.pt")):
        _read_rng_file(checkpoint_dir, rng_file)
    return state


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
    that differ, before any tensor is read. Unreadable files raise
    DamagedCheckpointError (see :func:`verify_checkpoint_files`).
    """
    from megatron.core import dist_checkpointing

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / _COMPLETE).is_file():
        raise ValueError(
            f"{checkpoint_dir} is not a complete checkpoint (no {_COMPLETE} marker); point "
            "checkpoint.load_dir at a step_* directory or at the save directory"
        )
    trainer_state = read_trainer_state(checkpoint_dir)
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
    rng_file = checkpoint_dir / "rng" / f"rank_{groups.rank:05d}.pt"
    rng_state = _read_rng_file(checkpoint_dir, rng_file) if rng_file.is_file() else None
    check_checkpoint_readable(checkpoint_dir / "model_optim")
    state = _sharded_state_dict(model_chunks, optimizer, is_loading=True)
    try:
        loaded = dist_checkpointing.load(state, str(checkpoint_dir / "model_optim"))
    except Exception as err:  # noqa: BLE001 - torch/Megatron raise many types on bad files
        raise _damaged(checkpoint_dir, "model_optim (model and optimizer shards)", err) from err
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        unwrap_model(chunk).load_state_dict(loaded[key])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "lr_scheduler" in trainer_state:
        scheduler.load_state_dict(trainer_state["lr_scheduler"])
    if rng_state is not None:
        restore_rng_state(rng_state)
    return trainer_state
