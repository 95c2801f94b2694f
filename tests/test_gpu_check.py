"""tools/gpu_check.sh and its Python steps, run on CPU at test sizes.

The shell driver is run for real: argument errors, the download command, the dry-run
plan, and an offline run from a wheel folder (a hand-made wheel) with the step skipped
for want of CUDA. The checks themselves run small on CPU and are compared with their
own references (torch.topk / logsumexp, transformers), as on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_opd.gpu_check import plan
from megatron_opd.testing.multiprocess import run_distributed

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"


def _script(*args, **env):
    environ = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=120
    )


def test_limits_fit_eight_minutes_and_every_step_has_a_file():
    assert sum(step.limit_s for step in plan.STEPS) <= plan.TIME_LIMIT_S < 8 * 60
    assert len({step.output for step in plan.STEPS}) == len(plan.STEPS)
    assert {"environment", "cuda_tests", "logits", "trainer_resume", "chunked_stop",
            "offload_chunking", "vocab_ops", "generation"} == set(plan.STEP_NAMES)  # fmt: skip


def test_download_targets_python_312_wheels():
    command = plan.download_command("/w")
    assert command[:4] == ["python3", "-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert command[command.index("--python-version") + 1] == "3.12"
    assert "manylinux_2_28_x86_64" in command and command[command.index("--dest") + 1] == "/w"
    assert any(w.startswith("megatron-core==0.19.") for w in command)
    done = _script("--download", "/tmp/wheels-x", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"{sys.executable} -m pip download" in done.stdout
    assert "megatron-core==0.19" in done.stdout


def test_argument_errors_exit_2():
    assert _script("--bogus").returncode == 2
    assert _script("--wheels", "/nonexistent", "--out", "/tmp/x").returncode == 2
    done = _script("--wheels", str(REPO), "--dry-run")
    assert done.returncode == 2 and "--out" in done.stderr
    done = _script("--wheels", str(REPO), "--out", "/tmp/x", "--steps", "logits,warp", "--dry-run")
    assert done.returncode == 2 and "warp" in done.stderr


def test_dry_run_lists_every_step_with_its_file_and_limit(tmp_path):
    done = _script("--wheels", str(tmp_path), "--out", str(tmp_path / "res"), "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    for step, line in zip(plan.STEPS, lines):
        assert line.startswith(step.name) and f"{tmp_path}/res/{step.output}" in line
    assert lines[-1] == "total limit 460s (<= 470s)"
    assert not (tmp_path / "res").exists()  # a dry run writes nothing


def _tiny_wheel(folder: Path) -> None:
    with zipfile.ZipFile(folder / "gpu_check_probe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("gpu_check_probe.py", "VALUE = 1\n")
        info = "gpu_check_probe-1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu-check-probe\n"
                       "Version: 1.0\n")  # fmt: skip
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                       "Root-Is-Purelib: true\nTag: py3-none-any\n")  # fmt: skip
        wheel.writestr(f"{info}/RECORD", "")


def test_offline_run_installs_the_wheels_and_writes_the_summary(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the step would run for real")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _tiny_wheel(wheels)
    out = tmp_path / "results"
    done = _script("--wheels", str(wheels), "--out", str(out), "--steps", "environment",
                   GPU_CHECK_SITE=str(tmp_path / "site"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "gpu_check_probe.py").is_file()  # installed offline
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary == ["SKIP environment: no CUDA device visible"]
    assert "environment" in (out / "plan.txt").read_text()


def test_vocab_ops_check_agrees_with_torch():
    from megatron_opd.gpu_check.numerics import vocab_ops_check

    result = vocab_ops_check(device="cpu", tokens=32, vocab=700)
    assert result["passed"], result
    assert result["max_abs_err_logsumexp"] < 1e-4


def _small_checks(work):
    from megatron_opd.gpu_check.environment import environment_report
    from megatron_opd.gpu_check.generation import generation_check
    from megatron_opd.gpu_check.numerics import logits_check

    work = Path(work)
    shape = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128,
                 max_position_embeddings=256)  # fmt: skip
    return {
        "environment": environment_report(),
        "logits": logits_check(work, device="cpu", hidden=64, layers=2, vocab=300, tokens=16),
        "generation": generation_check(work, device="cpu", batch=6, prompt_tokens=5,
                                       new_tokens=7, shape=shape, dtype="float32"),
    }  # fmt: skip


def test_environment_logits_and_generation_checks_on_cpu(tmp_path):
    (results,) = run_distributed(_small_checks, 1, str(tmp_path), timeout_s=240)
    env = results["environment"]
    assert env["packages"]["megatron-core"] and not env["cuda_available"]
    assert set(env["skips"]) == {"transformer_engine", "vllm", "apex"}
    logits = results["logits"]
    assert logits["passed"] and logits["top1_agreement_with_fp32"] > 0.9, logits
    generation = results["generation"]
    assert generation["passed"] and generation["generated_tokens"] == 6 * 7
    assert generation["tokens_per_s"] > 0


def _trainer_checks(work):
    from megatron_opd.gpu_check import training

    work = Path(work)
    return training.trainer_resume_check(work / "a"), training.chunked_check(
        work / "b", offload=True
    )


def test_trainer_resume_and_chunked_offload_checks_on_cpu(tmp_path):
    ((resume, chunked),) = run_distributed(_trainer_checks, 1, str(tmp_path), timeout_s=300)
    assert resume["passed"], json.dumps(resume, indent=1)
    assert resume["max_relative_difference"] == 0.0  # CPU: the resumed step is exact
    assert resume["checkpoints"][-1] == "step_00000003"
    assert chunked["passed"] and len(chunked["history"]) == 2
