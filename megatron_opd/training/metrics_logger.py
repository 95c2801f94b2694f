"""Per-step metrics to the console (a progress bar with ETA), JSONL and TensorBoard.

Only the logging rank (global rank 0) writes. wandb is used when a project name is set
and the package imports; otherwise it is silently not used (a warning once).

A resumed run first calls :meth:`MetricsLogger.resume_at`: records of steps after the
checkpoint (logged by the run that died, and about to run again) are dropped from
``metrics.jsonl`` and TensorBoard, so each step appears once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

_CONSOLE_KEYS = (
    "loss", "overlap_ratio_mean", "bad_event_rate", "effective_length_mean", "budget",
    "reward_accuracy", "time_step_s",
)  # fmt: skip
_COUNTER_KEYS = (
    "samples_stopped", "tokens_trimmed", "teacher_chunk_forwards", "chunks_deferred",
    "decode_steps_on_shards",
)  # fmt: skip
"""What the Prune-OPD mechanisms and the sharded sampler did this step: on the console
when not 0."""


class MetricsLogger:
    """Writes one record per step; ``close()`` flushes everything."""

    def __init__(
        self,
        log_dir: str | Path | None,
        *,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_config: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self._jsonl = None
        self._bar = None
        self._start = time.monotonic()
        self.log_dir = None if log_dir is None else Path(log_dir)
        if not enabled:
            return
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, config=run_config or {})
            except Exception as err:  # noqa: BLE001 - wandb is optional
                warnings.warn(f"wandb not used: {err}", stacklevel=2)
        if show_progress:
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="opd",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def resume_at(self, step: int) -> None:
        """Forget every record after ``step`` (the checkpoint a run resumes from)."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            path = self.log_dir / "metrics.jsonl"
            self._jsonl.close()
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                if _record_step(line) <= step
            ]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
            self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            logdir = self._tb.log_dir
            self._tb.close()
            # TensorBoard hides events at or after purge_step written by earlier runs.
            self._tb = SummaryWriter(logdir, purge_step=step + 1)
        if self._bar is not None:
            self._bar.n = self._bar.last_print_n = step
            self._bar.refresh()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` for ``step`` everywhere and advance the progress bar."""
        if not self.enabled:
            return
        clean = self._write(step, metrics)
        if self._bar is not None:
            shown = {k: f"{clean[k]:.4g}" for k in _CONSOLE_KEYS if k in clean}
            shown.update({k: f"{clean[k]:.0f}" for k in _COUNTER_KEYS if clean.get(k)})
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def log_extra(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics computed outside the step (evaluations) without advancing the
        progress bar."""
        if not self.enabled or not metrics:
            return
        clean = self._write(step, metrics)
        self.message(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in clean.items()))

    def _write(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        clean = {k: _to_float(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": step, "wall_time_s": time.monotonic() - self._start, **clean}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        return clean

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line (a torn last line counts as after every step)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _to_float(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)
