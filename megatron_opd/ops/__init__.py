"""Vocabulary-parallel ops over logits sharded ``[..., V/TP]`` on a tensor-parallel group."""

from megatron_opd.ops.topk_select import topk_membership
from megatron_opd.ops.vocab_parallel import (
    topk_overlap,
    vocab_parallel_entropy,
    vocab_parallel_gather,
    vocab_parallel_log_probs,
    vocab_parallel_logsumexp,
    vocab_parallel_topk,
    vocab_parallel_topk_log_probs,
)

__all__ = [
    "topk_membership",
    "topk_overlap",
    "vocab_parallel_entropy",
    "vocab_parallel_gather",
    "vocab_parallel_log_probs",
    "vocab_parallel_logsumexp",
    "vocab_parallel_topk",
    "vocab_parallel_topk_log_probs",
]
