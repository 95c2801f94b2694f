"""Thin wrapper: see megatron_opd.conversion.cli.main_hf_to_megatron (--help)."""

import sys

from megatron_opd.conversion.cli import main_hf_to_megatron

if __name__ == "__main__":
    sys.exit(main_hf_to_megatron())
