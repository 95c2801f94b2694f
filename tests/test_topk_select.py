"""Exact top-K on wide rows (block-pruned ``torch.topk``) against a stable sort of the row.

:func:`~megatron_opd.ops.topk_select.topk_by_blocks` reads only the column blocks with the
largest maxima; these cases are built so that the pruned read, its per-row fallback (block
maxima tied at every boundary) and the narrow-row path all run, and the answer must
equal ``torch.sort(stable=True)`` of the whole row (value descending, lower id first).
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.ops import topk_select
from megatron_opd.ops.topk_select import (
    PRUNE_BLOCK,
    PRUNE_SLACK,
    exact_topk,
    local_topk,
    topk_by_blocks,
)

WIDTH = 75_968 + 37  # a Qwen TP=2 shard plus a partial last block


@pytest.fixture
def topk_calls(monkeypatch) -> list:
    """Shapes of the tensors ``torch.topk`` is called on inside topk_select (recorded)."""
    calls = []
    real_topk = torch.topk
    monkeypatch.setattr(
        topk_select.torch,
        "topk",
        lambda t, *a, **kw: calls.append(t.shape) or real_topk(t, *a, **kw),
    )
    return calls


def _rows(kind: str, rows: int = 12, width: int = WIDTH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(len(kind))
    x = torch.randn(rows, width, generator=generator) * 3
    if kind == "bf16":  # 8 bits of mantissa: ties at the K-th value and between block maxima
        return x.to(torch.bfloat16)
    if kind == "grid":  # integers: every boundary is a tie
        return x.round()
    if kind == "clustered":  # the winners crowd into a few blocks, one in the overhang
        x[:, 3 * PRUNE_BLOCK : 3 * PRUNE_BLOCK + 40] += 20.0
        x[:, -5:] += 21.0
        x[0, 7] = float("nan")
        return x
    if kind == "masked":  # mostly -inf; row 0 has fewer finite values than k
        keep = torch.rand(rows, width, generator=generator) < 0.001
        x = x.masked_fill(~keep, float("-inf"))
        x[0] = float("-inf")
        x[0, [5, 900, WIDTH - 1]] = 1.0
        return x
    return x


def _reference(x: torch.Tensor, k: int):
    ref = torch.sort(x.float(), dim=-1, descending=True, stable=True)
    return ref.values[:, :k], ref.indices[:, :k]


@pytest.mark.parametrize("kind", ["normal", "bf16", "grid", "clustered", "masked"])
@pytest.mark.parametrize("k", [1, 16, 64])
def test_exact_topk_on_wide_rows_equals_a_stable_sort(kind, k):
    x = _rows(kind)
    if kind == "clustered":
        x = x[1:]  # NaN: see test_nan_ranks_first_as_in_torch_topk
    values, ids = exact_topk(x, k)
    ref_values, ref_ids = _reference(x, k)
    assert torch.equal(ids, ref_ids)
    assert torch.equal(values.float(), ref_values)


def test_local_topk_on_a_strided_view_with_an_offset():
    x = _rows("grid", width=WIDTH + 300)[:, 100 : 100 + WIDTH]  # rows not contiguous
    values, ids = local_topk(x, 16, 5_000, 10**6)
    order = torch.sort(values * 10**7 - ids, dim=-1, descending=True).indices
    ref_values, ref_ids = _reference(x, 16)
    assert torch.equal(ids.gather(1, order), ref_ids + 5_000)
    assert torch.equal(values.gather(1, order), ref_values)


@pytest.mark.parametrize("kind", ["normal", "bf16", "grid", "clustered", "masked"])
def test_topk_by_blocks_returns_torch_topk_values(kind, topk_calls):
    x = _rows(kind)
    values, cols = topk_by_blocks(x, 17)
    widths = list(topk_calls)
    ref = torch.topk(x, 17, dim=-1)
    assert torch.equal(values.isnan(), ref.values.isnan())
    assert torch.equal(values.nan_to_num(), ref.values.nan_to_num())
    assert torch.equal(x.gather(1, cols).nan_to_num(), values.nan_to_num())
    # The pruned read ran (17 + PRUNE_SLACK blocks of PRUNE_BLOCK); whole rows only for unsure rows.
    assert (x.shape[0], (17 + PRUNE_SLACK) * PRUNE_BLOCK) in widths
    whole = [w for w in widths if w[1] == WIDTH]
    if kind in ("normal", "bf16", "clustered"):
        assert not whole, "no row should need the whole-row top-K"
    else:  # integers tie at every block boundary; a row with 3 finite values
        assert whole and whole[0][0] < x.shape[0], "only the unsure rows fall back"


def test_nan_ranks_first_as_in_torch_topk():
    x = _rows("clustered")
    values, cols = topk_by_blocks(x, 5)
    ref = torch.topk(x, 5, dim=-1)
    assert values[0].isnan().any() and torch.equal(values[0].isnan(), ref.values[0].isnan())
    assert torch.equal(values[1:], ref.values[1:])


def test_narrow_rows_use_torch_topk_directly(topk_calls):
    x = _rows("normal", width=4 * (17 + PRUNE_SLACK) * PRUNE_BLOCK - 1)
    values, _ = topk_by_blocks(x, 17)
    assert topk_calls == [x.shape]
    assert torch.equal(values, torch.topk(x, 17, dim=-1).values)


def test_tensors_off_the_cpu_use_torch_topk_directly(topk_calls):
    x = torch.empty(4, WIDTH, device="meta")  # stands in for CUDA: no data, shapes only
    values, cols = topk_by_blocks(x, 17)
    assert topk_calls == [x.shape] and values.shape == cols.shape == (4, 17)
