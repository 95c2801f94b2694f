"""An HF ``config.json`` read into :class:`ModelInfo`: the architecture in one place.

Three decoder families are supported, all "pre-norm RMSNorm + GQA attention with RoPE +
SwiGLU MLP"; they differ only in small switches:

- ``llama`` (LlamaForCausalLM): optional llama3 RoPE frequency scaling, usually untied.
- ``qwen2`` (Qwen2ForCausalLM, also DeepSeek-R1-Distill-Qwen): bias on q/k/v projections.
- ``qwen3`` (Qwen3ForCausalLM): RMSNorm on each query and key head (qk-norm), explicit
  ``head_dim`` that may differ from hidden/heads.

transformers 5 writes RoPE settings as ``rope_parameters`` (with ``rope_theta`` inside);
older checkpoints use top-level ``rope_theta`` and ``rope_scaling``. Both are read.

The real vocabulary size is ``config.json``'s ``vocab_size`` (the rows of the HF
embedding). Megatron pads it to a multiple of ``make_vocab_size_divisible_by * TP``;
the padded rows are zero in the embedding and the output layer, and downstream code masks
logits at ids >= ``vocab_size``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
"""HF ``architectures[0]`` -> family name of the conversion table."""

HF_CONFIG_SUBDIR = "hf_config"
"""Sub-directory of a converted Megatron checkpoint holding config.json and tokenizer."""


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Everything about a model's architecture that building, loading and exporting need."""

    family: str
    """``llama``, ``qwen2`` or ``qwen3`` (selects the conversion table)."""
    architecture: str
    """HF class name, e.g. ``Qwen3ForCausalLM``."""
    num_layers: int
    """Transformer layers in the whole model (all pipeline stages)."""
    hidden_size: int
    """Model width h."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups)."""
    head_dim: int
    """Channels per head (Megatron's kv_channels)."""
    ffn_hidden_size: int
    """MLP intermediate size (per gate/up projection)."""
    vocab_size: int
    """Real vocabulary size: rows of the HF embedding; ids >= this are padding."""
    padded_vocab_size: int
    """Vocabulary rows in the Megatron model (multiple of divisible_by * TP)."""
    tie_word_embeddings: bool
    """Output layer shares the input embedding."""
    rope_theta: float
    """RoPE base."""
    rope_scaling: dict[str, Any] | None
    """llama3 scaling parameters (factor, low/high_freq_factor,
    original_max_position_embeddings), or None."""
    rms_norm_eps: float
    """RMSNorm epsilon (also used by qk-norm)."""
    qkv_bias: bool
    """Bias on q/k/v projections (qwen2)."""
    qk_norm: bool
    """RMSNorm on each query/key head (qwen3)."""
    max_position_embeddings: int
    """Longest sequence the model was trained for."""
    hf_config: dict[str, Any] = field(repr=False)
    """The raw config.json, written back on export."""
    hf_dir: str = ""
    """Directory that holds config.json and the tokenizer files."""


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: round up to a multiple of ``divisible_by * tp_size``."""
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def find_hf_config_dir(path: str | Path) -> Path:
    """The directory with config.json: ``path`` itself (HF) or ``path/hf_config`` (Megatron)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / HF_CONFIG_SUBDIR / "config.json").is_file():
        return path / HF_CONFIG_SUBDIR
    raise ValueError(
        f"model path {str(path)!r} has no config.json (nor {HF_CONFIG_SUBDIR}/config.json); "
        "point model.path at an HF model directory or a converted Megatron checkpoint"
    )


def read_model_info(
    path: str | Path,
    *,
    make_vocab_size_divisible_by: int = 128,
    tp_size: int = 1,
) -> ModelInfo:
    """Parse ``config.json`` under ``path`` (HF dir or converted checkpoint) into ModelInfo.

    Raises ValueError naming the architecture when it is not supported, or the field
    when the config uses a feature the conversion does not implement.
    """
    config_dir = find_hf_config_dir(path)
    config = json.loads((config_dir / "config.json").read_text())
    return model_info_from_hf_config(
        config,
        hf_dir=str(config_dir),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tp_size=tp_size,
    )


def model_info_from_hf_config(
    config: dict[str, Any],
    *,
    hf_dir: str = "",
    make_vocab_size_divisible_by: int = 128,
    tp_size: int = 1,
) -> ModelInfo:
    """:func:`read_model_info` on an already loaded config dict."""
    architectures = config.get("architectures") or []
    architecture = (
        architectures[0] if architectures else f"<none; model_type={config.get('model_type')!r}>"
    )
    if architecture not in ARCHITECTURE_FAMILIES:
        raise ValueError(
            f"unsupported architecture {architecture!r} in config.json; supported: "
            f"{', '.join(sorted(ARCHITECTURE_FAMILIES))}"
        )
    family = ARCHITECTURE_FAMILIES[architecture]

    def need(name: str) -> Any:
        if name not in config:
            raise ValueError(f"config.json of {architecture} lacks the field {name!r}")
        return config[name]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    groups = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"config.json hidden_act={config['hidden_act']!r} is not supported; only silu (SwiGLU)"
        )
    if config.get("mlp_bias"):
        raise ValueError(
            "config.json mlp_bias=true is not supported (no MLP biases in the mapping)"
        )
    if family == "qwen2" and config.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true is not supported; set it to false")
    if family == "qwen2":
        qkv_bias = True
    else:
        qkv_bias = bool(config.get("attention_bias", False))
    rope_theta, rope_scaling = _read_rope(config)
    vocab = int(need("vocab_size"))
    return ModelInfo(
        family=family,
        architecture=architecture,
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        ffn_hidden_size=int(need("intermediate_size")),
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, make_vocab_size_divisible_by, tp_size),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_norm=family == "qwen3",
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        hf_config=config,
        hf_dir=hf_dir,
    )


def _read_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"config.json rope type {rope_type!r} is not supported; supported: default, llama3"
        )
    scaling = {
        "factor": float(params["factor"]),
        "low_freq_factor": float(params.get("low_freq_factor", 1.0)),
        "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": int(
            params.get("original_max_position_embeddings", 8192)
        ),
    }
    return theta, scaling
