"""Tiny random HF models (llama, qwen2, qwen3) built from configs with a fixed seed.

For tests and CPU demos: no download. Weights are the HF initialisation plus seeded noise
on every tensor (norm weights and biases included), so a mapping that drops or swaps a
tensor changes the logits. A word-level ``tokenizer.json`` with ``vocab_size`` entries is
written alongside so that ``AutoTokenizer`` loads the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SHAPE = {
    "vocab_size": 250,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}
"""Default shape: 250 is not a multiple of 128, so the vocabulary padding is exercised."""

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
"""llama3 scaling whose band boundaries fall inside a head_dim-16 spectrum."""


def tiny_hf_config(family: str, *, tie_word_embeddings: bool | None = None, **overrides):
    """A transformers config of ``family`` (llama/qwen2/qwen3) with the tiny shape."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    shape = {**TINY_SHAPE, **overrides}
    if family == "llama":
        config = LlamaConfig(**shape, rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0)
        architecture = "LlamaForCausalLM"
    elif family == "qwen2":
        config = Qwen2Config(**shape, rope_theta=1000000.0)
        architecture = "Qwen2ForCausalLM"
    elif family == "qwen3":
        head_dim = shape.pop("head_dim", 16)
        config = Qwen3Config(**shape, head_dim=head_dim, rope_theta=1000000.0)
        architecture = "Qwen3ForCausalLM"
    else:
        raise ValueError(f"family must be llama, qwen2 or qwen3, got {family!r}")
    config.architectures = [architecture]
    if tie_word_embeddings is not None:
        config.tie_word_embeddings = tie_word_embeddings
    config.bos_token_id, config.eos_token_id = 1, 2
    return config


def write_word_level_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """A word-level tokenizer.json (+ config) with tokens ``<unk>, <s>, </s>, t3, ...``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(Path(out_dir) / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def make_tiny_hf_model(
    out_dir: str | Path,
    family: str,
    *,
    seed: int = 0,
    tie_word_embeddings: bool | None = None,
    noise: float = 0.05,
    **overrides,
) -> Path:
    """Save a seeded tiny ``family`` model (safetensors, config, tokenizer) in ``out_dir``."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, tie_word_embeddings=tie_word_embeddings, **overrides)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    write_word_level_tokenizer(out_dir, config.vocab_size)
    return out_dir
