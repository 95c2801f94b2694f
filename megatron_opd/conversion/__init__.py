"""HF <-> Megatron conversion: per-family mapping tables, streaming load, export, CLIs."""

from megatron_opd.conversion.export import export_hf_from_model
from megatron_opd.conversion.hf_loader import load_hf_weights, validate_hf_checkpoint
from megatron_opd.conversion.logits import gather_full_logits
from megatron_opd.conversion.megatron_ckpt import (
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    load_megatron_checkpoint,
    load_model_weights,
    save_megatron_checkpoint,
)

__all__ = [
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "export_hf_from_model",
    "gather_full_logits",
    "load_hf_weights",
    "load_megatron_checkpoint",
    "load_model_weights",
    "save_megatron_checkpoint",
    "validate_hf_checkpoint",
]
