"""Tiny GPTModels with the same weights under any TP/PP layout (helpers for rollout tests).

Every parameter's FULL (unsharded, whole-model) tensor is drawn from a generator seeded by
the model seed and the parameter's global name (layer index made global under PP), then
this rank keeps its tensor-parallel slice. So a TP=1 PP=1 model and a TP=2 or PP=2 model
built with the same seed are the same function, independent of Megatron's own init.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

VOCAB_SIZE = 250
"""Real vocabulary; the models are padded to PADDED_VOCAB (ids >= 250 must never appear)."""
PADDED_VOCAB = 256


def build_tiny_gpt(
    groups,
    *,
    seed: int,
    hidden: int = 32,
    num_layers: int = 2,
    heads: int = 4,
    position: str = "learned_absolute",
    max_seq: int = 64,
    noise_seed: int | None = None,
    noise_scale: float = 0.0,
):
    """This stage's part of a tiny GPTModel (local spec, fp32, CPU init)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_opd.platform import reset_attention_backend_env

    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        use_cpu_initialization=True,
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
    )
    reset_attention_backend_env()
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=PADDED_VOCAB,
        max_sequence_length=max_seq,
        position_embedding_type=position,
        share_embeddings_and_output_weights=False,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
    )
    layer_offset = groups.pp_rank * (num_layers // groups.pp_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            global_name = re.sub(
                r"decoder\.layers\.(\d+)\.",
                lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.",
                name,
            )
            full = _full_tensor(param, global_name, seed, groups.tp_size)
            if noise_seed is not None:
                full = full + noise_scale * _full_tensor(
                    param, global_name, noise_seed, groups.tp_size
                )
            if getattr(param, "tensor_model_parallel", False) and groups.tp_size > 1:
                full = full.chunk(groups.tp_size, dim=param.partition_dim)[groups.tp_rank]
            param.copy_(full)
    model.eval()
    return model


def _full_tensor(param, name: str, seed: int, tp_size: int) -> torch.Tensor:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    noise = torch.randn(shape, generator=generator)
    if name.endswith("bias"):
        return 0.05 * noise
    if "norm" in name:
        return 1.0 + 0.1 * noise
    if "word_embeddings" in name or "position_embeddings" in name:
        return noise
    scale = 2.5 if name.startswith("output_layer") else 1.0
    return scale * noise / math.sqrt(shape[1])


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    """``[len, V]`` full-vocabulary logits of one unpadded sequence, no cache (TP=1 PP=1)."""
    ids = torch.tensor([tokens])
    n = ids.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)[None, None]
    positions = torch.arange(n)[None]
    with torch.no_grad():
        return model(ids, positions, mask, runtime_gather_output=True)[0].float()
