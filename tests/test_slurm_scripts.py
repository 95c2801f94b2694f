"""The cluster scripts in slurm/: syntax, the srun line they build, and the model facts.

The sbatch scripts are run by bash with SLURM_* set as on a 2-node allocation and with
fake ``srun``/``scontrol`` first on PATH: the fake srun records its argv and rendezvous
variables, so the tests check the exact command every GPU task would start. No cluster
is needed. The model files are checked against the parameter counts published on the
model cards, counted from an HF model built on the meta device from the sourced values.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh"))
MODEL_FILES = sorted((SLURM_DIR / "models").glob("*.sh"))

FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_SRUN_ARGV"
printf '%s\\n' "MASTER_ADDR=$MASTER_ADDR" "MASTER_PORT=$MASTER_PORT" > "$FAKE_SRUN_ENV"
"""
# Expands "gpu-node-[07-08]" the way `scontrol show hostnames` does, for this one list.
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2 $3" = "show hostnames gpu-node-[07-08]" ] || { echo "unexpected: $*" >&2; exit 1; }
printf 'gpu-node-07\\ngpu-node-08\\n'
"""


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_sbatch_script(tmp_path, script: str, *args: str, **variables: str):
    """Run slurm/<script> as the batch step of job 4242 on gpu-node-[07-08], 8 GPUs each.

    Returns (completed process, srun argv or None, srun rendezvous env or None).
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _write_executable(bin_dir / "srun", FAKE_SRUN)
    _write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    argv_file, env_file = tmp_path / "srun.argv", tmp_path / "srun.env"
    argv_file.unlink(missing_ok=True)
    drop = ("SLURM_", "MASTER_", "CONTAINER_", "REPO_DIR", "MODEL", "TP", "PP", "CONFIG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}",
        FAKE_SRUN_ARGV=str(argv_file),
        FAKE_SRUN_ENV=str(env_file),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="8",
        SLURM_SUBMIT_DIR=str(REPO),
        **variables,
    )
    # sbatch runs a copy of the script from its spool directory: run it from elsewhere too.
    copy = tmp_path / script
    shutil.copy(SLURM_DIR / script, copy)
    done = subprocess.run(
        ["bash", str(copy), *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    if not argv_file.exists():
        return done, None, None
    argv = argv_file.read_text().split("\0")[:-1]
    rendezvous = dict(line.split("=", 1) for line in env_file.read_text().split())
    return done, argv, rendezvous


def _split_srun(argv: list[str], program: str) -> tuple[list[str], list[str]]:
    """srun's own options, and the task command starting at ``program``."""
    assert program in argv, argv
    at = argv.index(program)
    return argv[:at], argv[at:]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    files = [str(p) for p in SCRIPTS + MODEL_FILES]
    tools = [str(p) for p in sorted((REPO / "tools" / "local_slurm").glob("*.sh"))]
    tools += [str(p) for p in sorted((REPO / "tests" / "slurm_jobs").glob("*.sbatch"))]
    done = subprocess.run(
        ["shellcheck", "-x", "-P", "SCRIPTDIR", *files, *tools],
        capture_output=True,
        text=True,
        cwd=SLURM_DIR,
    )
    assert done.returncode == 0, done.stdout


def test_train_sbatch_launches_megatron_opd_train_once_per_gpu(tmp_path):
    done, argv, rendezvous = _run_sbatch_script(
        tmp_path,
        "train_opd.sbatch",
        "training.num_steps=3",
        CONFIG="examples/recipe.yaml",
        MODEL="qwen3_8b",
        SLURM_CPUS_PER_TASK="16",
    )
    assert done.returncode == 0, done.stderr
    srun_options, command = _split_srun(argv, "megatron-opd")
    # Slurm >= 22.05: srun does not inherit sbatch's --cpus-per-task; the script passes it.
    assert "--cpus-per-task=16" in srun_options
    assert command == [
        "megatron-opd",
        "train",
        "--config",
        "examples/recipe.yaml",
        "parallel.tensor_parallel_size=2",  # qwen3_8b.sh MODEL_TP
        "parallel.pipeline_parallel_size=1",
        "training.num_steps=3",
    ]
    assert "--nodes=2" in srun_options
    assert "--ntasks-per-node=8" in srun_options  # 2 x 8 = 16 ranks
    assert "--kill-on-bad-exit=1" in srun_options
    assert f"--chdir={REPO}" in srun_options
    assert not any(opt.startswith("--container") for opt in srun_options)
    assert rendezvous == {"MASTER_ADDR": "gpu-node-07", "MASTER_PORT": str(29500 + 4242 % 1000)}
    # The task command is the installed console script of this package.
    launcher = shutil.which("megatron-opd", path=os.path.dirname(sys.executable))
    assert launcher is not None, "megatron-opd is not installed next to this python"
    assert "megatron_opd.cli" in Path(launcher).read_text()


@pytest.mark.parametrize("script", ["train_opd.sbatch", "train_opd_fp8.sbatch"])
def test_train_sbatch_asks_for_requeue_and_an_early_signal(script):
    """The header options that make a training job preemption-safe (the behaviour is
    tested on the real local Slurm: tests/test_slurm_training.py)."""
    header = [
        line.split(None, 1)[1]
        for line in (SLURM_DIR / script).read_text().splitlines()
        if line.startswith("#SBATCH ")
    ]
    assert "--requeue" in header
    assert "--open-mode=append" in header
    signal = next(option for option in header if option.startswith("--signal="))
    target, _, lead = signal.removeprefix("--signal=").partition("@")
    assert target == "B:USR1"  # the batch shell, which forwards it to srun
    assert int(lead) >= 300  # a long step plus a checkpoint must fit


def test_train_sbatch_layout_env_container_and_launcher(tmp_path):
    done, argv, _ = _run_sbatch_script(
        tmp_path,
        "train_opd.sbatch",
        CONFIG="c.yaml",
        MODEL="qwen3_8b",
        TP="4",
        PP="2",
        TASKS_PER_NODE="4",
        CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.09-py3",
        OPD_LAUNCHER="python -m megatron_opd.cli",
    )
    assert done.returncode == 0, done.stderr
    srun_options, command = _split_srun(argv, "python")
    assert command == [
        "python",
        "-m",
        "megatron_opd.cli",
        "train",
        "--config",
        "c.yaml",
        "parallel.tensor_parallel_size=4",
        "parallel.pipeline_parallel_size=2",
    ]
    assert "--ntasks-per-node=4" in srun_options
    assert "--container-image=nvcr.io#nvidia/pytorch:25.09-py3" in srun_options
    assert f"--container-mounts={REPO}:{REPO}" in srun_options


def test_fp8_sbatch_adds_fp8_overrides_before_the_users(tmp_path):
    done, argv, _ = _run_sbatch_script(
        tmp_path, "train_opd_fp8.sbatch", "student.fp8_amax_history_len=16", CONFIG="c.yaml"
    )
    assert done.returncode == 0, done.stderr
    _, command = _split_srun(argv, "megatron-opd")
    assert command == [
        "megatron-opd",
        "train",
        "--config",
        "c.yaml",
        "student.fp8=hybrid",
        "student.fp8_recipe=delayed",
        "student.fp8_amax_history_len=1024",
        "student.fp8_param=false",
        "student.first_last_layers_bf16=false",
        "student.fp8_amax_history_len=16",  # last one wins in the config loader
    ]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_sbatch_applies_the_documented_preset(tmp_path, recipe):
    from megatron_opd.config.loader import parse_override
    from megatron_opd.config.model import FP8_PRESETS

    done, argv, _ = _run_sbatch_script(
        tmp_path, "train_opd_fp8.sbatch", CONFIG="c.yaml", FP8_RECIPE=recipe
    )
    assert done.returncode == 0, done.stderr
    _, command = _split_srun(argv, "megatron-opd")
    overrides = [parse_override(word) for word in command[4:]]
    assert all(path[0] == "student" for path, _ in overrides)
    assert {path[1]: value for path, value in overrides} == FP8_PRESETS[recipe]


def test_fp8_sbatch_refuses_an_unknown_recipe(tmp_path):
    done, argv, _ = _run_sbatch_script(
        tmp_path, "train_opd_fp8.sbatch", CONFIG="c.yaml", FP8_RECIPE="fp4"
    )
    assert done.returncode == 2 and argv is None
    assert "FP8_RECIPE=fp4" in done.stderr


def test_eval_sbatch_launches_megatron_opd_eval(tmp_path):
    done, argv, _ = _run_sbatch_script(
        tmp_path, "eval.sbatch", CONFIG="c.yaml", MODEL="r1_distill_qwen_1p5b"
    )
    assert done.returncode == 0, done.stderr
    _, command = _split_srun(argv, "megatron-opd")
    assert command[:4] == ["megatron-opd", "eval", "--config", "c.yaml"]
    assert "parallel.tensor_parallel_size=1" in command


def test_convert_sbatch_both_directions(tmp_path):
    done, argv, _ = _run_sbatch_script(
        tmp_path,
        "convert.sbatch",
        DIRECTION="hf-to-megatron",
        MODEL="qwen3_8b",
        HF_DIR="/ckpt/Qwen3-8B",
        OUT="/ckpt/mcore",
        PYTHON="python3",
        SLURM_CPUS_PER_TASK="32",
    )
    assert done.returncode == 0, done.stderr
    srun_options, command = _split_srun(argv, "python3")
    # qwen3_8b's TP=2: one task per shard, on one node, sharing the job's 32 CPUs.
    assert {"--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=16"} <= set(
        srun_options
    )
    assert command == [
        "python3",
        "tools/convert_hf_to_megatron.py",
        "--hf-dir",
        "/ckpt/Qwen3-8B",
        "--out",
        "/ckpt/mcore",
        "--tp",
        "2",
        "--pp",
        "1",
    ]
    done, argv, _ = _run_sbatch_script(
        tmp_path,
        "convert.sbatch",
        DIRECTION="megatron-to-hf",
        MEGATRON_DIR="/runs/ckpt",
        OUT="/ckpt/hf",
    )
    assert done.returncode == 0, done.stderr
    _, command = _split_srun(argv, "python")
    assert command == [
        "python",
        "tools/convert_megatron_to_hf.py",
        "--megatron-dir",
        "/runs/ckpt",
        "--out",
        "/ckpt/hf",
    ]


@pytest.mark.parametrize(
    ("script", "variables", "message"),
    [
        ("train_opd.sbatch", {}, "export CONFIG="),
        ("train_opd.sbatch", {"CONFIG": "c.yaml", "MODEL": "qwen9"}, "unknown MODEL 'qwen9'"),
        ("convert.sbatch", {"DIRECTION": "sideways", "OUT": "o"}, "DIRECTION must be"),
        ("eval.sbatch", {"CONFIG": "c.yaml", "REPO_DIR": "/nonexistent"}, "REPO_DIR"),
    ],
)
def test_sbatch_user_mistakes_stop_before_srun(tmp_path, script, variables, message):
    done, argv, _ = _run_sbatch_script(tmp_path, script, **variables)
    assert done.returncode != 0
    assert argv is None  # srun never started
    assert message in done.stderr


# Published sizes (HF model cards): total and non-embedding parameters, in billions.
PUBLISHED_PARAMS = {
    "qwen3_1p7b": (1.7, 1.4),
    "qwen3_4b": (4.0, 3.6),
    "qwen3_8b": (8.2, 6.95),
    "r1_distill_qwen_1p5b": (1.78, 1.31),
    "justrl_1p5b": (1.78, 1.31),
}
FACTS = (
    "HF_ARCHITECTURE NUM_LAYERS HIDDEN_SIZE FFN_HIDDEN_SIZE NUM_ATTENTION_HEADS NUM_KV_HEADS "
    "HEAD_DIM VOCAB_SIZE ROPE_THETA TIE_WORD_EMBEDDINGS QK_LAYERNORM QKV_BIAS MODEL_TP MODEL_PP"
).split()


def _source_model_file(path: Path) -> dict[str, str]:
    """The facts of slurm/models/<path>, loaded by common.sh's opd_source_model."""
    printer = "; ".join(f'echo "{name}=${{{name}:?}}"' for name in FACTS)
    # common.sh needs a job: a one-node one, with scontrol stubbed as a shell function.
    job = "scontrol() { echo gpu-node-01; }; SLURM_JOB_ID=4242 SLURM_JOB_NODELIST=gpu-node-01"
    done = subprocess.run(
        [
            "bash",
            "-c",
            f'set -u; {job}; REPO_DIR=$1; source "$1/slurm/common.sh"; opd_source_model "$2"; '
            f"{printer}",
            "bash",
            str(REPO),
            path.stem,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(line.split("=", 1) for line in done.stdout.split())


def test_every_model_file_has_a_published_size():
    assert sorted(p.stem for p in MODEL_FILES) == sorted(PUBLISHED_PARAMS)


@pytest.mark.parametrize("model_file", MODEL_FILES, ids=lambda p: p.stem)
def test_model_file_matches_published_parameter_count(model_file):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    facts = _source_model_file(model_file)
    is_qwen3 = facts["HF_ARCHITECTURE"] == "Qwen3ForCausalLM"
    assert is_qwen3 or facts["HF_ARCHITECTURE"] == "Qwen2ForCausalLM"
    # Qwen3 has per-head q/k norms and no qkv bias; Qwen2 the reverse.
    assert (facts["QK_LAYERNORM"], facts["QKV_BIAS"]) == (
        ("true", "false") if is_qwen3 else ("false", "true")
    )
    assert facts["VOCAB_SIZE"] == "151936"
    assert int(facts["NUM_ATTENTION_HEADS"]) % int(facts["NUM_KV_HEADS"]) == 0
    config_class = Qwen3Config if is_qwen3 else Qwen2Config
    config = config_class(
        num_hidden_layers=int(facts["NUM_LAYERS"]),
        hidden_size=int(facts["HIDDEN_SIZE"]),
        intermediate_size=int(facts["FFN_HIDDEN_SIZE"]),
        num_attention_heads=int(facts["NUM_ATTENTION_HEADS"]),
        num_key_value_heads=int(facts["NUM_KV_HEADS"]),
        head_dim=int(facts["HEAD_DIM"]),
        vocab_size=int(facts["VOCAB_SIZE"]),
        tie_word_embeddings=facts["TIE_WORD_EMBEDDINGS"] == "true",
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    non_embedding = total - embedding * (1 if config.tie_word_embeddings else 2)
    published_total, published_non_embedding = PUBLISHED_PARAMS[model_file.stem]
    # Model cards round to 2-3 significant digits.
    assert total / 1e9 == pytest.approx(published_total, rel=0.02)
    assert non_embedding / 1e9 == pytest.approx(published_non_embedding, rel=0.02)
