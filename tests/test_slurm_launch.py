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
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_opd.launch_env import free_port
from megatron_opd.testing.local_slurm import (
    field,
    first_host,
    slurm_env_or_skip,
    submit,
    tagged_records,
)

REPO = Path(__file__).resolve().parents[1]
JOB_DIR = REPO / "tests" / "slurm_jobs"

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Both jobs, submitted together: they run side by side on the 4 advertised CPUs."""
    env = slurm_env_or_skip()
    env.update(OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MODEL"):
        env.pop(name, None)
    out_dir = tmp_path_factory.mktemp("slurm_jobs")
    tp_env = dict(env, PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    tp_check = submit(
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
    train = submit(
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


def _full_vocab_cross_entropy() -> torch.Tensor:
    """Reference loss ``[s, b]`` on one process over the whole vocabulary."""
    spec = importlib.util.spec_from_file_location("tp_check", JOB_DIR / "tp_check.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    logits, targets = job.fixed_logits_and_targets()
    seq_len, batch, vocab = logits.shape
    loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    return loss.view(seq_len, batch)


def test_two_task_sbatch_job_runs_tp_collectives(jobs):
    env = jobs["env"]
    record, log = jobs["tp_check"].wait(env)
    assert field(record, "JobState") == "COMPLETED", log
    assert field(record, "ExitCode") == "0:0", log
    results = tagged_records(log, "RESULT")
    assert sorted(results) == [0, 1], log

    master = first_host(env, record)
    expected_loss = _full_vocab_cross_entropy()
    for task, result in results.items():
        assert result["python"] == sys.executable
        assert result["rank"] == result["launch_rank"] == task
        assert result["local_rank"] == task  # one node: SLURM_LOCALID == SLURM_PROCID
        assert result["world_size"] == 2
        assert result["master_addr"] == master
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
    assert field(record, "JobState") == "COMPLETED", log
    launches = tagged_records(log, "LAUNCH")
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
        assert launch["master_addr"] == first_host(env, record)
        assert launch["master_port"] == 29500 + job_id % 1000
