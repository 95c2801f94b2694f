"""Build a Megatron-Core GPTModel (one pipeline stage) from an HF config.

``build_model`` turns a :class:`ModelConfig` plus :class:`ParallelGroups` into the list
of model chunks of this rank (one chunk: no virtual pipeline) and a :class:`ModelInfo`.
The process groups reach Megatron through a ``ProcessGroupCollection`` built from the
groups passed in, never through Megatron's global getters.

Numerics that must equal transformers:
- RMSNorm (``normalization="RMSNorm"``, ``layernorm_epsilon=rms_norm_eps``), also for
  qk-norm; SwiGLU as ``gated_linear_unit`` with silu (``linear_fc1`` = [gate; up]);
  GQA through ``num_query_groups``; ``kv_channels = head_dim`` (Qwen3-4B has
  head_dim 128 != hidden/heads); no biases except the qwen2 q/k/v bias.
- RoPE: Megatron's rope_scaling only exposes the llama3 ``factor`` (with the other three
  parameters fixed at 1/4/8192), so the llama3 inverse frequencies are recomputed here
  from the config's own parameters and written into the rotary embedding.

Layer spec: Transformer Engine when ``transformer_impl`` asks for it (or ``auto`` and TE
imports), else the local spec (the CPU path). FP8 settings map onto TransformerConfig's
``fp8*`` fields (:mod:`megatron_opd.models.fp8`) and are refused with a ValueError where
TE is not available or the GPU cannot run the recipe; an FP8 model's TE linear layers
pad token counts to the FP8 alignment for rollouts and scoring.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_opd.config.model import ModelConfig
from megatron_opd.distributed import ParallelGroups
from megatron_opd.models.fp8 import check_fp8_hardware, fp8_transformer_config_kwargs
from megatron_opd.models.hf_config import ModelInfo, read_model_info
from megatron_opd.models.megatron_checkpoint import read_conversion_metadata
from megatron_opd.models.teacher import freeze
from megatron_opd.platform import (
    has_transformer_engine,
    reset_attention_backend_env,
    restore_user_attention_env,
)

ROLES = ("student", "teacher")


def use_transformer_engine(model_config: ModelConfig) -> bool:
    """Resolve ``transformer_impl`` against what this machine has; ValueError if impossible."""
    te = has_transformer_engine()
    if model_config.transformer_impl == "transformer_engine" and not te:
        raise ValueError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not usable "
            "here (no CUDA or TE not installed); set model.transformer_impl=local or auto"
        )
    if model_config.fp8 is not None and not te:
        raise ValueError(
            f"model.fp8={model_config.fp8!r} needs CUDA and Transformer Engine, which this "
            "machine lacks; set model.fp8=null"
        )
    return model_config.transformer_impl != "local" and te


def check_parallel_layout(info: ModelInfo, groups: ParallelGroups) -> None:
    """ValueError when the model's shape cannot be split over ``groups``."""
    tp, pp = groups.tp_size, groups.pp_size
    problems = []
    if info.num_attention_heads % tp:
        problems.append(f"num_attention_heads={info.num_attention_heads}")
    if info.num_query_groups % tp:
        problems.append(f"num_key_value_heads={info.num_query_groups}")
    if info.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={info.ffn_hidden_size}")
    if problems:
        raise ValueError(
            f"tensor_parallel_size={tp} does not divide {', '.join(problems)}; choose a "
            "tensor_parallel_size that divides the number of attention and key/value heads"
        )
    if info.num_layers % pp:
        raise ValueError(
            f"pipeline_parallel_size={pp} does not divide num_hidden_layers={info.num_layers}"
        )


def transformer_config(
    info: ModelInfo, model_config: ModelConfig, groups: ParallelGroups, *, use_te: bool
):
    """The Megatron TransformerConfig of ``info`` for this layout and numerics."""
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if model_config.dtype == "bfloat16" else torch.float32
    recompute = {}
    if model_config.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}
    elif model_config.recompute == "full":
        recompute = {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": 1,
        }
    return TransformerConfig(
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        num_attention_heads=info.num_attention_heads,
        num_query_groups=info.num_query_groups,
        kv_channels=info.head_dim,
        ffn_hidden_size=info.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=info.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=info.qkv_bias,
        qk_layernorm=info.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        context_parallel_size=groups.cp_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not groups.platform.is_cuda,
        # The fused kernels need apex/TE; on the local path they must stay off.
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=use_te,
        bias_activation_fusion=use_te,
        masked_softmax_fusion=use_te,
        bias_dropout_fusion=use_te,
        **recompute,
        **fp8_transformer_config_kwargs(model_config),
    )


