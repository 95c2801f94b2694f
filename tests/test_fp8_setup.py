"""FP8 configured as Megatron-LM does it, checked on CPU.

References: Megatron-LM's own rules (``--fp8-param-gather`` needs the distributed
optimizer; delayed scaling cannot keep first/last layers in bf16; MXFP8 is Blackwell-only;
FP8 GEMM alignment 16, 32 for MXFP8), Megatron-Core's TransformerConfig accepting the
mapped fields, and, for the padded micro-batches, the gradients of the same batch without
padding.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.config.model import FP8_PRESETS, ModelConfig
from megatron_opd.config.parallel import ParallelConfig
from megatron_opd.models.fp8 import (
    check_fp8_hardware,
    copy_into_parameter,
    fp8_align_size,
    fp8_transformer_config_kwargs,
    keep_loaded_high_precision_values,
)
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_run import make_tiny_run
from megatron_opd.training.micro_batches import micro_batch_token_multiple

HOPPER, BLACKWELL, AMPERE = (9, 0), (10, 0), (8, 0)


def _opd(**sections):
    from megatron_opd.config.loader import build_config
    from megatron_opd.config.opd import OPDConfig

    return build_config(OPDConfig, sections)


def test_fp8_refusals_name_the_field_and_the_fix():
    bf16 = {"dtype": "bfloat16"}
    for kwargs, message in (
        ({"fp8_param": True}, "model.fp8_param and model.first_last_layers_bf16 need model.fp8"),
        ({"first_last_layers_bf16": True}, "need model.fp8"),
        (
            {"fp8": "hybrid", "fp8_recipe": "delayed", "first_last_layers_bf16": True},
            "does not work with model.fp8_recipe=delayed",
        ),
        ({"fp8": "e4m3", "num_layers_at_start_in_bf16": -1}, "num_layers_at_start_in_bf16"),
    ):
        with pytest.raises(ValueError, match=message):
            ModelConfig(**bf16, **kwargs)
    fp8_param = {"dtype": "bfloat16", "fp8": "hybrid", "fp8_recipe": "tensorwise",
                 "fp8_param": True}  # fmt: skip
    with pytest.raises(ValueError, match="parallel.use_distributed_optimizer=true"):
        _opd(student=fp8_param, parallel={"use_distributed_optimizer": False})
    with pytest.raises(ValueError, match="teacher.fp8_param is not supported"):
        _opd(teacher=fp8_param)
    _opd(student=fp8_param)  # with the distributed optimizer (the default) it is accepted


def test_mxfp8_is_refused_on_hopper_and_fp8_before_ada():
    mxfp8 = ModelConfig(**{"dtype": "bfloat16", **FP8_PRESETS["mxfp8"]})
    with pytest.raises(ValueError, match="student.fp8_recipe=mxfp8 needs a Blackwell GPU.*sm_90"):
        check_fp8_hardware(mxfp8, "student", HOPPER)
    check_fp8_hardware(mxfp8, "student", BLACKWELL)
    tensorwise = ModelConfig(**{"dtype": "bfloat16", **FP8_PRESETS["tensorwise"]})
    check_fp8_hardware(tensorwise, "teacher", HOPPER)
    with pytest.raises(ValueError, match="teacher.fp8 needs compute capability 8.9"):
        check_fp8_hardware(tensorwise, "teacher", AMPERE)
    check_fp8_hardware(ModelConfig(), "student", AMPERE)  # bf16 runs anywhere


def test_every_preset_is_a_valid_config_and_a_valid_transformer_config():
    from megatron.core.transformer import TransformerConfig

    assert set(FP8_PRESETS) == {"delayed", "tensorwise", "blockwise", "mxfp8"}
    for recipe, preset in FP8_PRESETS.items():
        model = ModelConfig(dtype="bfloat16", **preset)
        assert model.fp8_recipe == recipe
        _opd(student={"dtype": "bfloat16", **preset})
        kwargs = fp8_transformer_config_kwargs(model)
        config = TransformerConfig(
            num_layers=4, hidden_size=16, num_attention_heads=2, bf16=True,
            params_dtype=torch.bfloat16, **kwargs,
        )  # fmt: skip
        assert (config.fp8, config.fp8_recipe, config.fp8_param) == (
            preset["fp8"], recipe, preset["fp8_param"]
        )  # fmt: skip
        assert config.first_last_layers_bf16 == preset["first_last_layers_bf16"]
    delayed = fp8_transformer_config_kwargs(ModelConfig(dtype="bfloat16", **FP8_PRESETS["delayed"]))
    assert (delayed["fp8_amax_history_len"], delayed["fp8_amax_compute_algo"]) == (1024, "max")
    tensorwise = fp8_transformer_config_kwargs(
        ModelConfig(dtype="bfloat16", **FP8_PRESETS["tensorwise"], num_layers_at_end_in_bf16=2)
    )
    assert (tensorwise["num_layers_at_start_in_bf16"], tensorwise["num_layers_at_end_in_bf16"]) == (
        1, 2,
    )  # fmt: skip


def test_fp8_token_alignment():
    assert fp8_align_size(ModelConfig()) == 1
    assert fp8_align_size(ModelConfig(dtype="bfloat16", fp8="hybrid")) == 16
    assert fp8_align_size(ModelConfig(**{"dtype": "bfloat16", **FP8_PRESETS["mxfp8"]})) == 32
    fp8 = ModelConfig(dtype="bfloat16", fp8="hybrid", fp8_recipe="tensorwise")
    assert micro_batch_token_multiple(fp8, ParallelConfig()) == 16
    sp = ParallelConfig(tensor_parallel_size=2, sequence_parallel=True)
    assert micro_batch_token_multiple(fp8, sp) == 32
    assert micro_batch_token_multiple(ModelConfig(), ParallelConfig()) == 1


def test_fp8_param_gather_and_the_distributed_optimizer_at_dp1(monkeypatch):
    from types import SimpleNamespace

    import megatron.core.distributed as mcore_distributed

    from megatron_opd.training.optimizer import (
        uses_distributed_optimizer,
        wrap_student_for_training,
    )

    groups = SimpleNamespace(dp_size=1)
    parallel = ParallelConfig()
    assert not uses_distributed_optimizer(parallel, groups)  # bf16 at DP=1: nothing to shard
    assert uses_distributed_optimizer(parallel, groups, fp8_param=True)
    captured = []
    monkeypatch.setattr(
        mcore_distributed, "DistributedDataParallel",
        lambda config, ddp_config, module: captured.append(ddp_config) or module,
    )  # fmt: skip
    chunk = torch.nn.Linear(2, 2)
    chunk.config = SimpleNamespace(fp8_param=True)
    wrap_student_for_training([chunk], parallel, groups)
    assert captured[0].fp8_param_gather and captured[0].use_distributed_optimizer


class _Fp8LikeParameter(torch.nn.Parameter):
    """Mimics a TE FP8 parameter built with preserve_high_precision_init_val: it rounds
    what is copied into it and keeps a CPU copy of its initial value."""

    def get_high_precision_init_val(self):
        return self._kept


def _fp8_like(shape):
    param = _Fp8LikeParameter(torch.randn(shape), requires_grad=False)
    param._kept = param.detach().clone()  # the random init
    return param


def test_loaded_weights_replace_the_kept_high_precision_values():
    param = _fp8_like((3, 4))
    value = torch.randn(3, 4, dtype=torch.float64)
    copy_into_parameter(param, value)
    assert torch.equal(param.get_high_precision_init_val(), value.float())
    module = torch.nn.Module()
    module.weight = _fp8_like((2, 2))
    state = {"weight": torch.full((2, 2), 0.25)}
    module.load_state_dict(state)
    keep_loaded_high_precision_values(module, state)
    assert torch.equal(module.weight.get_high_precision_init_val(), state["weight"])
    plain = torch.nn.Parameter(torch.zeros(2))
    copy_into_parameter(plain, torch.ones(2))  # no kept value: just the copy
    assert torch.equal(plain.detach(), torch.ones(2))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("fp8_pad_run"))


def _gradients_with_padding(overrides):
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig
    from megatron_opd.distributed import init_distributed
    from megatron_opd.training import trainer as trainer_module
    from megatron_opd.training.setup import build_components

    config = build_config(OPDConfig, merge_overrides({}, overrides))
    groups = init_distributed(config.parallel, seed=config.training.seed)
    trainer = trainer_module.Trainer(config, groups, build_components(config, groups))
    batch = trainer.rollout_and_score()
    plan = trainer.prune_and_plan(batch)
    results = {}
    for multiple in (1, 16):
        trainer_module.micro_batch_token_multiple = lambda student, parallel, m=multiple: m
        loss_sum, num_tokens = trainer.forward_backward(batch, plan)
        grads = torch.cat(
            [p.main_grad.reshape(-1).clone() for p in trainer.student[0].parameters()]
        )
        results[multiple] = (loss_sum, num_tokens, grads)
    widths = [mb.padded_length for mb in plan.micro_batches]
    return results, widths


def test_padding_micro_batches_to_the_fp8_multiple_changes_no_gradient(tiny_run):
    overrides = [*tiny_run, "logging.log_dir=null", "logging.progress_bar=false"]
    results, widths = run_distributed(_gradients_with_padding, 1, overrides, timeout_s=240)[0]
    assert any(w % 16 for w in widths)  # the plan's widths really needed padding
    (loss_1, tokens_1, grads_1), (loss_16, tokens_16, grads_16) = results[1], results[16]
    assert tokens_1 == tokens_16
    assert loss_16 == pytest.approx(loss_1, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grads_16, grads_1, atol=1e-6, rtol=1e-5)
