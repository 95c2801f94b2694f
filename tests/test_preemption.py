"""Stopping on SIGTERM / SIGUSR1, the helper process dist_checkpointing starts, damaged
checkpoints, and what a resumed run writes.

The Slurm side (the batch shell forwarding the signal, the requeue, the resumed job's
metrics against an uninterrupted job's) runs on the real local cluster in
tests/test_slurm_training.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_run import make_tiny_run

_RUN_ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
}
_RUN_ENV.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


# --------------------------------------------------------------------------- world flag
def _flag_over_the_world():
    from megatron_opd.training.preemption import StopSignals

    rank = int(os.environ["RANK"])
    with StopSignals() as stop:
        before = stop.stop_requested(torch.device("cpu"))
        if rank == 1:  # only one rank is told, as when a signal reaches the ranks unevenly
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)  # Python runs the handler at the next bytecode
        after = stop.stop_requested(torch.device("cpu"))
        name = stop.signal_name
    return before, after, name, signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_boundary():
    results = run_distributed(_flag_over_the_world, 2)
    assert results == [(False, True, "SIGUSR1", True)] * 2


# ----------------------------------------------------------------- NaN names the model
class _FixedLogits(torch.nn.Module):
    """Stands in for a GPTModel stage: the same ``[b, s, V/TP]`` logits for any input."""

    def __init__(self, vocab_shard: int, poisoned: bool) -> None:
        super().__init__()
        self.config = type("Config", (), {"sequence_parallel": False})()
        self.vocab_shard, self.poisoned = vocab_shard, poisoned

    def forward(self, input_ids, position_ids, attention_mask, **kwargs):
        b, s = input_ids.shape
        logits = torch.linspace(-1, 1, b * s * self.vocab_shard).view(b, s, self.vocab_shard)
        if self.poisoned:
            logits[0, 1, 0] = float("nan")
        return logits


def _score_with_nan(poisoned_role):
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.distributed import destroy_model_parallel, init_distributed
    from megatron_opd.rollout.batch import RolloutBatch
    from megatron_opd.scoring import score_rollouts

    groups = init_distributed(ParallelConfig(tensor_parallel_size=2, timeout_seconds=30))
    try:
        batch = RolloutBatch(
            tokens=torch.tensor([[1, 2, 3, 4], [1, 2, 5, 0]]),
            prompt_lengths=torch.tensor([2, 2]),
            response_lengths=torch.tensor([2, 1]),
        )
        models = {role: _FixedLogits(8, role == poisoned_role) for role in ("student", "teacher")}
        score_rollouts(batch, **models, groups=groups, top_k=2, micro_batch_size=2, vocab_size=16)
    except ValueError as err:
        return str(err)
    finally:
        destroy_model_parallel()
    return None


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_nan_logits_in_scoring_name_the_model(role):
    messages = run_distributed(_score_with_nan, 2, role)
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"scoring the rollouts, the {role}'s logits holds NaN")


# ------------------------------------------------------- the checkpoint writer process
_WRITER_SCRIPT = """
import os, signal, time
from megatron_opd.checkpoint_queue import install_checkpoint_results_queue, manager_pid
from megatron.core.dist_checkpointing.strategies.filesystem_async import _get_write_results_queue

install_checkpoint_results_queue()
queue = _get_write_results_queue()  # what dist_checkpointing's writer asks for on a save
server = manager_pid()
for sig in (signal.SIGUSR1, signal.SIGTERM):  # what Slurm sends every process of a step
    os.kill(server, sig)
