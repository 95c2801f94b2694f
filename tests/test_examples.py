"""The recipes in examples/ load into OPDConfig and say what the paper and release say.

Loading a config never touches the model or data paths, so no model is needed. The
expected numbers are typed in from docs PRUNE_OPD.md (sections 3, 4 and 6), not read
from the code's defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_opd.config.loader import config_to_dict, load_config
from megatron_opd.config.opd import OPDConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(EXAMPLES.glob("*.yaml"))
GPU_RECIPES = [p for p in RECIPES if p.name != "tiny_cpu.yaml"]
GPUS_PER_NODE = 8


def load(name: str) -> OPDConfig:
    return load_config(OPDConfig, EXAMPLES / name)


def flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, prefix + key + "."))
        else:
            flat[prefix + key] = value
    return flat


def differing_fields(a: OPDConfig, b: OPDConfig) -> set[str]:
    fa, fb = flatten(config_to_dict(a)), flatten(config_to_dict(b))
    assert fa.keys() == fb.keys()
    return {k for k in fa if fa[k] != fb[k]}


RUN_DIRS = {"checkpoint.save_dir", "checkpoint.export_hf_dir", "logging.log_dir"}


def test_all_expected_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {
        "qwen3_1p7b_from_qwen3_8b.yaml",
        "qwen3_1p7b_from_qwen3_8b_fp8.yaml",
        "r1_distill_1p5b_from_justrl_1p5b.yaml",
        "qwen3_4b_base_from_qwen3_4b.yaml",
        "plain_opd_baseline.yaml",
        "tiny_cpu.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_documents_itself(path: Path):
    config = load_config(OPDConfig, path)
    assert isinstance(config, OPDConfig)
    text = path.read_text()
    header = text.split("\n\n", 1)[0]
    assert all(line.startswith("#") for line in header.splitlines()), "header comment first"
    # The launch line names this very file (catches copy-paste from another recipe).
    assert f"examples/{path.name}" in header
    assert "Hardware assumed" in header


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipes_follow_the_paper_protocol(path: Path):
    c = load_config(OPDConfig, path)
    # PRUNE_OPD.md section 6.
    assert c.rollout.n_samples_per_prompt == 4
    assert c.rollout.temperature == 1.0
    assert c.data.prompts_per_step == 64
    assert c.training.num_steps == 203
    assert c.training.lr == 1e-6
    assert c.data.max_prompt_length == 1024
    assert c.rollout.max_new_tokens == 12288
    assert c.budget.max_len == 12288
    assert (c.eval.k, c.eval.temperature, c.eval.top_p, c.eval.max_new_tokens) == (
        16,
        1.0,
        0.95,
        31744,
    )
    assert len(c.eval.datasets) == 5
    assert c.data.train_path.endswith(".parquet") and "dapo" in c.data.train_path.lower()
    assert c.student.dtype == c.teacher.dtype == "bfloat16"
    assert c.training.weight_decay == 0.01  # verl's actor optimizer default, as released
    assert c.prune.mode == "released"  # the paper's runs use the authors' objective
    # A whole 8-GPU node splits into replicas, and each replica gets whole prompts.
    model_parallel = c.parallel.tensor_parallel_size * c.parallel.pipeline_parallel_size
    assert GPUS_PER_NODE % model_parallel == 0
    assert c.data.prompts_per_step % (GPUS_PER_NODE // model_parallel) == 0
    # A full-length row fits one training micro-batch.
    assert c.training.micro_batch_tokens >= c.data.max_prompt_length + c.budget.max_len
    # Smallest context of the models used (Qwen3-4B-Base: 32768 positions).
    assert c.data.max_prompt_length + c.eval.max_new_tokens <= 32768


@pytest.mark.parametrize(
    "name", ["qwen3_1p7b_from_qwen3_8b.yaml", "qwen3_1p7b_from_qwen3_8b_fp8.yaml"]
)
def test_qwen3_recipe_has_release_prune_values(name: str):
    c = load(name)
    assert c.prune.enable and c.budget.enable
    assert c.prune.metric == "overlap"
    assert c.prune.threshold == 0.7
    assert c.prune.w_drop == 0.01
    assert c.prune.w_base == 0.5
    assert c.prune.top_k == 16
    b = c.budget
    assert (b.init_len, b.min_len, b.max_len, b.step, b.margin) == (1024, 1024, 12288, 100, 100)
    assert b.hit_ratio == 0.1 and b.shrink_patience == 3
    assert c.loss.kind == "topk_reverse_kl_pg"
    assert (c.loss.id_set, c.loss.reward_weight) == ("only_stu", "student_p")
    assert c.parallel.tensor_parallel_size == 2 and c.parallel.pipeline_parallel_size == 1
    assert c.student.path.endswith("Qwen3-1.7B") and c.teacher.path.endswith("Qwen3-8B")


def test_paper_pairs_and_their_budget_start():
    r1 = load("r1_distill_1p5b_from_justrl_1p5b.yaml")
    assert "R1-Distill-Qwen-1.5B" in r1.student.path and "JustRL" in r1.teacher.path
    assert r1.budget.init_len == 2048
    qwen = load("qwen3_4b_base_from_qwen3_4b.yaml")
    assert qwen.student.path.endswith("Qwen3-4B-Base") and qwen.teacher.path.endswith("Qwen3-4B")
    assert qwen.budget.init_len == 1024
    # The release runs this pair with non-thinking Qwen3 prompts; the R1 pair has no switch.
    assert qwen.data.enable_thinking is False and r1.data.enable_thinking is None
    for c in (r1, qwen):
        assert (c.prune.threshold, c.prune.w_drop, c.prune.w_base, c.prune.top_k) == (
            0.7,
            0.01,
            0.5,
            16,
        )


def test_fp8_recipe_differs_from_bf16_only_in_the_students_fp8():
    bf16 = load("qwen3_1p7b_from_qwen3_8b.yaml")
    fp8 = load("qwen3_1p7b_from_qwen3_8b_fp8.yaml")
    assert fp8.student.fp8 == "hybrid" and fp8.student.fp8_recipe == "delayed"
    assert fp8.teacher.fp8 is None  # the teacher stays bf16
    for model in (fp8.student, fp8.teacher):
        assert model.dtype == "bfloat16" and model.transformer_impl == "transformer_engine"
    expected = {"student.fp8", "student.transformer_impl", "teacher.transformer_impl"}
    assert differing_fields(bf16, fp8) == expected | RUN_DIRS


def test_plain_opd_baseline_differs_only_in_the_method():
    prune_opd = load("qwen3_1p7b_from_qwen3_8b.yaml")
    plain = load("plain_opd_baseline.yaml")
    assert not plain.prune.enable and not plain.budget.enable
    assert differing_fields(prune_opd, plain) == {"prune.enable", "budget.enable"} | RUN_DIRS


def test_tiny_cpu_recipe_points_at_demo_outputs():
    c = load("tiny_cpu.yaml")
    assert c.parallel.tensor_parallel_size == 2 and c.parallel.pipeline_parallel_size == 1
    for model in (c.student, c.teacher):
        assert model.dtype == "float32" and model.transformer_impl == "local"
        assert model.fp8 is None
    paths = [c.student.path, c.teacher.path, c.data.train_path, *c.eval.datasets]
    assert all(p.startswith("demo_out/") for p in paths)
    assert "megatron-opd demo" in (EXAMPLES / "tiny_cpu.yaml").read_text()
    assert c.rollout.engine == "megatron"
    assert c.budget.min_len <= c.budget.init_len <= c.budget.max_len <= c.rollout.max_new_tokens


def test_recipe_accepts_overrides_on_top():
    c = load_config(
        OPDConfig,
        EXAMPLES / "qwen3_1p7b_from_qwen3_8b.yaml",
        ["prune.enable=false", "training.lr=2e-6", "parallel.tensor_parallel_size=4"],
    )
    assert c.prune.enable is False and c.training.lr == 2e-6
    assert c.parallel.tensor_parallel_size == 4
    # Untouched fields keep the recipe's values.
    assert c.budget.init_len == 1024 and c.student.dtype == "bfloat16"
    assert dataclasses.is_dataclass(c.eval)


def test_tiny_cpu_recipe_is_the_demo_run():
    """The recipe a user runs after the demo trains exactly like the demo's Prune-OPD run."""
    from types import SimpleNamespace

    from megatron_opd.config.loader import build_config
    from megatron_opd.demo.run import _DEMO_STEPS, demo_config

    root = Path("demo_out/assets")
    assets = SimpleNamespace(
        student_dir=root / "student", teacher_dir=root / "teacher",
        train_prompts=root / "prompts/train_prompts.jsonl",
        eval_prompts=root / "prompts/eval_prompts.jsonl",
    )  # fmt: skip
    demo = flatten(config_to_dict(build_config(OPDConfig, demo_config(
        assets, Path("demo_out"), steps=_DEMO_STEPS, pruned=True))))  # fmt: skip
    recipe = flatten(config_to_dict(load("tiny_cpu.yaml")))
    run_dirs = {"checkpoint.", "logging.", "eval.interval"}
    differing = {
        key for key in demo
        if demo[key] != recipe[key] and not key.startswith(tuple(run_dirs))
    }  # fmt: skip
    # The recipe names the prompt column the demo leaves to auto-detection and uses the
    # distributed optimizer (identical numerics at DP=1); nothing else may differ.
    assert differing <= {"parallel.use_distributed_optimizer", "data.prompt_key"}, {
        k: (demo[k], recipe[k]) for k in differing
    }
