"""Build Megatron GPT models (student or frozen teacher) from HF configs."""

from megatron_opd.models.builder import (
    build_model,
    transformer_config,
    use_transformer_engine,
)
from megatron_opd.models.fp8 import fp8_transformer_config_kwargs
from megatron_opd.models.hf_config import ModelInfo, padded_vocab_size, read_model_info
from megatron_opd.models.teacher import freeze, offload_to_cpu, onload
from megatron_opd.models.vocab import check_vocab_compatible

__all__ = [
    "ModelInfo",
    "build_model",
    "check_vocab_compatible",
    "fp8_transformer_config_kwargs",
    "freeze",
    "offload_to_cpu",
    "onload",
    "padded_vocab_size",
    "read_model_info",
    "transformer_config",
    "use_transformer_engine",
]
