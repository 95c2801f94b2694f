"""Entry point of ``megatron-opd train``: check, build, train, always tear down."""

from __future__ import annotations

from megatron_opd.config.opd import OPDConfig
from megatron_opd.distributed import destroy_distributed, destroy_model_parallel, init_distributed
from megatron_opd.launch_env import launch_world_size
from megatron_opd.training.preemption import StopSignals


def run_training(
    config: OPDConfig,
    *,
    destroy_process_group: bool = True,
    stop_signals: StopSignals | None = None,
    prepared=None,
) -> list[dict[str, float]]:
    """Run Prune-OPD with ``config`` in this process (one rank of torchrun/srun).

    ``prepared`` is what :func:`megatron_opd.training.preflight.preflight_training`
    returned (run here when None), so every check that needs no process group has
    passed before one is created. ``stop_signals`` (installed by the caller) turns
    SIGTERM/SIGUSR1 into a checkpoint and :class:`TrainingPreempted` at the next step
    boundary. ``destroy_process_group=False`` keeps the default group alive (in-process
    tests).
    """
    from megatron_opd.training.preflight import preflight_training
    from megatron_opd.training.setup import build_components
    from megatron_opd.training.trainer import Trainer

    if prepared is None:
        prepared = preflight_training(config, world_size=launch_world_size())
    groups = init_distributed(config.parallel, seed=config.training.seed)
    components = None
    try:
        components = build_components(config, groups, prepared=prepared)
        trainer = Trainer(config, groups, components, stop_signals=stop_signals)
        trainer.maybe_resume()
        history = trainer.train()
        trainer.export_hf()
        return history
    finally:
        if components is not None:
            components.log.close()
        if destroy_process_group:
            destroy_distributed()
        else:
            destroy_model_parallel()