time.sleep(0.5)
queue.put("still serving")
print(server, queue.get(timeout=10), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the trainer dies without any clean-up
"""


def test_the_checkpoint_writer_survives_stop_signals_and_dies_with_a_killed_trainer():
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT],
        env=_RUN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # The server inherited stdout: the pipe closes only once it is gone as well.
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the Manager server outlived the killed trainer (stdout stayed open)")
    assert proc.returncode == -signal.SIGKILL, err
    server_pid, reply = out.split(maxsplit=1)
    assert reply.strip() == "still serving"
    assert not _alive(int(server_pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[1].split()[0] == "Z")


def _describe(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return f"{pid}: gone"


def _session_members(session_id: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # fields[3]: session id
            members.append(int(stat.parent.name))
    return members


# ------------------------------------------------------- a real single-process run
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """``megatron-opd train`` in one process, SIGTERMed after its second checkpoint."""
    root = tmp_path_factory.mktemp("stopped_run")
    run = make_tiny_run(root / "run")
    overrides = [
        *run,
        "training.num_steps=60",
        "checkpoint.save_interval=2",
        f"checkpoint.save_dir={root / 'ckpt'}",
        f"logging.log_dir={root / 'logs'}",
    ]
    # A single process used to take port 29500 always: hold it, as another run would.
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 29500))
        holder.listen()
    except OSError as err:
        assert err.errno == errno.EADDRINUSE  # somebody holds it already: just as good
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_opd.cli", "train", *overrides],
        env=_RUN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    second = root / "ckpt" / "step_00000004" / "COMPLETE"
    while not second.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint at step 4: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run or a process it started kept stdout open after SIGTERM:\n{err}")
    finally:
        holder.close()
    # A process that closed its output may still be exiting: give it a moment.
    deadline = time.monotonic() + 10
    while _session_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {
        "root": root,
        "overrides": overrides,
        "returncode": proc.returncode,
        "stderr": err,
        "leftovers": [_describe(pid) for pid in _session_members(proc.pid)],
    }


def test_sigterm_stops_a_single_process_run_with_a_checkpoint_and_status_75(stopped_run):
    err = stopped_run["stderr"]
    assert stopped_run["returncode"] == 75, err[-3000:]
    assert stopped_run["leftovers"] == []  # nothing the trainer started is still running
    stopped = re.search(r"SIGTERM: stopped after step (\d+); (\S+) holds it", err)
    assert stopped, err[-3000:]
    step, checkpoint = int(stopped.group(1)), Path(stopped.group(2))
    ckpt = stopped_run["root"] / "ckpt"
    assert step >= 4 and checkpoint == ckpt / f"step_{step:08d}"
    assert (ckpt / "latest").read_text().strip() == checkpoint.name
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    steps = [
        json.loads(line)["step"] for line in (stopped_run["root"] / "logs" / "metrics.jsonl").open()
    ]
    assert steps == list(range(1, step + 1))


def _config(overrides):
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig

    return build_config(OPDConfig, merge_overrides({}, overrides))


def _copy_of_checkpoints(stopped_run, tmp_path) -> tuple[list[str], Path, Path]:
    """Overrides pointing at a copy of the stopped run's checkpoints; (newest, previous)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped_run["root"] / "ckpt", ckpt)
    newest, previous = sorted(ckpt.glob("step_*"), reverse=True)[:2]
    overrides = [*stopped_run["overrides"], f"checkpoint.save_dir={ckpt}",
                 f"logging.log_dir={tmp_path / 'logs'}"]  # fmt: skip
    return overrides, newest, previous


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda d: _truncate(d / "model_optim" / "__0_1.distcp", 1000), "model_optim/__0_1.distcp"),
        (lambda d: _truncate(d / "trainer_state.json", 40), "trainer_state.json"),
        (lambda d: _truncate(d / "rng" / "rank_00000.pt", 100), "rng/rank_00000.pt"),
        (lambda d: _truncate(d / "model_optim" / ".metadata", 100), "model_optim/.metadata"),
    ],
    ids=["shard", "trainer_state", "rng", "index"],
)
def test_a_damaged_checkpoint_names_the_previous_complete_one(stopped_run, tmp_path, damage, what):
    from megatron_opd.training.preflight import preflight_training

    overrides, newest, previous = _copy_of_checkpoints(stopped_run, tmp_path)
    damage(newest)
    with pytest.raises(ValueError) as info:
        preflight_training(_config(overrides), world_size=1)
    message = str(info.value)
    assert message.startswith(f"checkpoint {newest} is damaged: {what} cannot be read")
    assert f"the previous complete checkpoint is {previous}" in message
    assert f"checkpoint.load_dir={previous}" in message


def test_a_checkpoint_in_megatron_core_0_19_layout(stopped_run, tmp_path, monkeypatch):
    """0.19 keeps the common state inside the .distcp files (no common.pt): the resume
    check accepts that layout under 0.19 and refuses it, saying why, under 0.16-0.18."""
    from megatron_opd import mcore_compat
    from megatron_opd.checkpoint import verify_checkpoint_files
    from megatron_opd.training.preflight import preflight_training

    overrides, newest, _ = _copy_of_checkpoints(stopped_run, tmp_path)
    (newest / "model_optim" / "common.pt").unlink()
    monkeypatch.setattr(mcore_compat, "megatron_core_version", lambda: (0, 19))
    assert verify_checkpoint_files(newest)["step"] >= 1
    monkeypatch.setattr(mcore_compat, "megatron_core_version", lambda: (0, 16))
    with pytest.raises(ValueError, match=r"written by megatron-core >= 0.19.*cannot read"):
        preflight_training(_config(overrides), world_size=1)


