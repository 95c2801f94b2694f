"""The dynamic response budget: ``max_new_tokens`` of the next rollout.

One controller per run, updated once per step from the batch's effective lengths
``E_i`` (spec section 4, as in the authors' release):

    boundary  = max(min_len, current - margin)
    hit_ratio = mean(E_i >= boundary)
    hit_ratio >= h  -> current = min(current + step, max_len); misses = 0
    otherwise       -> misses += 1; after shrink_patience misses in a row
                       current = max(current - step, min_len); misses = 0

The idea: when enough samples stay reliable up to (nearly) the current cap, longer
responses are worth generating; when they keep falling short, the tail of every rollout
is wasted decode work and the cap shrinks.
"""

from __future__ import annotations

import torch

from megatron_opd.config.prune import BudgetConfig


class ResponseBudget:
    """Stateful budget controller; ``state_dict()`` / ``load_state_dict()`` for resume."""

    def __init__(
        self,
        *,
        init_len: int = 1024,
        min_len: int = 1024,
        max_len: int = 12288,
        step: int = 100,
        margin: int = 100,
        hit_ratio: float = 0.1,
        shrink_patience: int = 3,
    ) -> None:
        self.config = BudgetConfig(
            init_len=init_len,
            min_len=min_len,
            max_len=max_len,
            step=step,
            margin=margin,
            hit_ratio=hit_ratio,
            shrink_patience=shrink_patience,
        )
        self._current = max(min_len, min(init_len, max_len))
        self._num_misses = 0

    @classmethod
    def from_config(cls, config: BudgetConfig) -> ResponseBudget:
        """Build from a ``budget`` config section (``enable`` is the caller's business)."""
        return cls(
            init_len=config.init_len,
            min_len=config.min_len,
            max_len=config.max_len,
            step=config.step,
            margin=config.margin,
            hit_ratio=config.hit_ratio,
            shrink_patience=config.shrink_patience,
        )

    @property
    def current(self) -> int:
        """The ``max_new_tokens`` of the next rollout."""
        return self._current

    @property
    def num_misses(self) -> int:
        """Miss steps in a row since the last change or hit."""
        return self._num_misses

    def update(self, effective_lengths: torch.Tensor) -> tuple[int, dict[str, float]]:
        """Feed one step's effective lengths ``[n]``; return the next budget and metrics.

        Metrics: ``budget/boundary``, ``budget/hit_ratio``, ``budget/num_misses`` (after
        the update), ``budget/length`` (the new budget).
        """
        lengths = torch.as_tensor(effective_lengths).reshape(-1)
        if lengths.numel() == 0:
            raise ValueError("effective_lengths is empty; pass one length per sample of the step")
        cfg = self.config
        boundary = max(cfg.min_len, self._current - cfg.margin)
        num_hits = int((lengths >= boundary).sum().item())
        hit_ratio = num_hits / lengths.numel()
        if hit_ratio >= cfg.hit_ratio:
            self._current = min(self._current + cfg.step, cfg.max_len)
            self._num_misses = 0
        else:
            self._num_misses += 1
            if self._num_misses >= cfg.shrink_patience:
                self._current = max(self._current - cfg.step, cfg.min_len)
                self._num_misses = 0
        metrics = {
            "budget/boundary": float(boundary),
            "budget/hit_ratio": float(hit_ratio),
            "budget/num_misses": float(self._num_misses),
            "budget/length": float(self._current),
        }
        return self._current, metrics

    def state_dict(self) -> dict[str, int]:
        """Plain ints: the current budget and the miss counter."""
        return {"current": self._current, "num_misses": self._num_misses}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`. A budget outside [min_len, max_len] (the config
        changed on resume) is clamped into it."""
        missing = {"current", "num_misses"} - set(state)
        if missing:
            raise ValueError(
                f"budget state is missing {sorted(missing)}; was it saved by this class?"
            )
        cfg = self.config
        self._current = max(cfg.min_len, min(int(state["current"]), cfg.max_len))
        self._num_misses = max(0, int(state["num_misses"]))
