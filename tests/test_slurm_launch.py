"""A real sbatch job on the local Slurm: 2 tasks, TP=2, launched by srun without torchrun.

The first job (tests/slurm_jobs/tp_check.sbatch + tp_check.py) initialises megatron_opd's process
groups from the SLURM_* variables, all-reduces over the TP group and computes a
vocab-parallel cross-entropy over the two vocabulary shards. This test recomputes the
loss over the full vocabulary in its own process and checks both ranks' printed results.
The second job is the production slurm/train_opd.sbatch, scaled to 2 CPU tasks, with the
CLI replaced by a printer: it checks the srun line and the launch layout each task reads.

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
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
JOB_DIR = REPO / "tests" / "slurm_jobs"
JOB_TIMEOUT_S = 300  # generous: a loaded 2-core CI box can take a minute per job
POLL_INTERVAL_S = 0.25  # sbatch --wait backs off to multi-second polls; squeue is quicker

pytestmark = pytest.mark.slurm


def _slurm_env_or_skip() -> dict[str, str]:
    """The environment for Slurm clients, or skip when no local cluster answers (in CI,
    where .ci/run starts the cluster and sets MEGATRON_OPD_REQUIRE_SLURM=1, fail instead)."""
    if os.environ.get("MEGATRON_OPD_REQUIRE_SLURM") == "1":
        real_skip = pytest.fail
    else:
        real_skip = pytest.skip
    return _slurm_env_or(real_skip)


def _slurm_env_or(skip) -> dict[str, str]:
    if shutil.which("sbatch") is None:
        skip("sbatch is not on PATH; start a cluster with tools/local_slurm/start.sh")
    env = dict(os.environ)
    if not env.get("SLURM_CONF"):
        base = env.get("LOCAL_SLURM_BASE") or os.path.join(
            env.get("TMPDIR", "/tmp"), "megatron-opd-slurm"
        )
        conf = os.path.join(base, "etc", "slurm.conf")
        if not os.path.isfile(conf):
            skip(
                f"SLURM_CONF is not set and {conf} does not exist; "
                "run tools/local_slurm/start.sh and export SLURM_CONF"
            )
        env["SLURM_CONF"] = conf
    controller = _controller_address(env["SLURM_CONF"])
    if controller is not None:
        # A refused connection is immediate; sinfo would retry for ~20 s before giving up.
        try:
            socket.create_connection(controller, timeout=2).close()
        except OSError as err:
            skip(f"slurmctld at {controller} is not reachable ({err}); start it")
    try:
        probe = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        skip("sinfo timed out: slurmctld is not answering")
    if probe.returncode != 0 or not probe.stdout.strip():
        skip(f"no Slurm controller answers (sinfo: {probe.stderr.strip()!r})")
    return env


def _controller_address(conf_path: str) -> tuple[str, int] | None:
    """(host, port) of slurmctld from ``SlurmctldHost=name(addr)`` / ``SlurmctldPort``."""
    try:
        lines = Path(conf_path).read_text().splitlines()
    except OSError:
        return None
    settings = dict(line.split("=", 1) for line in lines if "=" in line and " " not in line)
    host = settings.get("SlurmctldHost")
    if host is None:
        return None
    name, _, addr = host.partition("(")
    port = settings.get("SlurmctldPort", "6817").split("-")[0]  # may be a range
    return (addr.rstrip(")") or name), int(port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class SubmittedJob:
    """A job in the queue and the file its output goes to."""

    job_id: str
    output: Path

    def wait(self, env: dict[str, str]) -> tuple[str, str]:
        """Poll squeue until the job leaves the queue; return (scontrol record, output)."""
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            queued = subprocess.run(
                ["squeue", "-h", "-j", self.job_id, "-o", "%T"],
                env=env,
                capture_output=True,
                text=True,
            )
            if not queued.stdout.strip():
                break
            if time.monotonic() > deadline:
                subprocess.run(["scancel", self.job_id], env=env)
                pytest.fail(
                    f"job {self.job_id} still {queued.stdout.strip()} after "
                    f"{JOB_TIMEOUT_S}s:\n{self.log()}"
                )
            time.sleep(POLL_INTERVAL_S)
        record = subprocess.run(
            ["scontrol", "-o", "show", "job", self.job_id],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return record, self.log()

    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else "<no output file>"


def _submit(env: dict[str, str], output: Path, *args: str) -> SubmittedJob:
    """sbatch from the repository root, as a user would (SLURM_SUBMIT_DIR = the checkout)."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={output}", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return SubmittedJob(job_id=submitted.stdout.strip().split(";")[0], output=output)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Both jobs, submitted together: they run side by side on the 4 advertised CPUs."""
    env = _slurm_env_or_skip()
    env.update(OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MODEL"):
        env.pop(name, None)
    out_dir = tmp_path_factory.mktemp("slurm_jobs")
    tp_env = dict(env, PYTHON=sys.executable, MASTER_PORT=str(_free_port()))
    tp_check = _submit(
        tp_env,
        out_dir / "tp_check.out",
        str(JOB_DIR / "tp_check.sbatch"),
        str(JOB_DIR / "tp_check.py"),
    )
    # The production script with the CLI replaced by a printer, scaled to 2 CPU tasks.
    train_env = dict(
        env,
        CONFIG="examples/recipe.yaml",
        MODEL="qwen3_8b",
        TASKS_PER_NODE="2",
        OPD_LAUNCHER=f"{sys.executable} {JOB_DIR / 'print_launch.py'}",
    )
    train = _submit(
        train_env,
        out_dir / "train_opd.out",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--exclusive=user",  # the header asks for whole nodes; share with tp_check
        "slurm/train_opd.sbatch",
        "training.num_steps=3",
    )
    return {"env": env, "tp_check": tp_check, "train": train}


def _tagged_records(log: str, tag: str) -> dict[int, dict]:
    """JSON records printed as '<tag> {...}', keyed by srun's --label task id."""
    records = {}
    for line in log.splitlines():
        task, _, text = line.partition(": ")
        if text.startswith(tag + " "):
            records[int(task)] = json.loads(text.removeprefix(tag + " "))
    return records


def _first_host(env: dict[str, str], record: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "hostnames", _field(record, "NodeList")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]


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


def test_two_task_sbatch_job_runs_tp_collectives(jobs):
    env = jobs["env"]
    record, log = jobs["tp_check"].wait(env)
    assert _field(record, "JobState") == "COMPLETED", log
    assert _field(record, "ExitCode") == "0:0", log
    results = _tagged_records(log, "RESULT")
    assert sorted(results) == [0, 1], log

    first_host = _first_host(env, record)
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
        torch.testing.assert_close(
            -torch.tensor(result["opd_target_log_probs"]), expected_loss, rtol=1e-5, atol=1e-5
        )


def test_train_sbatch_under_real_srun(jobs):
    env = jobs["env"]
    record, log = jobs["train"].wait(env)
    assert _field(record, "JobState") == "COMPLETED", log
    launches = _tagged_records(log, "LAUNCH")
    assert sorted(launches) == [0, 1], log
    job_id = int(jobs["train"].job_id)
    for task, launch in launches.items():
        assert launch["argv"] == [
            "train",
            "--config",
            "examples/recipe.yaml",
            "parallel.tensor_parallel_size=2",
            "parallel.pipeline_parallel_size=1",
            "training.num_steps=3",
        ]
        assert (launch["rank"], launch["local_rank"], launch["world_size"]) == (task, task, 2)
        assert launch["master_addr"] == _first_host(env, record)
        assert launch["master_port"] == 29500 + job_id % 1000
