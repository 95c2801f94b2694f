"""A real sbatch job on the local Slurm: 2 tasks, TP=2, launched by srun without torchrun.

The job (tests/slurm_jobs/tp_check.sbatch + tp_check.py) initialises megatron_opd's process
groups from the SLURM_* variables, all-reduces over the TP group and computes a
vocab-parallel cross-entropy over the two vocabulary shards. This test recomputes the
loss over the full vocabulary in its own process and checks both ranks' printed results.

Needs a running cluster: `tools/local_slurm/start.sh` (CI runs it before pytest). Without
`sbatch` on PATH or a reachable controller the test is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
JOB_DIR = REPO / "tests" / "slurm_jobs"
JOB_TIMEOUT_S = 120
POLL_INTERVAL_S = 0.25  # sbatch --wait backs off to multi-second polls; squeue is quicker

pytestmark = pytest.mark.slurm


def _slurm_env_or_skip() -> dict[str, str]:
    """The environment for Slurm clients, or skip when no local cluster answers."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not on PATH; start a cluster with tools/local_slurm/start.sh")
    env = dict(os.environ)
    if not env.get("SLURM_CONF"):
        base = env.get("LOCAL_SLURM_BASE") or os.path.join(
            env.get("TMPDIR", "/tmp"), "megatron-opd-slurm"
        )
        conf = os.path.join(base, "etc", "slurm.conf")
        if not os.path.isfile(conf):
            pytest.skip(
                f"SLURM_CONF is not set and {conf} does not exist; "
                "run tools/local_slurm/start.sh and export SLURM_CONF"
            )
        env["SLURM_CONF"] = conf
    try:
        probe = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo timed out: slurmctld is not answering")
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.skip(f"no Slurm controller answers (sinfo: {probe.stderr.strip()!r})")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_job(env: dict[str, str], output: Path, *args: str) -> str:
    """Submit, poll squeue until the job leaves the queue, return its final state line."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={output}", f"--chdir={output.parent}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        queued = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True
        )
        if not queued.stdout.strip():
            break
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env)
            log = output.read_text() if output.exists() else "<no output file>"
            pytest.fail(
                f"job {job_id} still {queued.stdout.strip()} after {JOB_TIMEOUT_S}s:\n{log}"
            )
        time.sleep(POLL_INTERVAL_S)
    return subprocess.run(
        ["scontrol", "-o", "show", "job", job_id],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _full_vocab_cross_entropy() -> torch.Tensor:
    """Reference loss ``[s, b]`` on one process over the whole vocabulary."""
    spec = importlib.util.spec_from_file_location("tp_check", JOB_DIR / "tp_check.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    logits, targets = job.fixed_logits_and_targets()
    seq_len, batch, vocab = logits.shape
    loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    return loss.view(seq_len, batch)


def _field(record: str, name: str) -> str:
    return next(part.split("=", 1)[1] for part in record.split() if part.startswith(name + "="))


def test_two_task_sbatch_job_runs_tp_collectives(tmp_path):
    env = _slurm_env_or_skip()
    env.update(PYTHON=sys.executable, MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    output = tmp_path / "tp_check.out"
    record = _run_job(env, output, str(JOB_DIR / "tp_check.sbatch"), str(JOB_DIR / "tp_check.py"))
    log = output.read_text() if output.exists() else "<no output file>"
    assert _field(record, "JobState") == "COMPLETED", log
    assert _field(record, "ExitCode") == "0:0", log

    # srun --label prefixes each line with the task id.
    results = {}
    for line in log.splitlines():
        task, _, text = line.partition(": ")
        if text.startswith("RESULT "):
            results[int(task)] = json.loads(text.removeprefix("RESULT "))
    assert sorted(results) == [0, 1], log

    first_host = subprocess.run(
        ["scontrol", "show", "hostnames", _field(record, "NodeList")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]

    expected_loss = _full_vocab_cross_entropy()
    for task, result in results.items():
        assert result["python"] == sys.executable
        assert result["rank"] == result["launch_rank"] == task
        assert result["local_rank"] == task  # one node: SLURM_LOCALID == SLURM_PROCID
        assert result["world_size"] == 2
        assert result["master_addr"] == first_host
        assert (result["tp_rank"], result["tp_size"]) == (task, 2)
        assert result["vocab_partition"] == [8 * task, 8 * task + 8]
        assert result["tp_allreduce_sum"] == 3.0  # (0 + 1) + (1 + 1)
        torch.testing.assert_close(
            torch.tensor(result["vocab_parallel_ce"]), expected_loss, rtol=1e-5, atol=1e-5
        )
