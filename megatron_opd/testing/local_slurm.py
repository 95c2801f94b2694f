"""A real local Slurm for tests: find it (or skip), submit from the checkout, poll jobs.

The cluster is the one ``tools/local_slurm/start.sh`` starts (``.ci/run`` does so before
pytest). Without ``sbatch`` on PATH or a reachable controller the tests are skipped, or
fail when ``MEGATRON_OPD_REQUIRE_SLURM=1`` (CI), so a missing cluster never passes quietly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 300  # generous: a loaded 2-core CI box can take a minute per job
POLL_INTERVAL_S = 0.25  # sbatch --wait backs off to multi-second polls; squeue is quicker


def slurm_env_or_skip() -> dict[str, str]:
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
        """The job's output file so far."""
        return self.output.read_text() if self.output.exists() else "<no output file>"

    def state(self, env: dict[str, str]) -> tuple[str, str]:
        """``(state, reason)`` from squeue; ``("", "")`` once the job left the queue."""
        queued = subprocess.run(
            ["squeue", "-h", "-j", self.job_id, "-o", "%T %r"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.split()
        return (queued[0], queued[1]) if len(queued) >= 2 else ("", "")


def submit(env: dict[str, str], output: Path, *args: str) -> SubmittedJob:
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


def tagged_records(log: str, tag: str) -> dict[int, dict]:
    """JSON records printed as '<tag> {...}', keyed by srun's --label task id."""
    records = {}
    for line in log.splitlines():
        task, _, text = line.partition(": ")
        if text.startswith(tag + " "):
            records[int(task)] = json.loads(text.removeprefix(tag + " "))
    return records


def first_host(env: dict[str, str], record: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "hostnames", field(record, "NodeList")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]


def field(record: str, name: str) -> str:
    return next(part.split("=", 1)[1] for part in record.split() if part.startswith(name + "="))
