"""The helper process dist_checkpointing starts, made to end with the trainer.

Megatron-Core's filesystem writer collects per-rank write results through a queue served
by a ``multiprocessing`` Manager: a separate server process, started on the first save
and kept for the life of the trainer. Left as Megatron starts it, that server

- outlives a trainer that dies by a signal (no ``atexit`` runs, and nothing tells the
  server its parent is gone), holding the trainer's stdout and stderr open, so whoever
  reads them (a pipe, ``srun``) waits for as long as nobody kills it;
- dies itself of the SIGTERM / SIGUSR1 that Slurm sends to every process of a job step
  (the default action of both), so the checkpoint the trainer writes in answer to that
  signal fails on the dead queue.

:func:`install_checkpoint_results_queue` serves that queue from a Manager of our own whose
server ignores those signals, asks the kernel to SIGKILL it when the trainer dies
(``PR_SET_PDEATHSIG``, Linux), and exits at once if the trainer is already gone. A normal
exit still shuts it down through ``multiprocessing``'s own ``atexit`` finaliser.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_manager: SyncManager | None = None


def _bind_to_parent(parent_pid: int) -> None:
    """Initializer of the Manager's server process (runs in the child)."""
    for sig in _IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between fork and prctl: then nobody would signal us.
    if os.getppid() != parent_pid:
        os._exit(0)


def install_checkpoint_results_queue() -> None:
    """Serve dist_checkpointing's write-results queue from a Manager bound to this
    process (idempotent; call before the first ``dist_checkpointing.save``)."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    if not hasattr(filesystem_async, "_get_write_results_queue"):
        return  # another Megatron-Core layout: nothing of ours to replace
    # "spawn", as Megatron uses: a fork of a process holding CUDA or gloo state is unsafe.
    _manager = SyncManager(ctx=mp.get_context("spawn"))
    _manager.start(initializer=_bind_to_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()


def manager_pid() -> int | None:
    """PID of the results-queue server of this process (None before the first save)."""
    return None if _manager is None else _manager._process.pid
