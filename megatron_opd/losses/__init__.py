"""OPD losses, each weighted by the Prune-OPD loss weights and returning Megatron's
``(loss_sum, num_tokens, metrics)`` (``calculate_per_token_loss=True``).

Inputs are per-token tensors already gathered at a few ids per position; the losses
never see the vocabulary.
"""

from megatron_opd.losses.dispatch import REQUIRED_TENSORS, opd_loss
from megatron_opd.losses.divergence import (
    forward_topk_kl_loss,
    gkd_jsd_loss,
    topk_reverse_kl_loss,
)
from megatron_opd.losses.id_set import ID_SET_MODES, build_id_set
from megatron_opd.losses.policy_gradient import (
    sampled_reverse_kl_pg_loss,
    sampled_rewards,
    topk_reverse_kl_pg_loss,
    topk_rewards,
)

__all__ = [
    "ID_SET_MODES",
    "REQUIRED_TENSORS",
    "build_id_set",
    "forward_topk_kl_loss",
    "gkd_jsd_loss",
    "opd_loss",
    "sampled_reverse_kl_pg_loss",
    "sampled_rewards",
    "topk_reverse_kl_loss",
    "topk_reverse_kl_pg_loss",
    "topk_rewards",
]
