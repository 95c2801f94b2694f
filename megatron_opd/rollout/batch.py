"""The rollout batch: the one record every stage of a step reads and writes.

Layout (the only place shapes are defined):

- ``b`` samples, each ``tokens[i] = prompt_i + response_i``, right-padded with ``pad_id``
  to a common length ``s``. The prompt starts at column 0.
- Every per-token tensor ``[b, s]`` or ``[b, s, k]`` is aligned with ``tokens``: entry
  ``t`` is about *predicting* ``tokens[:, t]`` from ``tokens[:, :t]`` (so it comes from the
  logits at position ``t - 1``). Entries outside the response are 0 / unused.
- Response positions of sample ``i`` are ``[prompt_lengths[i], prompt_lengths[i] +
  response_lengths[i])``; :meth:`RolloutBatch.response_mask` gives them as a bool mask.

Stages fill fields in order: ROLLOUT (tokens, lengths, sampled_log_probs), SCORE
(top-K tensors, overlap_ratio), PRUNE (weights, loss_weights, effective_lengths).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class RolloutBatch:
    """Prompts, sampled responses, and everything computed about them in one step."""

    tokens: torch.Tensor
    """``[b, s]`` int64: prompt then response, right-padded with ``pad_id``."""

    prompt_lengths: torch.Tensor
    """``[b]`` int64: prompt tokens of each sample."""

    response_lengths: torch.Tensor
    """``[b]`` int64: generated tokens of each sample (including a final EOS)."""

    pad_id: int = 0
    """Padding id used right of each sequence."""

    sampled_log_probs: torch.Tensor | None = None
    """``[b, s]`` float32: log-prob of ``tokens[:, t]`` under the rollout (student) policy
    at sampling temperature 1 (the behaviour policy of the PPO ratio)."""

    prompt_index: torch.Tensor | None = None
    """``[b]`` int64: index of each sample's prompt in the dataset (groups of n samples)."""

    answers: list[str] | None = None
    """Reference answer of each sample's prompt (for accuracy metrics), or None."""

    student_topk_ids: torch.Tensor | None = None
    """``[b, s, k]`` int64: the student's top-K vocabulary ids at each position."""

    student_topk_log_probs: torch.Tensor | None = None
    """``[b, s, k]`` float32: the student's log-probs at ``student_topk_ids``."""

    student_sampled_log_probs: torch.Tensor | None = None
    """``[b, s]`` float32: the scoring pass's (eval-mode, no KV cache) student log-prob of
    ``tokens[:, t]`` at temperature 1; equals ``sampled_log_probs`` up to float error."""

    teacher_topk_ids: torch.Tensor | None = None
    """``[b, s, k]`` int64: the teacher's top-K ids."""

    teacher_topk_log_probs: torch.Tensor | None = None
    """``[b, s, k]`` float32: the teacher's log-probs at ``teacher_topk_ids``."""

    teacher_log_probs_at_student_ids: torch.Tensor | None = None
    """``[b, s, k]`` float32: the teacher's log-probs at ``student_topk_ids``."""

    student_log_probs_at_teacher_ids: torch.Tensor | None = None
    """``[b, s, k]`` float32: the scoring pass's student log-probs at ``teacher_topk_ids``
    (the PPO "old" log-probs of the teacher-side id sets when a step makes several
    updates)."""

    teacher_sampled_log_probs: torch.Tensor | None = None
    """``[b, s]`` float32: the teacher's log-prob of the sampled token ``tokens[:, t]``."""

    overlap_ratio: torch.Tensor | None = None
    """``[b, s]`` float32: |S_t ∩ T_t| / K on response positions."""

    weights: torch.Tensor | None = None
    """``[b, s]`` float32: monotone reliability weights in [0, 1] (0 off the response)."""

    loss_weights: torch.Tensor | None = None
    """``[b, s]`` float32: ``weights + w_base`` on response positions, 0 elsewhere."""

    effective_lengths: torch.Tensor | None = None
    """``[b]`` int64: response tokens with weight > 1e-8 (the reliable prefix)."""

    extras: dict = field(default_factory=dict)
    """Engine- or loss-specific tensors keyed by name (documented where they are set)."""

    @property
    def batch_size(self) -> int:
        """Number of samples ``b``."""
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        """Padded length ``s``."""
        return self.tokens.shape[1]

    def response_mask(self) -> torch.Tensor:
        """``[b, s]`` bool: True on response positions."""
        positions = torch.arange(self.seq_length, device=self.tokens.device)[None, :]
        start = self.prompt_lengths[:, None]
        return (positions >= start) & (positions < start + self.response_lengths[:, None])

    def total_lengths(self) -> torch.Tensor:
        """``[b]`` prompt + response length of each sample."""
        return self.prompt_lengths + self.response_lengths

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """A new batch with only ``rows`` (index tensor) of every per-sample field."""
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[rows]
            elif f.name == "answers" and value is not None:
                value = [value[i] for i in rows.tolist()]
            elif f.name == "extras":
                value = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in value.items()}
            values[f.name] = value
        return RolloutBatch(**values)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """Move every tensor field to ``device``."""
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device)
            elif f.name == "extras":
                value = {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()
                }
            values[f.name] = value
        return RolloutBatch(**values)
