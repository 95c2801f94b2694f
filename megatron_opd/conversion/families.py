"""One declarative HF <-> Megatron name table per model family.

Megatron names are those of the local layer spec; the Transformer Engine spec fuses the
two pre-norms into the following linear layer, which :func:`canonical_megatron_name`
maps back (the dist_checkpointing keys are the same for both specs).
"""

from __future__ import annotations

import re

from megatron_opd.conversion.mapping import (
    FusedQKV,
    GatedMLP,
    Linear,
    Mapping,
    Replicated,
    VocabRows,
)
from megatron_opd.models.hf_config import ModelInfo

_L = "decoder.layers.*."
_H = "model.layers.*."

_DENSE_DECODER: tuple[Mapping, ...] = (
    VocabRows("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Replicated(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
    FusedQKV(
        _L + "self_attention.linear_qkv.weight",
        (
            _H + "self_attn.q_proj.weight",
            _H + "self_attn.k_proj.weight",
            _H + "self_attn.v_proj.weight",
        ),
    ),  # fmt: skip
    Linear(
        _L + "self_attention.linear_proj.weight",
        (_H + "self_attn.o_proj.weight",),
        tp_dim=1,
        rows="hidden_size",
        cols="num_attention_heads*head_dim",
    ),
    Replicated(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
    GatedMLP(
        _L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight")
    ),
    Linear(
        _L + "mlp.linear_fc2.weight",
        (_H + "mlp.down_proj.weight",),
        tp_dim=1,
        rows="hidden_size",
        cols="ffn_hidden_size",
    ),
    Replicated("decoder.final_layernorm.weight", ("model.norm.weight",)),
)
_OUTPUT = VocabRows("output_layer.weight", ("lm_head.weight",))
_TIED_OUTPUT = VocabRows("output_layer.weight", ("model.embed_tokens.weight",))
_QKV_BIAS = FusedQKV(
    _L + "self_attention.linear_qkv.bias",
    (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
)
_QK_NORM = (
    Replicated(
        _L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), "head_dim"
    ),
    Replicated(
        _L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), "head_dim"
    ),
)

FAMILY_TABLES: dict[str, tuple[Mapping, ...]] = {
    "llama": _DENSE_DECODER,
    "qwen2": (*_DENSE_DECODER, _QKV_BIAS),
    "qwen3": (*_DENSE_DECODER, *_QK_NORM),
}
"""Family -> mappings every model of the family has (output layer and optional q/k/v
bias are added by :func:`mappings_for` from the config)."""

IGNORED_HF_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
"""HF tensors that carry no weights (recomputed from the config)."""

_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def mappings_for(info: ModelInfo) -> tuple[Mapping, ...]:
    """The mappings of ``info``'s family for its switches (bias, tied output)."""
    table = FAMILY_TABLES[info.family]
    if info.qkv_bias and _QKV_BIAS not in table:
        table = (*table, _QKV_BIAS)
    return (*table, _TIED_OUTPUT if info.tie_word_embeddings else _OUTPUT)


def canonical_megatron_name(name: str) -> str:
    """Local-spec name of a (possibly Transformer Engine) Megatron parameter name."""
    for local, te in _TE_NAMES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def _pattern(name_pattern: str) -> re.Pattern:
    return re.compile(re.escape(name_pattern).replace(r"\*", r"(\d+)") + "$")


_PATTERNS: dict[str, re.Pattern] = {}


def match(mappings: tuple[Mapping, ...], megatron_name: str, layer_offset: int):
    """(mapping, HF names) for a stage-local Megatron name, or None if no mapping has it.

    ``layer_offset`` turns the stage-local layer index into the global one.
    """
    name = canonical_megatron_name(megatron_name)
    for mapping in mappings:
        pattern = _PATTERNS.setdefault(mapping.megatron, _pattern(mapping.megatron))
        found = pattern.match(name)
        if found:
            if "*" in mapping.megatron:
                layer = str(int(found.group(1)) + layer_offset)
                return mapping, tuple(h.replace("*", layer) for h in mapping.hf)
            return mapping, mapping.hf
    return None


def expected_hf_tensors(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the model must have, with its shape."""
    expected: dict[str, tuple[int, ...]] = {}
    for mapping in mappings_for(info):
        layers = range(info.num_layers) if "*" in mapping.megatron else [None]
        for layer in layers:
            for name, shape in zip(mapping.hf, mapping.hf_shapes(info), strict=True):
                expected[name if layer is None else name.replace("*", str(layer))] = shape
    return expected
