"""``megatron-opd``: the command line.

    megatron-opd train --config examples/<recipe>.yaml [section.field=value ...]
    megatron-opd eval  --config examples/<recipe>.yaml [section.field=value ...]
    megatron-opd demo  [--out DIR] [--quick]
    megatron-opd convert hf-to-megatron|megatron-to-hf|verify ...
    megatron-opd config [--config FILE]      # print every field with its documentation

``train`` and ``eval`` are launched once per process by torchrun or srun; the config is
parsed and validated before any process group is created, so a bad config fails at once
on every rank with the field name.
"""

from __future__ import annotations

import argparse
import sys


def _parse_train_args(argv: list[str], prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", help="YAML recipe (see examples/)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    return parser.parse_args(argv)


def _load(args: argparse.Namespace):
    from megatron_opd.config.loader import load_config
    from megatron_opd.config.opd import OPDConfig

    try:
        return load_config(OPDConfig, args.config, args.overrides)
    except ValueError as err:
        sys.exit(f"config error: {err}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``megatron-opd`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "eval", "demo", "convert", "config")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "train":
        config = _load(_parse_train_args(rest, "megatron-opd train"))
        from megatron_opd.train import run_training

        run_training(config)
    elif command == "eval":
        config = _load(_parse_train_args(rest, "megatron-opd eval"))
        from megatron_opd.evaluate import run_evaluation

        run_evaluation(config)
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
