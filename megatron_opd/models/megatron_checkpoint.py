"""Layout of a Megatron checkpoint written by the HF -> Megatron conversion.

::

    <dir>/
        model/             dist_checkpointing (torch_dist) of {"model": sharded_state_dict}
        hf_config/         config.json, generation_config.json, tokenizer files
        conversion.json    format tag, vocab sizes, the layout it was written from
        COMPLETE           written last, then the directory is renamed into place

dist_checkpointing stores global tensors with their shard offsets, so the checkpoint
loads at any TP/PP: only the padded vocabulary (the embedding's global row count) must be
divisible by the new TP size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_SUBDIR = "model"
METADATA_FILE = "conversion.json"
COMPLETE_FILE = "COMPLETE"
FORMAT_TAG = "megatron_opd.megatron_checkpoint.v1"


def is_megatron_checkpoint(path: str | Path) -> bool:
    """True when ``path`` looks like a converted Megatron checkpoint (complete or not)."""
    return (Path(path) / METADATA_FILE).is_file()


def read_conversion_metadata(path: str | Path) -> dict[str, Any] | None:
    """``conversion.json`` of a converted checkpoint, None for an HF directory.

    ValueError when the checkpoint lacks its COMPLETE marker (an interrupted write).
    """
    path = Path(path)
    if not is_megatron_checkpoint(path):
        return None
    if not (path / COMPLETE_FILE).is_file():
        raise ValueError(
            f"Megatron checkpoint {path} is incomplete (no {COMPLETE_FILE} file): its "
            "conversion was interrupted; convert again"
        )
    metadata = json.loads((path / METADATA_FILE).read_text())
    if metadata.get("format") != FORMAT_TAG:
        raise ValueError(
            f"{path / METADATA_FILE} has format {metadata.get('format')!r}, expected {FORMAT_TAG!r}"
        )
    return metadata
