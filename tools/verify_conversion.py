"""Thin wrapper: see megatron_opd.conversion.cli.main_verify (--help)."""

import sys

from megatron_opd.conversion.cli import main_verify

if __name__ == "__main__":
    sys.exit(main_verify())
