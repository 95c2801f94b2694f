"""Streaming reads and writes of HF safetensors checkpoints, and atomic output directories.

Reading opens each safetensors file lazily with ``safe_open`` and slices tensors there
(``get_slice``), so a rank materialises only its own TP shard of the layers it holds.
Writing accumulates tensors up to ``max_shard_bytes`` and flushes a shard file; with more
than one shard it writes ``model.safetensors.index.json`` as transformers does. Peak
memory is about one shard.

:func:`atomic_output_dir` yields ``<out>.tmp-<pid>`` and renames it to ``<out>`` only
when the body finished, so an interrupted conversion never leaves a complete-looking
output directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
"""Files copied along with a model so that AutoTokenizer loads from the output."""


class SafetensorsReader:
    """Named tensors of an HF directory (``model.safetensors`` or sharded with an index)."""

    def __init__(self, hf_dir: str | Path) -> None:
        hf_dir = Path(hf_dir)
        if (hf_dir / INDEX_FILE).is_file():
            weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
            self._file_of = {name: hf_dir / file for name, file in weight_map.items()}
        elif (hf_dir / SINGLE_FILE).is_file():
            with safe_open(hf_dir / SINGLE_FILE, framework="pt") as handle:
                self._file_of = {name: hf_dir / SINGLE_FILE for name in handle.keys()}
        else:
            raise ValueError(
                f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; point the path at an "
                "HF model directory saved with safetensors"
            )
        self._handles: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    def names(self) -> set[str]:
        """All tensor names in the checkpoint."""
        return set(self._file_of)

    def _handle(self, name: str):
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of ``name`` (no data read)."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        return self.read(name, 0, 0, 0).dtype

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int = 0):
        """Tensor ``name``, or its ``[start, end)`` slice along ``dim`` (only that is read)."""
        tensor_slice = self._handle(name).get_slice(name)
        if dim is None:
            return tensor_slice[:]
        index = [slice(None)] * len(tensor_slice.get_shape())
        index[dim] = slice(start, end)
        return tensor_slice[tuple(index)]

    def close(self) -> None:
        """Close the open files."""
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards of bounded size."""

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int = 5 * 1024**3) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor``; flushes a shard first when it would grow past the limit."""
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[str]:
        """Write the last shard and the index (if several); returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        count = len(self._shards)
        weight_map, files = {}, []
        for number, (path, names) in enumerate(self._shards, start=1):
            file = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / file)
            files.append(file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return files


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer files present in ``src_dir``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy2(Path(src_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied


def check_output_dir(out: str | Path, *, overwrite: bool) -> Path:
    """ValueError when ``out`` exists and ``overwrite`` is off."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"output directory {out} already exists; remove it or pass --overwrite")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False, pid: int | None = None):
    """Yield ``<out>.tmp-<pid>``; on success replace ``out`` with it, on error delete it."""
    out = check_output_dir(out, overwrite=overwrite)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid() if pid is None else pid}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
