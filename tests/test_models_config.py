"""ModelConfig validation, HF config parsing, FP8 mapping, RoPE scaling, teacher helpers."""

import pytest
import torch

from megatron_opd.config.model import ModelConfig
from megatron_opd.models import (
    fp8_transformer_config_kwargs,
    freeze,
    offload_to_cpu,
    onload,
    padded_vocab_size,
    read_model_info,
    use_transformer_engine,
)
from megatron_opd.models.builder import llama3_inv_freq
from megatron_opd.models.tiny import LLAMA3_ROPE, make_tiny_hf_model, tiny_hf_config


def test_model_config_rejects_bad_values_naming_the_field():
    for kwargs, field in (
        ({"dtype": "float16"}, "model.dtype"),
        ({"fp8": "e5m2"}, "model.fp8"),
        ({"fp8_recipe": "fancy"}, "model.fp8_recipe"),
        ({"fp8": "hybrid"}, "model.fp8 needs model.dtype=bfloat16"),
        ({"fp8": "e4m3", "dtype": "bfloat16", "transformer_impl": "local"}, "transformer_impl"),
        ({"transformer_impl": "te"}, "model.transformer_impl"),
        ({"make_vocab_size_divisible_by": 0}, "make_vocab_size_divisible_by"),
        ({"recompute": "partial"}, "model.recompute"),
    ):
        with pytest.raises(ValueError, match=field):
            ModelConfig(**kwargs)


def test_fp8_settings_map_onto_transformer_config_and_are_refused_without_te():
    from megatron.core.transformer import TransformerConfig

    assert fp8_transformer_config_kwargs(ModelConfig()) == {}
    config = ModelConfig(
        dtype="bfloat16", fp8="hybrid", fp8_recipe="delayed", fp8_amax_history_len=16
    )
    kwargs = fp8_transformer_config_kwargs(config)
    assert kwargs == {
        "fp8": "hybrid",
        "fp8_recipe": "delayed",
        "fp8_param": False,
        "fp8_amax_history_len": 16,
        "fp8_amax_compute_algo": "max",
    }
    blockwise = ModelConfig(dtype="bfloat16", fp8="e4m3", fp8_recipe="blockwise", fp8_param=True)
    assert fp8_transformer_config_kwargs(blockwise) == {
        "fp8": "e4m3",
        "fp8_recipe": "blockwise",
        "fp8_param": True,
    }
    transformer = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, bf16=True,
        params_dtype=torch.bfloat16, **kwargs,
    )  # fmt: skip
    assert (transformer.fp8, transformer.fp8_recipe, transformer.fp8_amax_history_len) == (
        "hybrid",
        "delayed",
        16,
    )
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA and Transformer Engine"):
            use_transformer_engine(config)
        with pytest.raises(ValueError, match="Transformer Engine is not usable"):
            use_transformer_engine(ModelConfig(transformer_impl="transformer_engine"))
        assert use_transformer_engine(ModelConfig()) is False


def test_read_model_info_per_family(tmp_path):
    qwen3 = read_model_info(make_tiny_hf_model(tmp_path / "q3", "qwen3", tie_word_embeddings=True))
    assert (qwen3.family, qwen3.qk_norm, qwen3.qkv_bias, qwen3.tie_word_embeddings) == (
        "qwen3", True, False, True,
    )  # fmt: skip
    assert (qwen3.head_dim, qwen3.num_query_groups, qwen3.padded_vocab_size) == (16, 2, 256)
    qwen2 = read_model_info(make_tiny_hf_model(tmp_path / "q2", "qwen2"))
    assert (qwen2.family, qwen2.qkv_bias, qwen2.rope_theta, qwen2.rope_scaling) == (
        "qwen2", True, 1000000.0, None,
    )  # fmt: skip
    llama = read_model_info(make_tiny_hf_model(tmp_path / "ll", "llama"), tp_size=2)
    assert llama.rope_scaling["original_max_position_embeddings"] == 32
    assert llama.rope_theta == 500000.0 and llama.padded_vocab_size == 256
    # Real vocabularies: Qwen3 151936 is a multiple of 128 but not of 256.
    assert padded_vocab_size(151936, 128, 1) == 151936
    assert padded_vocab_size(151936, 128, 2) == 152064
    assert padded_vocab_size(128256, 128, 8) == 129024


def test_llama3_rope_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tiny_hf_config("llama")
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    ours = llama3_inv_freq(16, 500000.0, scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    unscaled = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert not torch.allclose(ours, unscaled)  # the scaling really changes the spectrum


def test_teacher_is_frozen_and_offload_is_a_noop_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    freeze([model])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    weight = model[0].weight.data_ptr()
    offload_to_cpu([model])
    onload([model], torch.device("cpu"))
    assert model[0].weight.data_ptr() == weight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_round_trip_on_gpu():
    model = torch.nn.Linear(4, 4).cuda()
    before = model.weight.detach().clone()
    offload_to_cpu([model])
    assert model.weight.device.type == "cpu"
    onload([model], torch.device("cuda", torch.cuda.current_device()))
    assert model.weight.is_cuda and torch.equal(model.weight, before)
