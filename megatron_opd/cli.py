"""``megatron-opd``: the command line.

    megatron-opd train --config examples/<recipe>.yaml [section.field=value ...]
    megatron-opd eval  --config examples/<recipe>.yaml [section.field=value ...]
    megatron-opd demo  [--out DIR] [--quick]
    megatron-opd convert hf-to-megatron|megatron-to-hf|verify ...
    megatron-opd config [--config FILE]      # print every field with its documentation

``train`` and ``eval`` are launched once per process by torchrun or srun. The config is
parsed and validated, then every check that needs no process group runs
(:mod:`megatron_opd.training.preflight`: model paths, vocabularies, layout, data, eval sets,
writable outputs, the checkpoint to resume), before any process group is created: a
mistake fails at once, as one ``error: ...`` line printed by rank 0 (exit status 2).

``train`` stops cleanly on SIGTERM / SIGUSR1: it finishes the step, saves, and exits with
status 75 so the job can be requeued (:mod:`megatron_opd.training.preemption`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NoReturn


def _parse_train_args(argv: list[str], prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", help="YAML recipe (see examples/)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return parser.parse_args(argv)


ERROR_GRACE_ENV = "MEGATRON_OPD_ERROR_GRACE_S"
"""Seconds a failing rank other than 0 waits before it prints its error (default 15)."""


def _exit_once(line: str, status: int = 2) -> NoReturn:
    """Print ``line`` once, then exit with ``status``.

    Every rank runs the same checks on the same files, so rank 0 prints and exits at
    once, and the launcher (srun ``--kill-on-bad-exit``, torchrun) ends the other ranks
    before they say the same. A rank that fails where rank 0 passed (a path missing on
    one node) would otherwise exit silently while rank 0 waits for it in the rendezvous:
    it waits ``MEGATRON_OPD_ERROR_GRACE_S`` seconds (still alive only if rank 0 did not
    fail), then prints the error with its rank.
    """
    from megatron_opd.launch_env import launch_rank

    rank = launch_rank()
    if rank != 0:
        time.sleep(float(os.environ.get(ERROR_GRACE_ENV, "15")))
        line = f"[rank {rank}] {line}"
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def _load(args: argparse.Namespace):
    from megatron_opd.config.loader import load_config
    from megatron_opd.config.opd import OPDConfig

    try:
        return load_config(OPDConfig, args.config, args.overrides)
    except ValueError as err:
        _exit_once(f"config error: {err}")


def _preflight(check, config):
    """``check(config, world_size=...)``, its failure reported as one ``error:`` line."""
    from megatron_opd.launch_env import launch_world_size

    try:
        return check(config, world_size=launch_world_size())
    except ValueError as err:
        _exit_once(f"error: {err}")


def _train(rest: list[str]) -> None:
    from megatron_opd.training.preemption import (
        REQUEUE_EXIT_CODE,
        StopSignals,
        TrainingPreempted,
    )

    # First: a signal that arrives while the models load still ends in a clean stop.
    with StopSignals() as stop_signals:
        config = _load(_parse_train_args(rest, "megatron-opd train"))
        from megatron_opd.training.preflight import preflight_training

        prepared = _preflight(preflight_training, config)
        from megatron_opd.train import run_training

        try:
            run_training(config, stop_signals=stop_signals, prepared=prepared)
        except TrainingPreempted:
            sys.exit(REQUEUE_EXIT_CODE)  # the trainer said where the checkpoint is


def _eval(rest: list[str]) -> None:
    config = _load(_parse_train_args(rest, "megatron-opd eval"))
    from megatron_opd.training.preflight import preflight_evaluation

    _preflight(preflight_evaluation, config)
    from megatron_opd.evaluate import run_evaluation

    run_evaluation(config)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``megatron-opd`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "eval", "demo", "convert", "config")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        _train(rest)
    elif command == "eval":
        _eval(rest)
    elif command == "demo":
        from megatron_opd.demo.run import main as demo_main

        demo_main(rest)
    elif command == "convert":
        from megatron_opd.conversion import cli as conversion_cli

        sub = {
            "hf-to-megatron": conversion_cli.main_hf_to_megatron,
            "megatron-to-hf": conversion_cli.main_megatron_to_hf,
            "verify": conversion_cli.main_verify,
        }
        if not rest or rest[0] not in sub:
            sys.exit(f"usage: megatron-opd convert {{{','.join(sub)}}} ...")
        sys.exit(sub[rest[0]](rest[1:]) or 0)
    elif command == "config":
        args = _parse_train_args(rest, "megatron-opd config")
        from megatron_opd.config.describe import describe_config

        print(describe_config(_load(args)))


if __name__ == "__main__":
    main()
