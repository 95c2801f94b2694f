"""Optimisation, checkpointing and logging settings of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class TrainingConfig:
    """The optimisation loop."""

    num_steps: int = 10
    """Training steps (one rollout each, then ``num_mini_batches * num_epochs`` optimizer
    updates on it; the LR schedule counts training steps)."""

    num_mini_batches: int = 1
    """Optimizer updates per pass over a step's rollouts: each data-parallel rank splits
    its samples into this many equal, interleaved mini-batches (verl's ``train_batch_size /
    ppo_mini_batch_size``). Later mini-batches are slightly off-policy; the PPO ratio and
    clip of the policy-gradient losses account for that. The samples per rank
    (``data.prompts_per_step / DP * rollout.n_samples_per_prompt``) must divide by it."""

    num_epochs: int = 1
    """Passes over a step's mini-batches (verl's ``ppo_epochs``)."""

    lr: float = 1e-6
    """Peak learning rate (the paper uses 1e-6 on 1.5B-4B students)."""

    min_lr: float = 0.0
    """Learning rate at the end of the decay."""

    lr_warmup_steps: int = 0
    """Linear warm-up steps."""

    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2."""

    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    micro_batch_tokens: int = 8192
    """Token budget (rows x padded length) of one training micro-batch after trimming."""

    max_micro_batch_rows: int = 8
    """At most this many sequences in one training micro-batch."""

    trim: bool = True
    """Cut tokens whose loss weight is 0 (and everything after them) from the training
    forward/backward. Exact: they cannot change the loss of earlier tokens."""

    max_consecutive_bad_steps: int = 3
    """Stop the run (after checkpointing the last good state) after this many steps in a row
    with a NaN/inf loss or gradient; each such step is skipped and logged."""

    seed: int = 1234
    """Seed of model init, sampling and data order."""

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError("training.num_steps must be >= 1")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"training.{name} must be a finite number >= 0, got {value}")
        if self.min_lr > self.lr:
            raise ValueError("training.min_lr must be <= training.lr")
        if self.micro_batch_tokens < 1 or self.max_micro_batch_rows < 1:
            raise ValueError(
                "training.micro_batch_tokens and training.max_micro_batch_rows must be >= 1"
            )
        if self.max_consecutive_bad_steps < 1:
            raise ValueError("training.max_consecutive_bad_steps must be >= 1")
        for name in ("num_mini_batches", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and how often to checkpoint; what to resume from."""

    save_dir: str | None = None
    """Directory of step_* checkpoints (None: never save)."""

    save_interval: int = 0
    """Save every this many steps (0: only at the end)."""

    keep_last: int = 2
    """Complete checkpoints to keep."""

    load_dir: str | None = None
    """Resume from this checkpoint (a step_* dir or a save_dir; None: resume from save_dir
    when it holds a complete checkpoint, else start fresh)."""

    export_hf_dir: str | None = None
    """Write the final student as an HF checkpoint here (None: do not export). An existing
    directory is refused at start-up unless ``export_hf_overwrite`` is set."""

    export_hf_overwrite: bool = False
    """Replace an existing ``export_hf_dir`` with the new export at the end of training."""

    def __post_init__(self) -> None:
        if self.save_interval < 0:
            raise ValueError("checkpoint.save_interval must be >= 0")
        if self.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")


@dataclass(kw_only=True)
class LoggingConfig:
    """Metrics sinks."""

    log_dir: str | None = "runs/prune-opd"
    """metrics.jsonl and TensorBoard event files go here."""

    tensorboard: bool = True
    """Write TensorBoard event files."""

    wandb_project: str | None = None
    """Also log to this wandb project (optional dependency)."""

    progress_bar: bool = True
    """Show a progress bar with ETA on rank 0."""
