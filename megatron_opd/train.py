"""Entry point of ``megatron-opd train``: build, train, always tear down."""

from __future__ import annotations

from megatron_opd.config.opd import OPDConfig
from megatron_opd.distributed import destroy_distributed, destroy_model_parallel, init_distributed


def run_training(
    config: OPDConfig, *, destroy_process_group: bool = True
) -> list[dict[str, float]]:
    """Run Prune-OPD with ``config`` in this process (one rank of torchrun/srun).

    ``destroy_process_group=False`` keeps the default group alive (in-process tests).
    """
    from megatron_opd.training.setup import build_components
    from megatron_opd.training.trainer import Trainer

    groups = init_distributed(config.parallel, seed=config.training.seed)
    components = None
    try:
        components = build_components(config, groups)
        trainer = Trainer(config, groups, components)
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
