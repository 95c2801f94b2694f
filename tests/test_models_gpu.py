"""GPU only: the Transformer Engine layer spec loads HF weights exactly; an FP8 forward runs.

Skipped without CUDA and Transformer Engine. Runs in-process as a world of one.
"""

import os

import pytest
import torch

from megatron_opd.platform import has_transformer_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not has_transformer_engine(),
        reason="needs CUDA and Transformer Engine",
    ),
]


def test_te_spec_matches_transformers_and_fp8_forward_runs(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_opd.config.model import ModelConfig
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.conversion import gather_full_logits, load_model_weights
    from megatron_opd.distributed import destroy_distributed, init_distributed
    from megatron_opd.models import build_model
    from megatron_opd.models.tiny import make_tiny_hf_model
    from megatron_opd.testing.multiprocess import free_port

    path = make_tiny_hf_model(tmp_path / "qwen3", "qwen3", seed=0)
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(ids).logits
    os.environ.update(
        RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    groups = init_distributed(ParallelConfig())
    try:
        config = ModelConfig(path=str(path), transformer_impl="transformer_engine")
        chunks, info = build_model(config, groups, role="teacher")
        assert any("layer_norm_weight" in name for name, _ in chunks[0].named_parameters())
        load_model_weights(chunks, config, info, groups)
        logits = gather_full_logits(chunks, ids, info, groups)
        assert (logits - reference).abs().max().item() < 2e-3

        from megatron.core.transformer.module import Float16Module

        fp8 = ModelConfig(path=str(path), dtype="bfloat16", fp8="hybrid", fp8_recipe="tensorwise")
        chunks, info = build_model(fp8, groups, role="teacher")
        assert chunks[0].config.fp8 == "hybrid"
        load_model_weights(chunks, fp8, info, groups)
        wrapped = Float16Module(chunks[0].config, chunks[0])
        logits = gather_full_logits(wrapped, ids, info, groups)
        assert torch.isfinite(logits).all()
        assert (logits - reference).abs().max().item() < 0.5
    finally:
        destroy_distributed()
