"""megatron_opd: Prune-OPD on-policy distillation on Megatron-Core."""

__version__ = "0.1.0"
