"""Prompt datasets, tokenizers, and the built-in chain-sum task."""

from megatron_opd.data.prompts import (
    Prompt,
    PromptLoader,
    epoch_order,
    load_prompt_dataset,
    prompt_loader_from_config,
)
from megatron_opd.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_same_vocabulary,
    load_tokenizer,
)

__all__ = [
    "HFTokenizer",
    "Prompt",
    "PromptLoader",
    "SentencePieceTokenizer",
    "Tokenizer",
    "check_same_vocabulary",
    "epoch_order",
    "load_prompt_dataset",
    "load_tokenizer",
    "prompt_loader_from_config",
]
