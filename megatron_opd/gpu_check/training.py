"""Steps ``trainer_resume``, ``chunked_stop``, ``offload_chunking``: the trainer on NCCL.

All three use the tiny run of :mod:`megatron_opd.testing.tiny_run` (SentencePiece
tokenizer, random 2-layer Qwen3 teacher and student, chain-sum prompts) in one process,
TP=1, on the machine's default device (CUDA + NCCL on the GPU node, gloo on CPU).

- ``trainer_resume``: 3 uninterrupted steps; then 2 steps with a checkpoint, a fresh
  trainer that resumes from it, and step 3. The resumed step's metrics must equal the
  uninterrupted ones (rollout seeds derive from the step, RNG states are restored);
  the largest relative difference is reported (GPU kernels may differ in the last bits).
- ``chunked_stop``: ``rollout.chunk_size=4`` (the teacher scores every 4 new tokens and
  the online stop may end samples early), 2 steps.
- ``offload_chunking``: the same with ``teacher.offload_teacher=true``: the teacher lives
  in host memory between uses and must be onloaded before each chunked rollout.
"""

from __future__ import annotations

import math
from pathlib import Path

COMPARED = ("loss", "reverse_kl", "overlap_ratio_mean", "tokens_generated", "grad_norm")


def _tiny_overrides(work_dir: Path) -> list[str]:
    from megatron_opd.testing.tiny_run import make_tiny_run

    root = work_dir / "tiny_run"
    return [*make_tiny_run(root), "logging.log_dir=null", "logging.progress_bar=false"]


def _train(overrides: list[str]) -> list[dict]:
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig
    from megatron_opd.train import run_training

    config = build_config(OPDConfig, merge_overrides({}, overrides))
    return run_training(config, destroy_process_group=False)


def _finite(history: list[dict]) -> bool:
    return all(math.isfinite(v) for h in history for k, v in h.items() if k in COMPARED)


def trainer_resume_check(work_dir: Path) -> dict:
    """3 steps straight vs 2 steps + save + resume + 1 step."""
    overrides = _tiny_overrides(work_dir)
    straight = _train([*overrides, "training.num_steps=3"])
    save_dir = work_dir / "checkpoints"
    first = _train([*overrides, "training.num_steps=2", f"checkpoint.save_dir={save_dir}"])
    resumed = _train([*overrides, "training.num_steps=3", f"checkpoint.save_dir={save_dir}"])
    saved = sorted(p.name for p in save_dir.glob("step_*"))
    diffs = {
        key: abs(resumed[-1][key] - straight[2][key]) / max(abs(straight[2][key]), 1e-8)
        for key in COMPARED
    }
    return {
        "straight": [{k: h[k] for k in (*COMPARED, "step")} for h in straight],
        "first_run_steps": [h["step"] for h in first],
        "resumed_steps": [h["step"] for h in resumed],
        "checkpoints": saved,
        "max_relative_difference": max(diffs.values()),
        "relative_difference": diffs,
        "passed": _finite(straight)
        and resumed[-1]["step"] == 3
        and max(diffs.values()) < 1e-3
        and "step_00000002" in saved,
    }


def chunked_check(work_dir: Path, *, offload: bool) -> dict:
    """2 steps with chunked online stop (and the teacher offloaded when ``offload``)."""
    import torch

    overrides = [*_tiny_overrides(work_dir), "training.num_steps=2", "rollout.chunk_size=4"]
    if offload:
        overrides.append("teacher.offload_teacher=true")
    history = _train(overrides)
    report = {
        "history": [
            {k: h[k] for k in (*COMPARED, "step", "effective_length_mean")} for h in history
        ],  # fmt: skip
        "cuda": torch.cuda.is_available(),
    }
    report["passed"] = _finite(history) and len(history) == 2
    return report
