"""Stopping a run cleanly when the cluster asks: SIGTERM / SIGUSR1 -> finish the step, save,
exit so that the job is requeued and resumes from ``latest``.

Slurm warns a job before its time limit with the signal of ``--signal`` (the sbatch
scripts ask for ``B:USR1`` well ahead, the batch shell forwards it to the tasks) and
preempts, requeues or cancels it with SIGTERM, followed by SIGKILL after ``KillWait``
(or the partition's ``GraceTime``). A signal reaches each rank at a different moment, and
in the middle of a step; stopping only the ranks that saw it would hang the others in
their next collective. So, as Megatron-LM's exit-signal handler does, the handler only
records the signal, and at every step boundary the trainer reduces that flag over the
whole world (one tiny all-reduce): all ranks see the same answer, finish the same step,
write one checkpoint together and stop together.

The process then exits with :data:`REQUEUE_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again
later"), and rank 0 writes the file named by ``$OPD_REQUEUE_MARKER`` when that is set.
The marker, not the exit code, is what the sbatch scripts read: ``srun
--kill-on-bad-exit`` kills the slower ranks as soon as the first one exits non-zero, so
the step's exit code is 75 or 143 depending on timing, while the marker appears only
after the checkpoint is complete (``slurm/common.sh`` then runs ``scontrol requeue``).

The handler keeps system calls restartable (``siginterrupt(sig, False)``) so a signal
cannot fail a socket read inside a gloo/NCCL collective with EINTR.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import NoReturn

REQUEUE_EXIT_CODE = 75
"""Exit status of a run stopped by a signal after saving (``EX_TEMPFAIL``)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that ask the run to stop at the next step boundary."""

REQUEUE_MARKER_ENV = "OPD_REQUEUE_MARKER"
"""Environment variable naming the file rank 0 writes after a preemption checkpoint."""


class TrainingPreempted(Exception):  # noqa: N818 - it is an outcome, not an error
    """The run stopped at a step boundary because a stop signal arrived; state is saved."""

    def __init__(self, *, step: int, signal_name: str, checkpoint: str | None) -> None:
        self.step = step
        """Last completed step."""
        self.signal_name = signal_name
        """``SIGTERM`` or ``SIGUSR1`` (the first one any rank received)."""
        self.checkpoint = checkpoint
        """Directory of the checkpoint holding ``step``; None when the run saves nothing."""
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no save_dir)"
        super().__init__(f"stopped by {signal_name} after step {step}; {where}")


class StopSignals:
    """Records stop signals; :meth:`stop_requested` turns them into one decision per step.

    ``install()`` in the main thread (Python delivers signals only there); ``uninstall()``
    restores the previous handlers. Use as a context manager.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        """The first stop signal this process received, or None."""
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        """Catch the stop signals (no-op outside the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
            signal.siginterrupt(sig, False)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
            # os.write: print() may be mid-write in the interrupted code (not reentrant).
            name = signal.Signals(signum).name
            os.write(2, f"[megatron-opd] {name} received: stopping after this step\n".encode())

    def stop_requested(self, device) -> bool:
        """Collective over the default (world) group: True on every rank when any rank
        received a stop signal. Call at the same point of every step on every rank."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.received is None else int(self.received)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        if value and self.received is None:
            self.received = value  # another rank's signal: remember which one for messages
        return value != 0

    @property
    def signal_name(self) -> str:
        """Name of the received signal (``"none"`` before any)."""
        return signal.Signals(self.received).name if self.received else "none"


def write_requeue_marker(step: int, checkpoint: str | None) -> None:
    """Tell the batch script that the run stopped for a signal after saving ``step``
    (only when ``$OPD_REQUEUE_MARKER`` names a file; call on global rank 0)."""
    path = os.environ.get(REQUEUE_MARKER_ENV)
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"step={step}\ncheckpoint={checkpoint or ''}\n")
    os.replace(tmp, path)


def stop_after_signal(trainer) -> NoReturn:
    """Collective: save the state of ``trainer``'s last finished step (unless it is saved
    already), tell the batch script (rank 0), raise TrainingPreempted on every rank."""
    from megatron_opd.checkpoint import find_latest_checkpoint

    save_dir = trainer.config.checkpoint.save_dir
    # Step 0 of a fresh run holds nothing worth saving; a resumed step is saved already.
    if save_dir is not None and trainer.step > 0 and trainer.last_saved_step != trainer.step:
        trainer.save()
    checkpoint = None
    if save_dir is not None and trainer.last_saved_step is not None:
        checkpoint = str(find_latest_checkpoint(save_dir))
    name = trainer.stop_signals.signal_name
    log = trainer.c.log
    if save_dir is None:
        log.message(
            f"{name}: checkpoint.save_dir is not set, so nothing is saved and the job is not "
            "requeued; set it to make the run resumable"
        )
    elif trainer.groups.rank == 0:
        try:
            write_requeue_marker(trainer.step, checkpoint)
        except OSError as err:  # the checkpoint is safe; only the automatic requeue is lost
            log.message(f"{name}: cannot write ${REQUEUE_MARKER_ENV} ({err}); resubmit the job")
    where = f"; {checkpoint} holds it" if checkpoint else ""
    log.message(f"{name}: stopped after step {trainer.step}{where}")
    raise TrainingPreempted(step=trainer.step, signal_name=name, checkpoint=checkpoint)
