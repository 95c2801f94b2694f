"""FP8 with Transformer Engine, set up the way Megatron-LM does it.

What a ``model.fp8*`` setting turns into:

- **TransformerConfig** (:func:`fp8_transformer_config_kwargs`): ``fp8`` (format),
  ``fp8_recipe``, ``fp8_param``, the delayed recipe's amax history (``max`` over 1024
  steps, as Megatron-LM's FP8 examples), and the bf16 first/last layers. With
  ``fp8_param`` Megatron-Core itself builds each FP8 layer inside TE's ``fp8_model_init``
  (keeping a high-precision copy of the initial values for the optimizer).
- **DDP and optimizer** (training/optimizer.py): ``fp8_param`` sets DDP's
  ``fp8_param_gather`` and forces the distributed optimizer, also at DP=1; it is the
  only Megatron optimizer that re-quantizes FP8 parameters from FP32 master shards.
- **Loaded weights** (:func:`copy_into_parameter`): an FP8 parameter quantizes what is
  copied into it, and the distributed optimizer later takes its master copy from the
  high-precision value TE kept at build time (the random init). Loading a checkpoint
  therefore also overwrites that kept value, so the master weights start exactly at the
  checkpoint, not at a dequantized FP8 copy (nor at the random init).
- **Token counts** (:func:`fp8_align_size`): FP8 GEMMs need the number of tokens (rows of
  the GEMM) divisible by 16, by 32 for MXFP8 (Megatron-Core's ``get_fp8_align_size``).
  Training micro-batches are padded to it (training/micro_batches.py, exact: padding
  sits after every real token with zero loss weight); rollouts and scoring, whose decode
  steps feed one token per row, go through Megatron-Core's FP8 inference padding of the
  TE linear layers (:func:`megatron_opd.mcore_compat.prepare_fp8_inference`).
- **Hardware** (:func:`check_fp8_hardware`): FP8 needs compute capability 8.9+; MXFP8
  exists only on Blackwell (10.0+), so H100/H200 (9.0) refuse it at start-up.
"""

from __future__ import annotations

import torch

from megatron_opd.config.model import ModelConfig

MXFP8_MIN_CAPABILITY = (10, 0)
FP8_MIN_CAPABILITY = (8, 9)


def fp8_transformer_config_kwargs(model_config: ModelConfig) -> dict:
    """TransformerConfig fields for ``model_config``'s FP8 settings ({} when fp8 is off)."""
    if model_config.fp8 is None:
        return {}
    kwargs = {
        "fp8": model_config.fp8,
        "fp8_recipe": model_config.fp8_recipe,
        "fp8_param": model_config.fp8_param,
    }
    if model_config.fp8_recipe == "delayed":
        kwargs["fp8_amax_history_len"] = model_config.fp8_amax_history_len
        kwargs["fp8_amax_compute_algo"] = "max"
    if model_config.first_last_layers_bf16:
        kwargs["first_last_layers_bf16"] = True
        kwargs["num_layers_at_start_in_bf16"] = model_config.num_layers_at_start_in_bf16
        kwargs["num_layers_at_end_in_bf16"] = model_config.num_layers_at_end_in_bf16
    return kwargs


def fp8_align_size(model_config: ModelConfig) -> int:
    """Tokens of an FP8 GEMM must be a multiple of this (1 when fp8 is off)."""
    if model_config.fp8 is None:
        return 1
    return 32 if model_config.fp8_recipe == "mxfp8" else 16


def check_fp8_hardware(
    model_config: ModelConfig, role: str, capability: tuple[int, int] | None
) -> None:
    """ValueError when ``role``'s FP8 recipe cannot run on a GPU of ``capability``
    (``torch.cuda.get_device_capability()``; None: no GPU, checked elsewhere)."""
    if model_config.fp8 is None or capability is None:
        return
    name = f"sm_{capability[0]}{capability[1]}"
    if model_config.fp8_recipe == "mxfp8" and tuple(capability) < MXFP8_MIN_CAPABILITY:
        raise ValueError(
            f"{role}.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability 10.0+); this "
            f"GPU is {name} (Hopper is 9.0); use {role}.fp8_recipe=tensorwise or blockwise"
        )
    if tuple(capability) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"{role}.fp8 needs compute capability 8.9+ (Ada, Hopper, Blackwell); this GPU is "
            f"{name}; set {role}.fp8=null"
        )


def copy_into_parameter(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param <- value`` for a plain or a TE FP8 parameter (whose kept high-precision
    initial value, the distributed optimizer's future master copy, follows ``value``)."""
    param.data.copy_(value.to(param.dtype))
    keep_high_precision_value(param, value)


def keep_high_precision_value(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite the high-precision initial value TE keeps beside an FP8 parameter (built
    under ``fp8_model_init(preserve_high_precision_init_val=True)``) with ``value``."""
    getter = getattr(param, "get_high_precision_init_val", None)
    kept = getter() if getter is not None else None
    if kept is not None:
        kept.copy_(value.detach().to(device=kept.device, dtype=kept.dtype))


def keep_loaded_high_precision_values(module: torch.nn.Module, state_dict: dict) -> None:
    """After ``module.load_state_dict(state_dict)``: make every FP8 parameter's kept
    high-precision value the loaded (bf16/fp32) tensor rather than the random init."""
    for name, param in module.named_parameters():
        value = state_dict.get(name)
        if isinstance(value, torch.Tensor):
            keep_high_precision_value(param, value)
