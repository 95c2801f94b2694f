"""GPU only: the vLLM engine with real vLLM samples from the pushed student weights.

Skipped without CUDA and the vllm package (written for a GPU session; not yet run on one).
Reference: the sampled tokens' log-probs that vLLM reports (raw logits, temperature 1)
against the Megatron student's own log-probs of the same tokens (the scoring pass).
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_opd.platform import has_module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not has_module("vllm"), reason="needs CUDA and vLLM"
    ),
]


def test_vllm_rollouts_follow_the_megatron_student(tmp_path):
    from megatron_opd.config.model import ModelConfig
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.config.rollout import RolloutConfig
    from megatron_opd.conversion import load_model_weights
    from megatron_opd.conversion.export import broadcast_hf_weights
    from megatron_opd.distributed import destroy_distributed, init_distributed
    from megatron_opd.models import build_model
    from megatron_opd.models.tiny import make_tiny_hf_model
    from megatron_opd.rollout.vllm_engine import VLLMRolloutEngine
    from megatron_opd.scoring import score_rollouts
    from megatron_opd.testing.multiprocess import free_port

    path = make_tiny_hf_model(
        tmp_path / "student", "qwen3", seed=0, hidden_size=256, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, intermediate_size=512, num_hidden_layers=2,
    )  # fmt: skip
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))  # fmt: skip
    groups = init_distributed(ParallelConfig(), seed=0)
    try:
        config = ModelConfig(path=str(path), dtype="float32", transformer_impl="local")
        chunks, info = build_model(config, groups, role="teacher")
        load_model_weights(chunks, config, info, groups)
        rollout = RolloutConfig(engine="vllm", n_samples_per_prompt=2, max_new_tokens=16)
        rollout.vllm.gpu_memory_utilization = 0.3
        engine = VLLMRolloutEngine(
            groups, rollout, hf_model_dir=str(path),
            hf_weights=lambda: broadcast_hf_weights(chunks, info, groups),
            eos_token_ids=[2], pad_id=0, dtype="float32", max_model_len=64,
        )  # fmt: skip
        engine.sync_weights()
        prompts = [[5, 17, 33, 9], [101, 3, 64]]
        batch = engine.generate(prompts, max_new_tokens=16, seed=3)
        assert batch.batch_size == 4 and batch.response_lengths.min() > 0
        score_rollouts(batch, student=chunks[0], teacher=chunks[0], groups=groups, top_k=4,
                       micro_batch_size=4, vocab_size=info.vocab_size)  # fmt: skip
        mask = batch.response_mask()
        diff = (batch.sampled_log_probs - batch.student_sampled_log_probs)[mask].abs().max()
        assert diff.item() < 2e-2, diff  # vLLM's fp32 kernels vs Megatron's
    finally:
        destroy_distributed()
