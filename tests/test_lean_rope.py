"""The lean decoder's RoPE (roll with a signed sine) against Megatron's negate-and-concatenate.

:meth:`LeanDecoder._rope` computes ``x * cos + roll(x, rot / 2) * sin_signed``; Megatron's
non-interleaved rotation is ``x * cos + cat(-x2, x1) * sin``. With the sine's first half
negated the two are equal bit for bit (``(-a) * b == -(a * b)``), which the decode
numerics documented in README / docs rely on. Checked on Megatron's own rotary table, in
float32 and bfloat16, with full and partial rotary dimensions.
"""

from __future__ import annotations

import pytest
import torch


def _megatron_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int):
    head, tail = x[..., :rot], x[..., rot:]
    first, second = head.chunk(2, dim=-1)
    rotated = head * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat([rotated, tail], dim=-1)


def _compare(dtype_name: str, rotary_percent: float) -> bool:
    """In a worker (CPU compatibility layer on): ours == Megatron's on its own table."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_opd.rollout.lean_decoder import LeanDecoder

    dtype = getattr(torch, dtype_name)
    head_dim, positions = 64, 50
    table = RotaryEmbedding(
        kv_channels=head_dim, rotary_percent=rotary_percent, use_cpu_initialization=True
    )
    freqs = table(positions)[:, 0, 0].float()  # [positions, rot], Megatron's own angles
    rot = freqs.shape[-1]
    decoder = LeanDecoder.__new__(LeanDecoder)  # _rope reads only ``rot``
    decoder.rot = rot
    sin_signed = freqs.sin()
    sin_signed[:, : rot // 2].neg_()
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, positions, 2, 5, head_dim, generator=generator) * 4).to(dtype)
    cos = freqs.cos().to(dtype)[None, :, None, None]  # [1, s, 1, 1, rot]
    ours = decoder._rope(x, cos, sin_signed.to(dtype)[None, :, None, None])
    reference = _megatron_rope(x, cos, freqs.sin().to(dtype)[None, :, None, None], rot)
    return rot < head_dim if rotary_percent < 1 else rot == head_dim, torch.equal(ours, reference)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_roll_rope_equals_negate_and_concatenate(dtype, rotary_percent):
    from megatron_opd.testing.multiprocess import run_distributed

    ((table_as_asked, equal),) = run_distributed(_compare, 1, dtype, rotary_percent)
    assert table_as_asked and equal