def test_the_cli_reports_a_truncated_shard_in_one_line_before_any_process_group(
    stopped_run, tmp_path
):
    overrides, newest, previous = _copy_of_checkpoints(stopped_run, tmp_path)
    _truncate(newest / "model_optim" / "__0_0.distcp", 10)
    done = subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "train", *overrides],
        env=_RUN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {newest} is damaged")
    assert str(previous) in lines[0]


def test_a_checkpoint_past_num_steps_is_refused_not_silently_finished(stopped_run, tmp_path):
    from megatron_opd.training.preflight import preflight_training

    overrides, newest, _ = _copy_of_checkpoints(stopped_run, tmp_path)
    step = int(newest.name.removeprefix("step_"))
    with pytest.raises(ValueError, match=rf"is at step {step}, past training.num_steps=2; raise"):
        preflight_training(_config([*overrides, "training.num_steps=2"]), world_size=1)


class _RunsCodeOnLoad:
    """A pickle that calls a function when unpickled, as a booby-trapped file would."""

    def __reduce__(self):
        return (os.getpid, ())


def test_an_rng_file_that_would_run_code_is_refused(stopped_run, tmp_path):
    """The RNG state is read with weights_only=True: the state written now loads that way,
    and a file whose unpickling would call a function is refused, naming the file."""
    from megatron_opd.training.preflight import preflight_training

    overrides, newest, previous = _copy_of_checkpoints(stopped_run, tmp_path)
    rng_file = newest / "rng" / "rank_00000.pt"
    assert set(torch.load(rng_file, weights_only=True)) >= {"torch", "numpy", "random"}
    torch.save({"torch": _RunsCodeOnLoad()}, rng_file)
    with pytest.raises(ValueError, match=r"rng/rank_00000.pt cannot be read \(UnpicklingError"):
        preflight_training(_config(overrides), world_size=1)


# --------------------------------------------------------------------- RNG state
def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    from megatron_opd.checkpoint import capture_rng_state, restore_rng_state

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(),
                np.random.standard_normal())  # fmt: skip
    torch.save(state, tmp_path / "rng.pt")
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(),
           np.random.standard_normal())  # fmt: skip
    assert got == expected


# ------------------------------------------------------------------ metrics on resume
def test_resume_drops_the_records_of_steps_after_the_checkpoint(tmp_path):
    from megatron_opd.training.metrics_logger import MetricsLogger

    log = MetricsLogger(tmp_path, total_steps=6, tensorboard=False, show_progress=False)
    for step in (1, 2, 3, 4):
        log.log(step, {"loss": float(step)})
    log.log_extra(2, {"eval/x/avg@1": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by a killed run
    log = MetricsLogger(tmp_path, total_steps=6, tensorboard=False, show_progress=False)
    log.resume_at(2)  # the checkpoint: steps 3, 4 (and the torn 5) run again
    for step in (3, 4, 5, 6):
        log.log(step, {"loss": 10.0 * step})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [(r["step"], r.get("loss"), r.get("eval/x/avg@1")) for r in records] == [
        (1, 1.0, None), (2, 2.0, None), (2, None, 0.5),
        (3, 30.0, None), (4, 40.0, None), (5, 50.0, None), (6, 60.0, None),
    ]  # fmt: skip


def test_the_progress_bar_shows_what_the_mechanisms_did_when_they_did_something(tmp_path, capsys):
    from megatron_opd.training.metrics_logger import MetricsLogger

    log = MetricsLogger(tmp_path, total_steps=2, tensorboard=False)
    counters = {"samples_stopped": 3.0, "tokens_trimmed": 0.0, "chunks_deferred": 5.0}
    log.log(1, {"loss": 0.5, **counters})
    log._bar.refresh()
    line = capsys.readouterr().err.splitlines()[-1]  # tqdm redraws the line with \r
    log.close()
    assert "samples_stopped=3" in line and "chunks_deferred=5" in line
    assert "tokens_trimmed" not in line  # 0: nothing to show
