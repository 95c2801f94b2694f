"""The user's sbatch scripts, run for real on the local Slurm with a tiny CPU model.

- ``train_opd.sbatch`` at TP=2 with 2 tasks (job A): metrics, checkpoints, the exported HF
  student, and ``eval.interval: 0`` evaluating before and after training.
- The same job signalled mid-run (job B): ``scancel --batch --signal=USR1`` is what
  ``#SBATCH --signal=B:USR1@900`` sends before the time limit. The batch shell forwards it,
  the trainer finishes its step, saves and stops, the shell requeues the job, and the
  requeued job resumes from the checkpoint. Its per-step metrics must equal job A's (the
  uninterrupted reference) and list every step once.
- ``convert.sbatch`` HF -> Megatron at TP=2 (2 tasks, job C), then Megatron -> HF (job D):
  the round trip must give back the original safetensors exactly.
- ``eval.sbatch`` at TP=2 on a tiny evaluation set (job E) with the exported student.
- A mistake (a missing prompt file, job F) fails before any process group, with one
  ``error:`` line for the two tasks.

Slurm holds a requeued job until the step credentials of its first run expired
(cred_expire + 1 s: 121 s by default, 11 s on the local cluster, whose start.sh sets
``cred_expire=10``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron_opd.testing.local_slurm import (
    JOB_TIMEOUT_S,
    SubmittedJob,
    field,
    slurm_env_or_skip,
    submit,
)
from megatron_opd.testing.tiny_run import make_tiny_run

pytestmark = pytest.mark.slurm

NUM_STEPS = 16
_COMPARED = ("loss", "reverse_kl", "reverse_kl_topk", "overlap_ratio_mean",
             "effective_length_mean", "budget", "tokens_trained", "grad_norm")  # fmt: skip
# Two tasks of one CPU each: two such jobs fill the 4 CPUs the local node advertises.
TWO_CPU_TASKS = ("--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
                 "--exclusive=user")  # fmt: skip


def _write_config(path: Path, overrides: list[str]) -> Path:
    from megatron_opd.config.loader import merge_overrides

    path.write_text(yaml.safe_dump(merge_overrides({}, overrides)))
    return path


def _eval_set(path: Path, num_problems: int = 3) -> Path:
    from megatron_opd.data.chain_task import training_problems, write_jsonl

    problems = training_problems(seed=11, min_terms=2, max_terms=2)
    return write_jsonl(path, (next(problems) for _ in range(num_problems)))


def _metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_until(condition, what: str, job: SubmittedJob, timeout: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s:\n{job.log()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    env = slurm_env_or_skip()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MODEL"):
        env.pop(name, None)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        OPD_LAUNCHER=f"{sys.executable} -m megatron_opd.cli",
        PYTHON=sys.executable,
        TASKS_PER_NODE="2",
        TP="2",
    )
    root = tmp_path_factory.mktemp("slurm_training")
    run = make_tiny_run(root / "run")
    eval_set = _eval_set(root / "eval" / "chain.jsonl")
    common = [
        *run,
        f"training.num_steps={NUM_STEPS}",
        "parallel.timeout_seconds=120",
        f"eval.datasets=[{eval_set}]",
        "eval.interval=0",  # before and after training
        "eval.temperature=0.0",
        "eval.max_new_tokens=6",
    ]
    configs = {}
    for name in ("a", "b"):
        overrides = [
            *common,
            f"checkpoint.save_dir={root / name / 'ckpt'}",
            f"logging.log_dir={root / name / 'logs'}",
        ]
        if name == "a":
            overrides += [
                "checkpoint.save_interval=4",
                f"checkpoint.export_hf_dir={root / 'a' / 'hf'}",
            ]
        configs[name] = _write_config(root / f"{name}.yaml", overrides)

    def train(name: str) -> SubmittedJob:
        job_env = dict(env, CONFIG=str(configs[name]))
        return submit(job_env, root / f"{name}.out", *TWO_CPU_TASKS, "slurm/train_opd.sbatch")

    a, b = train("a"), train("b")
    # Signal B while it trains: after its second step is logged, with steps left to go.
    b_metrics = root / "b" / "logs" / "metrics.jsonl"

    def b_has_trained() -> bool:
        lines = b_metrics.read_text().splitlines() if b_metrics.is_file() else []
        return sum('"loss"' in line for line in lines) >= 2

    _wait_until(b_has_trained, "job B's second step", b)
    steps_before_signal = sum('"loss"' in line for line in b_metrics.read_text().splitlines())
    subprocess.run(["scancel", "--batch", "--signal=USR1", b.job_id], env=env, check=True)
    # The rest queue behind A and B for CPUs.
    student = run[0].split("=", 1)[1]
    convert_env = dict(env, DIRECTION="hf-to-megatron", HF_DIR=student, OUT=str(root / "mcore"))
    c = submit(convert_env, root / "c.out", "--cpus-per-task=2", "slurm/convert.sbatch")
    back_env = dict(
        env,
        DIRECTION="megatron-to-hf",
        MEGATRON_DIR=str(root / "mcore"),
        OUT=str(root / "roundtrip"),
    )
    back_env.pop("TP")
    d = submit(
        back_env,
        root / "d.out",
        "--cpus-per-task=1",
        f"--dependency=afterok:{c.job_id}",
        "slurm/convert.sbatch",
    )
    eval_config = _write_config(
        root / "e.yaml",
        [*common, f"student.path={root / 'a' / 'hf'}", f"logging.log_dir={root / 'e' / 'logs'}"],
    )
    e = submit(
        dict(env, CONFIG=str(eval_config)),
        root / "e.out",
        *TWO_CPU_TASKS,
        f"--dependency=afterok:{a.job_id}",
        "slurm/eval.sbatch",
    )
    bad = _write_config(
        root / "f.yaml",
        [*run, f"data.train_path={root / 'missing.jsonl'}", f"checkpoint.save_dir={root / 'f'}"],
    )
    f = submit(dict(env, CONFIG=str(bad)), root / "f.out", *TWO_CPU_TASKS, "slurm/train_opd.sbatch")
    return {
        "env": env,
        "root": root,
        "student": Path(student),
        "steps_before_signal": steps_before_signal,
        **dict(zip("abcdef", (a, b, c, d, e, f))),
    }


def _completed(job: SubmittedJob, env) -> tuple[str, str]:
    record, log = job.wait(env)
    assert field(record, "JobState") == "COMPLETED", log
    assert field(record, "ExitCode") == "0:0", log
    assert "Traceback" not in log, log
    return record, log


def _train_records(metrics: list[dict]) -> dict[int, dict]:
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, NUM_STEPS + 1)), steps  # every step once, in order
    return {m["step"]: m for m in metrics if "loss" in m}


def _eval_steps(metrics: list[dict]) -> list[int]:
    return [m["step"] for m in metrics if any(k.startswith("eval/") for k in m)]


def test_train_job_at_tp2_writes_metrics_checkpoints_and_the_hf_student(jobs):
    from transformers import AutoModelForCausalLM

    record, log = _completed(jobs["a"], jobs["env"])
    assert "--ntasks=2" in log and "--cpus-per-task=1" in log  # srun passes the CPUs on
    assert "parallel.tensor_parallel_size=2" in log
    root = jobs["root"]
    metrics = _metrics(root / "a" / "logs")
    _train_records(metrics)
    assert _eval_steps(metrics) == [0, NUM_STEPS]  # eval.interval=0: before and after
    ckpt = root / "a" / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"step_{NUM_STEPS:08d}"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000012", "step_00000016"]
    assert (ckpt / f"step_{NUM_STEPS:08d}" / "COMPLETE").is_file()

    exported = AutoModelForCausalLM.from_pretrained(root / "a" / "hf", dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(jobs["student"], dtype=torch.float32)
    assert exported.config.num_hidden_layers == initial.config.num_hidden_layers
    changed = [
        name
        for (name, p), (_, q) in zip(exported.named_parameters(), initial.named_parameters())
        if not torch.equal(p, q)
    ]
    assert changed, "16 steps at lr 0.01 changed no weight of the exported student"


def test_signalled_job_saves_requeues_and_resumes_like_the_uninterrupted_run(jobs):
    env = jobs["env"]
    record, log = _completed(jobs["b"], env)
    assert field(record, "Restarts") == "1", log
    assert "batch shell got SIGUSR1: forwarding it to the tasks" in log
    stopped = re.search(r"SIGUSR1: stopped after step (\d+)", log)
    assert stopped, log
    stopped_step = int(stopped.group(1))
    # The step running when the signal came was finished and saved: none is lost.
    assert jobs["steps_before_signal"] <= stopped_step < NUM_STEPS, log
    assert f"+ scontrol requeue {jobs['b'].job_id}" in log
    assert re.search(rf"resumed from \S+step_{stopped_step:08d} at step {stopped_step}", log), log

    root = jobs["root"]
    reference = _train_records(_metrics(root / "a" / "logs"))
    metrics = _metrics(root / "b" / "logs")
    resumed = _train_records(metrics)  # each step once across both runs of the job
    assert _eval_steps(metrics) == [0, NUM_STEPS]
    for step in range(1, NUM_STEPS + 1):
        for key in _COMPARED:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-9), (
                step,
                key,
            )


def test_convert_job_at_tp2_and_back_gives_the_original_weights(jobs):
    from safetensors.torch import load_file

    env = jobs["env"]
    _, log = _completed(jobs["c"], env)
    assert "--ntasks=2" in log and "--tp 2" in log, log  # qwen-style TP=2 target, 2 ranks
    mcore = jobs["root"] / "mcore"
    assert json.loads((mcore / "conversion.json").read_text())["written_with"] == {"tp": 2, "pp": 1}
    _completed(jobs["d"], env)
    original = load_file(jobs["student"] / "model.safetensors")
    roundtrip = load_file(jobs["root"] / "roundtrip" / "model.safetensors")
    assert sorted(roundtrip) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(roundtrip[name], tensor), name


def test_eval_job_at_tp2_on_a_tiny_set(jobs):
    _, log = _completed(jobs["e"], jobs["env"])
    lines = [line.split(": ", 1)[1] for line in log.splitlines() if '{"dataset"' in line]
    assert len(lines) == 1, log  # printed by rank 0 only
    summary = json.loads(lines[0])
    assert (summary["dataset"], summary["num_problems"], summary["k"]) == ("chain", 3, 1)
    assert 0.0 <= summary["avg@1"] <= 1.0
    saved = json.loads((jobs["root"] / "e" / "logs" / "eval.json").read_text())
    assert saved["chain"]["num_problems"] == 3


def test_a_mistake_fails_before_process_groups_with_one_error_line(jobs):
    record, log = jobs["f"].wait(jobs["env"])
    assert field(record, "JobState") == "FAILED", log
    errors = [line for line in log.splitlines() if re.match(r"\d+: error: ", line)]
    assert len(errors) == 1, log
    assert (
        "data.train_path" in errors[0]
        and "missing.jsonl" in errors[0]
        and "does not exist" in errors[0]
    )
    assert "Traceback" not in log and "init_process_group" not in log
    assert not (jobs["root"] / "f").exists()  # nothing written
