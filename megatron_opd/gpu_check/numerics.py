"""Steps ``logits`` and ``vocab_ops``: numbers the GPU path must get right.

``logits``: a random Qwen3-shaped HF model is loaded into the local Megatron spec in bf16
and run next to transformers on the same device. The reference is transformers in fp32;
the check passes when Megatron's bf16 error is within twice transformers' own bf16 error
(plus a small floor), i.e. the conversion adds nothing beyond bf16 rounding.

``vocab_ops``: the vocabulary-parallel top-k / log-probs / log-sum-exp on one rank
(``tp_group=None``) against ``torch.topk`` of ``log_softmax`` and ``torch.logsumexp``
on the same ``[tokens, vocab]`` bf16 logits, with timings of both.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def logits_check(work_dir: Path, *, device: str, hidden: int = 256, layers: int = 4,
                 vocab: int = 1000, tokens: int = 64) -> dict:  # fmt: skip
    """Megatron bf16 vs transformers bf16, both against transformers fp32."""
    from transformers import AutoModelForCausalLM

    from megatron_opd.config.model import ModelConfig
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.conversion import gather_full_logits, load_model_weights
    from megatron_opd.distributed import destroy_model_parallel, init_distributed
    from megatron_opd.models import build_model
    from megatron_opd.models.tiny import make_tiny_hf_model

    path = make_tiny_hf_model(
        work_dir / "logits_model", "qwen3", seed=0, vocab_size=vocab, hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=hidden * 3, head_dim=hidden // 8, max_position_embeddings=512,
    )  # fmt: skip
    ids = torch.randint(3, vocab, (2, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        reference = hf32(ids.to(device)).logits.float().cpu()
        del hf32
        hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        transformers_bf16 = hf16(ids.to(device)).logits.float().cpu()
        del hf16
    groups = init_distributed(ParallelConfig(force_cpu=device == "cpu"), seed=0)
    try:
        from megatron.core.transformer.module import Float16Module

        config = ModelConfig(path=str(path), dtype="bfloat16", transformer_impl="local")
        chunks, info = build_model(config, groups, role="teacher")
        load_model_weights(chunks, config, info, groups)
        wrapped = Float16Module(chunks[0].config, chunks[0])
        megatron_bf16 = gather_full_logits(wrapped, ids, info, groups).float().cpu()
    finally:
        destroy_model_parallel()
    ours = (megatron_bf16 - reference).abs().max().item()
    theirs = (transformers_bf16 - reference).abs().max().item()
    agree = (megatron_bf16.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return {
        "shape": [2, tokens, vocab],
        "max_abs_err_megatron_bf16": ours,
        "max_abs_err_transformers_bf16": theirs,
        "top1_agreement_with_fp32": agree,
        "passed": ours <= 2.0 * theirs + 1e-2,
    }


def _timed(fn, device: str, repeats: int = 3):
    result = fn()  # warm-up (and the value compared)
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return result, (time.perf_counter() - start) / repeats


def vocab_ops_check(*, device: str, tokens: int = 8192, vocab: int = 151936, k: int = 16,
                    dtype: torch.dtype = torch.bfloat16) -> dict:  # fmt: skip
    """Top-k ids / log-probs and log-sum-exp of ``[tokens, vocab]`` logits vs torch."""
    from megatron_opd.ops.vocab_parallel import (
        vocab_parallel_logsumexp,
        vocab_parallel_topk_log_probs,
    )

    generator = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=generator, device=device) * 3).to(dtype)
    with torch.no_grad():
        (log_probs, ids, lse), ours_s = _timed(
            lambda: vocab_parallel_topk_log_probs(logits, k, None), device
        )
        lse_only, _ = _timed(lambda: vocab_parallel_logsumexp(logits, None), device)

        def reference():
            full = logits.float().log_softmax(-1)
            values, ref_ids = torch.topk(full, k, dim=-1)
            return values, ref_ids, torch.logsumexp(logits.float(), dim=-1)

        (ref_values, ref_ids, ref_lse), torch_s = _timed(reference, device)
    # Ties: equal logits may list ids in another order; compare the values at our ids.
    at_ours = logits.float().log_softmax(-1).gather(-1, ids)
    value_err = (log_probs - ref_values).abs().max().item()
    id_value_err = (at_ours - ref_values).abs().max().item()
    lse_err = max((lse - ref_lse).abs().max().item(), (lse_only - ref_lse).abs().max().item())
    return {
        "shape": [tokens, vocab],
        "dtype": str(dtype).replace("torch.", ""),
        "k": k,
        "max_abs_err_topk_log_probs": value_err,
        "max_abs_err_log_probs_at_our_ids": id_value_err,
        "ids_equal_fraction": (ids == ref_ids).all(-1).float().mean().item(),
        "max_abs_err_logsumexp": lse_err,
        "ops_ms": round(ours_s * 1e3, 3),
        "torch_ms": round(torch_s * 1e3, 3),
        "passed": value_err < 1e-3 and id_value_err < 1e-3 and lse_err < 1e-3,
    }
