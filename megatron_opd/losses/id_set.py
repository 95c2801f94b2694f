"""Which vocabulary ids a top-K OPD loss runs over at each position.

``S`` is the student's top-K, ``T`` the teacher's top-K (``[b, s, K]`` each):

- ``only_stu``: S (the release's default);
- ``only_tch``: T;
- ``intersection``: S, masked to the ids also in T (the set may be empty);
- ``union``: S followed by T, with T's ids already in S masked out (2K slots).

Masked slots still hold real vocabulary ids, so log-probs can be gathered at every slot
and the mask applied afterwards.
"""

from __future__ import annotations

import torch

ID_SET_MODES = ("only_stu", "only_tch", "intersection", "union")


def _membership(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``[b, s, k]`` bool: ``ids[..., j]`` is one of ``other[..., :]``."""
    ids = ids.to(other.dtype)
    sorted_other = other.sort(dim=-1).values.contiguous()
    position = torch.searchsorted(sorted_other, ids.contiguous())
    return sorted_other.gather(-1, position.clamp(max=other.shape[-1] - 1)) == ids


def build_id_set(
    student_topk_ids: torch.Tensor, teacher_topk_ids: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [b, s, m], id_mask [b, s, m])`` for ``mode`` (``loss.id_set``); m = K, or
    2K for ``union``."""
    if student_topk_ids.shape != teacher_topk_ids.shape or student_topk_ids.dim() != 3:
        raise ValueError(
            f"student_topk_ids {tuple(student_topk_ids.shape)} and teacher_topk_ids "
            f"{tuple(teacher_topk_ids.shape)} must both be [b, s, K]"
        )
    if mode == "only_stu":
        return student_topk_ids, torch.ones_like(student_topk_ids, dtype=torch.bool)
    if mode == "only_tch":
        return teacher_topk_ids, torch.ones_like(teacher_topk_ids, dtype=torch.bool)
    if mode == "intersection":
        return student_topk_ids, _membership(student_topk_ids, teacher_topk_ids)
    if mode == "union":
        teacher_new = ~_membership(teacher_topk_ids, student_topk_ids)
        ids = torch.cat([student_topk_ids, teacher_topk_ids], dim=-1)
        mask = torch.cat([torch.ones_like(teacher_new), teacher_new], dim=-1)
        return ids, mask
    raise ValueError(f"loss.id_set must be one of {list(ID_SET_MODES)}, got {mode!r}")
