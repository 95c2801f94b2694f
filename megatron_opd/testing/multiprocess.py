"""Run a function on N gloo processes, fail fast with the failing rank's traceback.

Starting a process that imports torch and Megatron costs ~5 s on two cores, so a
:class:`DistributedPool` keeps its workers (and their default gloo group) alive across
calls: each call sends a picklable function to every rank and collects the results.
A test body calls :func:`megatron_opd.distributed.init_distributed` itself with the layout
it wants; that re-creates Megatron's groups over the existing world group.

Failure handling: the first exception on any rank (or a worker that dies, or the call's
deadline) terminates every worker at once, so the ranks still blocked in a collective can
never hang the suite; the next call starts a fresh pool. The error names the rank and
carries its traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from megatron_opd.launch_env import free_port

_ERROR_GRACE_SECONDS = 2.0


def _worker_main(rank, world_size, port, tasks, results, collective_timeout_s, env):
    # Own process group: closing the pool kills the group, so helper processes a worker
    # started (dist_checkpointing's Manager server) can never outlive it.
    os.setpgrp()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch
        import torch.distributed as dist

        from megatron_opd.platform import apply_cpu_compat

        torch.set_num_threads(1)
        apply_cpu_compat()
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        results.put((rank, "ready", None))
    except BaseException:  # noqa: BLE001 - report any start-up failure to the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the test process died: do not linger
                break
            continue
        if task is None:
            break
        fn, args, kwargs = task
        try:
            value = fn(*args, **kwargs)
            results.put((rank, "ok", value))
        except BaseException:  # noqa: BLE001
            results.put((rank, "error", traceback.format_exc()))
    try:
        from megatron_opd.distributed import destroy_distributed

        destroy_distributed()
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass
    # dist_checkpointing's async writer leaves a multiprocessing Manager server behind (a
    # child of this worker); without this it would outlive the pool as an orphan.
    for child in mp.active_children():
        child.terminate()


class DistributedRankError(AssertionError):
    """A rank raised, died or timed out; the message holds every rank's report."""


class DistributedPool:
    """``world_size`` persistent CPU worker processes joined in one gloo group."""

    def __init__(
        self,
        world_size: int,
        *,
        collective_timeout_s: int = 60,
        start_timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.world_size = world_size
        self.collective_timeout_s = collective_timeout_s
        self.start_timeout_s = start_timeout_s
        self.env = dict(env or {})
        self._procs: list[mp.Process] = []
        self._tasks: list[Any] = []
        self._results: Any = None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = free_port()
        env = {"OMP_NUM_THREADS": "1", **self.env}
        self._procs = [
            ctx.Process(
                target=_worker_main,
                args=(
                    r,
                    self.world_size,
                    port,
                    self._tasks[r],
                    self._results,
                    self.collective_timeout_s,
                    env,
                ),
                # Not daemonic: dist_checkpointing forks writer processes, which daemons may
                # not do. Workers exit on their own when the parent process disappears.
                daemon=False,
            )  # fmt: skip
            for r in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        self._collect("ready", self.start_timeout_s, what="start-up")

    def _collect(self, expected: str, timeout_s: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        error_deadline = None
        while len(values) + len(errors) < self.world_size:
            now = time.monotonic()
            limit = deadline if error_deadline is None else min(deadline, error_deadline)
            if now >= limit:
                break
            try:
                rank, status, value = self._results.get(timeout=min(0.2, limit - now))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(self._procs)
                    if p.exitcode is not None and r not in values and r not in errors
                ]  # fmt: skip
                for r in dead:
                    errors[r] = f"worker process exited with code {self._procs[r].exitcode}"
                if dead and error_deadline is None:
                    error_deadline = time.monotonic() + _ERROR_GRACE_SECONDS
                continue
            if status == "error":
                errors[rank] = value
                if error_deadline is None:
                    error_deadline = time.monotonic() + _ERROR_GRACE_SECONDS
            else:
                assert status == expected, (status, expected)
                values[rank] = value
        if errors or len(values) < self.world_size:
            missing = [r for r in range(self.world_size) if r not in values and r not in errors]
            self.close()
            parts = [f"rank {r} failed during {what}:\n{tb}" for r, tb in sorted(errors.items())]
            if missing:
                parts.append(
                    f"ranks {missing} gave no result within {timeout_s:.0f} s during {what} "
                    "(blocked in a collective waiting for a failed rank, or too slow)"
                )
            raise DistributedRankError("\n".join(parts))
        return [values[r] for r in range(self.world_size)]

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 180.0, **kwargs: Any):
        """Call ``fn(*args, **kwargs)`` on every rank; return the per-rank results.

        ``fn`` must be importable by module path (a module-level function).
        """
        if not self._procs or any(not p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        return self._collect("ok", timeout_s, what=getattr(fn, "__name__", "call"))

    def close(self) -> None:
        """Stop every worker (terminate, then kill)."""
        for task_queue in self._tasks:
            try:
                task_queue.put_nowait(None)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + 5.0  # a clean exit also stops the workers' children
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the worker left behind
            except (ProcessLookupError, PermissionError):
                pass
        self._procs = []
        self._tasks = []


_POOLS: dict[int, DistributedPool] = {}


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, **kwargs: Any):
    """Run ``fn`` on a shared pool of ``world_size`` ranks (created on first use)."""
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = _POOLS[world_size] = DistributedPool(world_size)
    return pool.run(fn, *args, **kwargs)


def close_all_pools() -> None:
    """Stop every shared pool (call at the end of a test session)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
