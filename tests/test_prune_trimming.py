"""Trimming plan (kept lengths, packing, encoding, scatter back) and step metrics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opd.prune import TrimPlan, kept_lengths, plan_trimming, prune_metrics

SETTINGS = settings(max_examples=50, deadline=None)

HAND_WEIGHTS = torch.tensor(
    [
        [0, 0, 1, 0.5, 0, 0],  # last non-zero at 3 -> keep 4
        [0, 0, 0, 0, 0, 0],  # dropped
        [0, 1, 1, 1, 1, 1],  # keep 6
        [0, 2, 0, 0, 0, 0],  # keep 2
        [0, 0, 0, 1, 0, 0],  # keep 4
    ]
)


def _layout(plan):
    return [(mb.rows, mb.lengths, mb.padded_length) for mb in plan.micro_batches]


def test_plan_hand_worked():
    assert kept_lengths(HAND_WEIGHTS).tolist() == [4, 0, 6, 2, 4]
    # Longest first: 2 (6), 0 (4), 4 (4), 3 (2); 8 tokens per micro-batch.
    plan = plan_trimming(HAND_WEIGHTS, max_tokens=8)
    assert _layout(plan) == [([2], [6], 6), ([0, 4], [4, 4], 4), ([3], [2], 2)]
    assert plan.num_kept_tokens == 16 and plan.max_padded_length == 6
    # Padding to a multiple of 4 (capped at s = 6).
    plan = plan_trimming(HAND_WEIGHTS, max_tokens=8, pad_to_multiple=4)
    assert _layout(plan) == [([2], [6], 6), ([0, 4], [4, 4], 4), ([3], [2], 4)]
    # Only a row cap.
    plan = plan_trimming(HAND_WEIGHTS, max_rows=2)
    assert _layout(plan) == [([2, 0], [6, 4], 6), ([4, 3], [4, 2], 4)]
    # A row longer than the token budget gets its own micro-batch.
    plan = plan_trimming(HAND_WEIGHTS, max_tokens=3)
    assert [mb.rows for mb in plan.micro_batches] == [[2], [0], [4], [3]]
    # trim=False keeps whole rows but still drops rows without loss weight.
    plan = plan_trimming(HAND_WEIGHTS, max_rows=4, trim=False)
    assert _layout(plan) == [([0, 2, 3, 4], [6, 6, 6, 6], 6)]


def test_pack_and_scatter_back_hand_worked():
    tokens = torch.arange(30).view(5, 6)
    plan = plan_trimming(HAND_WEIGHTS, max_tokens=8)
    pieces = plan.pack(tokens, pad_value=-1)
    assert pieces[0].tolist() == [[12, 13, 14, 15, 16, 17]]
    assert pieces[1].tolist() == [[0, 1, 2, 3], [24, 25, 26, 27]]
    assert pieces[2].tolist() == [[18, 19]]
    back = plan.scatter_back([p * 10 for p in pieces], fill_value=0)
    expected = torch.zeros(5, 6, dtype=torch.int64)
    expected[0, :4] = tokens[0, :4] * 10
    expected[2] = tokens[2] * 10
    expected[3, :2] = tokens[3, :2] * 10
    expected[4, :4] = tokens[4, :4] * 10
    assert torch.equal(back, expected)


weight_matrices = st.integers(1, 6).flatmap(
    lambda b: st.integers(1, 10).flatmap(
        lambda s: st.lists(
            st.lists(st.sampled_from([0.0, 0.0, 0.5, 1.0]), min_size=s, max_size=s),
            min_size=b,
            max_size=b,
        )
    )
)


@SETTINGS
@given(
    weight_matrices,
    st.one_of(st.none(), st.integers(1, 30)),
    st.one_of(st.none(), st.integers(1, 4)),
    st.integers(1, 4),
)
def test_plan_covers_every_kept_token_once(rows, max_tokens, max_rows, multiple):
    weights = torch.tensor(rows)
    b, s = weights.shape
    plan = plan_trimming(
        weights, max_tokens=max_tokens, max_rows=max_rows, pad_to_multiple=multiple
    )
    # Reference kept length: loop for the last non-zero entry.
    for i in range(b):
        last = max((t for t in range(s) if rows[i][t] != 0), default=-1)
        assert plan.kept_lengths[i].item() == last + 1
    # Every kept (row, position) appears exactly once across the packed micro-batches.
    ids = torch.arange(1, b * s + 1).view(b, s)
    seen = (
        torch.cat([p.reshape(-1) for p in plan.pack(ids, pad_value=0)])
        if plan.micro_batches
        else torch.zeros(0)
    )
    seen = seen[seen > 0]
    expected = [i * s + t + 1 for i in range(b) for t in range(int(plan.kept_lengths[i]))]
    assert sorted(seen.tolist()) == expected
    for mb in plan.micro_batches:
        assert mb.padded_length >= max(mb.lengths) and mb.padded_length <= s
        assert max_rows is None or len(mb.rows) <= max_rows
        assert (
            max_tokens is None or len(mb.rows) == 1 or len(mb.rows) * mb.padded_length <= max_tokens
        )
    # Round trips: encoding, and pack -> scatter_back.
    again = TrimPlan.from_tensor(plan.to_tensor())
    assert _layout(again) == _layout(plan) and torch.equal(again.kept_lengths, plan.kept_lengths)
    if plan.micro_batches:
        values = torch.randn(b, s, 3)
        back = plan.scatter_back(plan.pack(values))
        keep = torch.arange(s)[None, :] < plan.kept_lengths[:, None]
        assert torch.equal(back, torch.where(keep[..., None], values, 0.0))


def test_plan_bad_input():
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        plan_trimming(HAND_WEIGHTS, max_tokens=0)
    with pytest.raises(ValueError, match="max_micro_batch_rows"):
        plan_trimming(HAND_WEIGHTS, max_rows=0)
    with pytest.raises(ValueError, match="loss_weights"):
        plan_trimming(torch.ones(6))
    with pytest.raises(ValueError, match="magic"):
        TrimPlan.from_tensor(torch.tensor([1, 2, 3, 4]))
    plan = plan_trimming(HAND_WEIGHTS, max_tokens=8)
    with pytest.raises(ValueError, match="micro-batches"):
        plan.scatter_back([torch.zeros(1, 6)])
    with pytest.raises(ValueError, match="plan is for"):
        plan.pack(torch.zeros(5, 7))


def test_prune_metrics_hand_worked():
    valid = torch.tensor([[False, True, True, True, True], [False, True, True, False, False]])
    bad = torch.tensor([[False, True, False, True, False], [True, False, True, False, True]])
    weights = torch.tensor([[0, 0.5, 0.5, 0, 0], [0, 1.0, 0.5, 0, 0]])
    overlap = torch.tensor([[0.0, 0.5, 1.0, 0.5, 1.0], [0.0, 1.0, 0.5, 0.0, 0.0]])
    metrics = prune_metrics(
        valid_mask=valid,
        bad_events=bad,
        weights=weights,
        effective_lengths=torch.tensor([2, 2]),
        overlap_ratio=overlap,
        budget=1024,
        kept_lengths=torch.tensor([3, 0]),
    )
    # 6 response tokens; bad on valid: (0,1), (0,3), (1,2) -> 3.
    assert metrics["prune/bad_event_rate"] == pytest.approx(3 / 6)
    assert metrics["prune/mean_weight"] == pytest.approx(2.5 / 6)
    assert metrics["prune/overlap_ratio"] == pytest.approx(4.5 / 6)
    assert metrics["prune/effective_length_mean"] == 2.0
    assert metrics["prune/effective_length_p50"] == 2.0
    assert metrics["prune/budget"] == 1024.0
    # Trimmed response tokens: row 0 positions 3, 4; row 1 positions 1, 2 -> 4 of 6.
    assert metrics["prune/trimmed_fraction"] == pytest.approx(4 / 6)
    lengths = prune_metrics(
        valid_mask=valid, bad_events=bad, weights=weights, effective_lengths=torch.arange(11)
    )
    assert lengths["prune/effective_length_p90"] == pytest.approx(9.0)