def process_group_collection(groups: ParallelGroups):
    """Megatron's ProcessGroupCollection filled from ``groups`` (dense models need these)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    # With context parallel fixed at 1, the TP x CP group has the TP group's ranks.
    assert groups.cp_size == 1
    return ProcessGroupCollection(
        tp=groups.tp_group,
        pp=groups.pp_group,
        cp=groups.cp_group,
        tp_cp=groups.tp_group,
        embd=groups.embedding_group,
        dp=groups.dp_group,
        dp_cp=groups.dp_cp_group,
    )


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim/2]`` with llama3 scaling (as transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(in_band, blended, scaled)


def build_model(
    model_config: ModelConfig, groups: ParallelGroups, *, role: str = "student"
) -> tuple[list[torch.nn.Module], ModelInfo]:
    """This rank's GPTModel chunk(s) for ``model_config.path`` (random init) and its info.

    Weights are loaded separately (:func:`megatron_opd.conversion.load_model_weights`).
    A ``teacher`` is frozen: eval mode, ``requires_grad=False`` (give it no optimizer).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not model_config.path:
        raise ValueError(f"model.path is empty for the {role}; set it to an HF or Megatron dir")
    info = read_model_info(
        model_config.path,
        make_vocab_size_divisible_by=model_config.make_vocab_size_divisible_by,
        tp_size=groups.tp_size,
    )
    info = _match_checkpoint_vocab_padding(info, model_config.path, groups)
    check_parallel_layout(info, groups)
    use_te = use_transformer_engine(model_config)
    if groups.platform.is_cuda:
        capability = torch.cuda.get_device_capability(groups.platform.device)
        check_fp8_hardware(model_config, role, capability)
    config = transformer_config(info, model_config, groups, use_te=use_te)
    model = build_gpt_model(info, config, groups, use_te=use_te)
    if model_config.fp8 is not None:
        from megatron_opd.mcore_compat import prepare_fp8_inference

        # Decode steps (one token per row) and rollouts of any length reach the FP8 GEMMs;
        # TE refuses token counts that are not a multiple of 16 (32 for MXFP8).
        prepare_fp8_inference(model)
    chunks = [model]
    if role == "teacher":
        freeze(chunks)
    return chunks, info


def _match_checkpoint_vocab_padding(info: ModelInfo, path, groups: ParallelGroups) -> ModelInfo:
    # A converted checkpoint stores the embedding with the padding it was written with;
    # dist_checkpointing needs the same global shape, which any TP dividing it can shard.
    metadata = read_conversion_metadata(path)
    if metadata is None:
        return info
    stored = int(metadata["padded_vocab_size"])
    if stored % groups.tp_size:
        raise ValueError(
            f"checkpoint {path} has a padded vocabulary of {stored} rows, not divisible by "
            f"tensor_parallel_size={groups.tp_size}; convert again with a "
            "make_vocab_size_divisible_by that is a multiple of the TP size"
        )
    from dataclasses import replace

    return replace(info, padded_vocab_size=stored)


def build_gpt_model(info: ModelInfo, config, groups: ParallelGroups, *, use_te: bool):
    """One GPTModel stage from a TransformerConfig (pre/post process from the PP rank)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=info.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=info.qk_norm, normalization="RMSNorm")
    reset_attention_backend_env()
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=info.padded_vocab_size,
        max_sequence_length=info.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=info.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=info.rope_theta,
        pg_collection=process_group_collection(groups),
    )
    restore_user_attention_env()
    if info.rope_scaling is not None:
        inv_freq = llama3_inv_freq(info.head_dim, info.rope_theta, info.rope_scaling)
        model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
    return model.to(groups.platform.device)
