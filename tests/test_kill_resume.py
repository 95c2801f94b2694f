"""A real crash: a torchrun training job is SIGKILLed after a checkpoint and resumed by a new
job; the resumed steps equal those of an uninterrupted job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_opd.testing.multiprocess import free_port
from megatron_opd.testing.tiny_run import make_tiny_run

_KEYS = ("loss", "reverse_kl", "overlap_ratio_mean", "effective_length_mean", "budget",
         "tokens_trained", "grad_norm")  # fmt: skip


def _launch(overrides: list[str]) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "megatron_opd.cli", "train", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    _, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]


def _steps(log_dir: Path) -> dict[int, dict]:
    records = {}
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record  # a re-run step overwrites the killed one
    return records


@pytest.mark.timeout(600)
def test_sigkill_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path):
    base = [*make_tiny_run(tmp_path / "run"), "parallel.tensor_parallel_size=2",
            "training.num_steps=5", "checkpoint.save_interval=1"]  # fmt: skip
    straight = _launch([*base, f"checkpoint.save_dir={tmp_path / 'a'}",
                        f"logging.log_dir={tmp_path / 'a_logs'}"])  # fmt: skip
    _finish(straight)

    crashed = [*base, f"checkpoint.save_dir={tmp_path / 'b'}",
               f"logging.log_dir={tmp_path / 'b_logs'}"]  # fmt: skip
    victim = _launch(crashed)
    deadline = time.monotonic() + 240
    while not (tmp_path / "b" / "step_00000002" / "COMPLETE").exists():
        assert victim.poll() is None, victim.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 2 in time"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the whole job, mid-run, no clean-up
    victim.wait(timeout=30)
    assert not (tmp_path / "b" / "step_00000005").exists()

    _finish(_launch(crashed))
    expected, resumed = _steps(tmp_path / "a_logs"), _steps(tmp_path / "b_logs")
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in (3, 4, 5):
        for key in _KEYS:
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (
                step, key,
            )  # fmt: skip
