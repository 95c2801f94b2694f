"""The arms of the payoff benchmark (``bench/reproduce.py``): one base run, and what each
arm changes.

Every arm distils the same student from the same teacher on the same prompts with the
same seeds; only the method differs:

- ``plain``: plain OPD at a fixed maximum response length (no weights, no budget, no
  early stop): the baseline every time ratio is taken against.
- ``released``: Prune-OPD exactly as released: reliability weights (``w + w_base`` on
  every generated token) and the dynamic response budget. Its only time saving is the
  budget.
- ``truncate``: Prune-OPD with what this project adds: ``prune.mode=truncate`` (each
  response ends at its stop point), the online stop during chunked generation (teacher
  scores kept, so the teacher reads each token once), training-side trimming, and the
  budget.
- ``stop_trim``: ``truncate`` without the budget: what the online stop and trimming save
  on their own (``released`` isolates the budget, ``truncate`` has both).
- ``release_pg``: ``released`` with the release's own loss (``topk_reverse_kl_pg``: the
  top-K reverse-KL reward as PPO advantages, K = 16, one optimizer update per rollout).
- ``plain_fkl``, ``truncate_fkl``: ``plain`` and ``truncate`` with the forward top-K KL
  (the demo's loss) at lr 1e-4, kept to show what it does on long responses: in probes
  it made plain OPD worse at every learning rate tried (1e-5 flat, 3e-5 to 1e-3 down to
  ~0 %), and truncate mode held it off for a while.

Settings shared by every arm (the reasons are in :func:`base_config`): the drift event is
the sampled token leaving the teacher's 90 % top-p set (the release's second metric; with a
near-certain tiny teacher the top-K overlap of ids ranked 2..K is noise), ``w_drop = 0.2``
(a response's weight reaches 0 at its 5th drift event), the release's ``w_base = 0.5``,
and the direct top-K reverse KL over the student's top-4 (the release's divergence,
differentiated directly).
"""

from __future__ import annotations

import copy
from pathlib import Path

ARMS = ("plain", "released", "truncate", "stop_trim", "release_pg", "plain_fkl", "truncate_fkl")
"""Every arm, in report order."""

ARM_TITLES = {
    "plain": "(a) plain OPD, fixed max length",
    "released": "(b) Prune-OPD as released (weights + budget)",
    "truncate": "(c) Prune-OPD + online stop + trimming",
    "stop_trim": "(c0) online stop + trimming, no budget",
    "release_pg": "(d) as (b) with the release's PG loss",
    "plain_fkl": "(a') plain OPD, forward top-K KL",
    "truncate_fkl": "(c') as (c), forward top-K KL",
}


def check_arms(names) -> list[str]:
    """The arm names, validated (ValueError naming the unknown ones and the valid ones)."""
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; the arms are {list(ARMS)}")
    if not names:
        raise ValueError(f"no arm given; the arms are {list(ARMS)}")
    return names


def base_config(
    assets,
    run_dir: Path,
    *,
    seed: int,
    steps: int,
    max_new_tokens: int,
    eval_every: int,
    eval_problems: int,
    prompts_per_step: int = 16,
    lr: float = 3e-4,
) -> dict:
    """The settings every arm shares (a plain-OPD run until an arm changes it)."""
    floor = max(8, max_new_tokens // 5)
    grow = max(1, (max_new_tokens - floor) // 32)
    return {
        "student": {"path": str(assets.student_dir), "transformer_impl": "local"},
        "teacher": {"path": str(assets.teacher_dir), "transformer_impl": "local"},
        "parallel": {"tensor_parallel_size": 1, "timeout_seconds": 600},
        "data": {
            "train_path": str(assets.train_prompts),
            "max_prompt_length": 32,
            "prompts_per_step": prompts_per_step,
            "seed": seed,
        },
        # A fixed cap above the longest worked solution (286 tokens): plain OPD generates
        # every response to its EOS or this cap.
        "rollout": {
            "n_samples_per_prompt": 4,
            "max_new_tokens": max_new_tokens,
            "chunk_size": 0,
            "seed": 1000 + seed,
        },
        "prune": {
            "enable": False,
            "mode": "released",
            "metric": "teacher_top_p_accept",
            "threshold": 0.9,
            "top_k": 4,
            "w_drop": 0.2,
            "w_base": 0.5,
        },
        # The release's controller (init = floor, grow by `step` on a hit step, h = 0.1,
        # shrink after 3 misses), scaled to these lengths: from cap / 5 (64 of 320 tokens)
        # it can reach the cap in 32 hit steps, about half the run (the release: 1024 ->
        # 12288 in 113 of its 203 steps).
        "budget": {
            "enable": False,
            "init_len": floor,
            "min_len": floor,
            "max_len": max_new_tokens,
            "step": grow,
            "margin": grow,
            "hit_ratio": 0.1,
            "shrink_patience": 3,
        },
        # The release's divergence, KL(student || teacher) over the student's top-K plus a
        # tail bucket, differentiated directly. The forward top-K KL of the demo makes plain
        # OPD on these long responses worse step by step (the *_fkl arms show it).
        "loss": {"kind": "topk_reverse_kl", "id_set": "only_stu"},
        "training": {
            "num_steps": steps,
            "lr": lr,
            "min_lr": lr / 10,
            "lr_decay_style": "cosine",
            # 64 samples per step in 8 mini-batches: 8 updates per rollout (the rollout is
            # most of a step's time on CPU).
            "num_mini_batches": 8,
            "micro_batch_tokens": 8192,
            "max_micro_batch_rows": 32,
            "seed": seed,
        },
        "checkpoint": {"save_dir": None, "export_hf_dir": None},
        "logging": {
            "log_dir": str(run_dir / "logs"),
            "progress_bar": False,
            "tensorboard": False,
        },  # fmt: skip
        "eval": {
            "datasets": [str(assets.eval_prompts)],
            "k": 1,
            "temperature": 0.0,
            "max_new_tokens": max_new_tokens,
            "max_problems": eval_problems,
            "interval": eval_every,
        },
    }


def arm_config(base: dict, arm: str, *, pg_lr: float | None = None) -> dict:
    """``base`` changed into ``arm`` (a new dict)."""
    check_arms([arm])
    config = copy.deepcopy(base)
    prune, budget, loss = config["prune"], config["budget"], config["loss"]
    if arm.startswith("truncate") or arm == "stop_trim":
        prune.update(enable=True, mode="truncate")
        budget["enable"] = arm != "stop_trim"
        config["rollout"]["chunk_size"] = 16
    elif arm in ("released", "release_pg"):
        prune.update(enable=True, mode="released")
        budget["enable"] = True
    if arm.endswith("_fkl"):
        loss.update(kind="forward_topk_kl")
        lr = min(config["training"]["lr"], 1e-4)
        config["training"].update(lr=lr, min_lr=lr / 10)
    if arm == "release_pg":
        # As released: K = 16, student top-K ids, student_p reward weights, PPO clip,
        # one optimizer update per rollout.
        prune["top_k"] = 16
        loss.update(kind="topk_reverse_kl_pg", id_set="only_stu", reward_weight="student_p")
        config["training"]["num_mini_batches"] = 1
        if pg_lr is not None:
            config["training"].update(lr=pg_lr, min_lr=pg_lr / 10)
    return config
