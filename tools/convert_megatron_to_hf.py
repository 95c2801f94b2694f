"""Thin wrapper: see megatron_opd.conversion.cli.main_megatron_to_hf (--help)."""

import sys

from megatron_opd.conversion.cli import main_megatron_to_hf

if __name__ == "__main__":
    sys.exit(main_megatron_to_hf())
