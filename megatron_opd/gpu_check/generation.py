"""Step ``generation``: KV-cached rollouts of the Megatron-native engine, in tokens/s.

A random model of Qwen3-0.6B's shape (28 layers, hidden 1024, 16/8 heads of 128,
151,936-token vocabulary) in bf16 with the local layer spec samples ``batch`` rows of
``new_tokens`` tokens after ``prompt_tokens``-token prompts, greedily, with no EOS so
every row runs to the end. One warm-up call, then the timed call.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

QWEN3_0P6B_SHAPE = dict(
    vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
    num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=4096,
)  # fmt: skip


def generation_check(work_dir: Path, *, device: str, batch: int = 64, prompt_tokens: int = 128,
                     new_tokens: int = 128, shape: dict | None = None,
                     dtype: str = "bfloat16") -> dict:  # fmt: skip
    """Tokens/s of ``MegatronRolloutEngine.generate`` on a random model of ``shape``."""
    from megatron_opd.config.model import ModelConfig
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.config.rollout import RolloutConfig
    from megatron_opd.distributed import destroy_model_parallel, init_distributed
    from megatron_opd.models import build_model
    from megatron_opd.models.tiny import tiny_hf_config
    from megatron_opd.rollout.megatron_engine import MegatronRolloutEngine

    shape = dict(shape or QWEN3_0P6B_SHAPE)
    model_dir = work_dir / "generation_model"
    tiny_hf_config("qwen3", **shape).save_pretrained(model_dir)  # config only: random init
    groups = init_distributed(ParallelConfig(force_cpu=device == "cpu"), seed=0)
    try:
        config = ModelConfig(path=str(model_dir), dtype=dtype, transformer_impl="local")
        (model,), info = build_model(config, groups, role="teacher")
        if dtype == "bfloat16":
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        rollout = RolloutConfig(temperature=0.0, n_samples_per_prompt=1,
                                max_new_tokens=new_tokens)  # fmt: skip
        engine = MegatronRolloutEngine(
            model, groups, rollout, eos_token_ids=[], vocab_size=info.vocab_size
        )
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, info.vocab_size, (batch, prompt_tokens), generator=generator)
        prompts = prompts.tolist()
        engine.generate(prompts[: min(batch, 4)], max_new_tokens=4, seed=0)  # warm-up
        if groups.platform.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=new_tokens, seed=0)
        if groups.platform.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    finally:
        destroy_model_parallel()
    generated = int(out.response_lengths.sum())
    return {
        "model_shape": shape,
        "dtype": dtype,
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "generated_tokens": generated,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(generated / seconds, 1),
        "passed": generated == batch * new_tokens,
    }
