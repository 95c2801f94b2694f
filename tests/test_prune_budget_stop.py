"""Response budget controller and the streaming online stopper."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opd.config.prune import BudgetConfig, PruneConfig
from megatron_opd.prune import (
    CONSECUTIVE,
    DRIFT_BUDGET,
    NOT_STOPPED,
    WEIGHT_ZERO,
    OnlineStopper,
    ResponseBudget,
    reliability_weights,
)
from megatron_opd.prune.weights import WeightRule

SETTINGS = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------- response budget


def test_budget_hand_worked():
    budget = ResponseBudget(
        init_len=1000, min_len=1000, max_len=1300, step=100, margin=50, hit_ratio=0.5,
        shrink_patience=2,
    )  # fmt: skip
    assert budget.current == 1000
    # boundary = max(1000, 950) = 1000; 1 of 2 hits -> 0.5 >= 0.5 -> grow.
    length, metrics = budget.update(torch.tensor([1000, 10]))
    assert length == 1100 and metrics["budget/boundary"] == 1000.0
    assert metrics["budget/hit_ratio"] == 0.5
    # boundary = max(1000, 1050) = 1050; 1 of 4 -> miss 1, unchanged.
    assert budget.update(torch.tensor([1049, 1050, 0, 0]))[0] == 1100
    assert budget.num_misses == 1
    # Second miss in a row -> shrink by step, counter reset.
    assert budget.update(torch.tensor([0]))[0] == 1000 and budget.num_misses == 0
    assert [budget.update(torch.tensor([5000]))[0] for _ in range(4)] == [1100, 1200, 1300, 1300]
    budget.update(torch.tensor([0]))
    assert budget.update(torch.tensor([0]))[0] == 1200
    # Never below min_len.
    low = ResponseBudget(init_len=500, min_len=1000, max_len=2000, shrink_patience=1)
    assert low.current == 1000 and low.update(torch.tensor([0]))[0] == 1000


def _budget_loop(cfg, steps):
    current, misses, out = max(cfg["min_len"], min(cfg["init_len"], cfg["max_len"])), 0, []
    for lengths in steps:
        boundary = max(cfg["min_len"], current - cfg["margin"])
        hits = sum(1 for x in lengths if x >= boundary)
        if hits / len(lengths) >= cfg["hit_ratio"]:
            current, misses = min(current + cfg["step"], cfg["max_len"]), 0
        else:
            misses += 1
            if misses >= cfg["shrink_patience"]:
                current, misses = max(current - cfg["step"], cfg["min_len"]), 0
        out.append(current)
    return out


@SETTINGS
@given(
    st.fixed_dictionaries(
        {
            "init_len": st.integers(1, 60),
            "min_len": st.integers(1, 30),
            "max_len": st.integers(30, 80),
            "step": st.integers(1, 10),
            "margin": st.integers(0, 10),
            "hit_ratio": st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
            "shrink_patience": st.integers(1, 4),
        }
    ),
    st.lists(st.lists(st.integers(0, 90), min_size=1, max_size=8), min_size=1, max_size=12),
    st.integers(0, 11),
)
def test_budget_matches_loop_and_resumes(cfg, steps, cut):
    budget = ResponseBudget(**cfg)
    got = [budget.update(torch.tensor(lengths))[0] for lengths in steps]
    assert got == _budget_loop(cfg, steps)
    # Resume from a state_dict mid-run: same trajectory.
    cut = min(cut, len(steps))
    first = ResponseBudget(**cfg)
    for lengths in steps[:cut]:
        first.update(torch.tensor(lengths))
    resumed = ResponseBudget(**cfg)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(torch.tensor(x))[0] for x in steps[cut:]] == got[cut:]


def test_budget_bad_input():
    with pytest.raises(ValueError, match="budget.min_len"):
        ResponseBudget(min_len=10, max_len=5)
    with pytest.raises(ValueError, match="budget.step"):
        ResponseBudget(step=-1)
    with pytest.raises(ValueError, match="effective_lengths"):
        ResponseBudget().update(torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="missing"):
        ResponseBudget().load_state_dict({"current": 5})
    budget = ResponseBudget.from_config(BudgetConfig())
    assert budget.current == 1024 and budget.config.max_len == 12288


# ---------------------------------------------------------------- online stopper


def test_stopper_hand_worked_weight_zero():
    stopper = OnlineStopper(1, w_drop=0.5, w_base=0.0)
    first = stopper.update(torch.tensor([[False, True]]), torch.tensor([[True, True]]))
    assert first.weights.tolist() == [[1.0, 0.5]] and first.should_stop.tolist() == [False]
    second = stopper.update(torch.tensor([[True, False]]), torch.tensor([[True, True]]))
    assert second.weights.tolist() == [[0.0, 0.0]] and second.should_stop.tolist() == [True]
    assert stopper.stop_reason.tolist() == [WEIGHT_ZERO]
    assert stopper.stop_position.tolist() == [2]
    assert stopper.effective_length.tolist() == [2]
    # Released mode with w_base > 0: the zero-weight tail keeps loss weight w_base, so the
    # released objective trains on it and nothing stops.
    keep = OnlineStopper(1, w_drop=0.5, w_base=0.1)
    out = keep.update(torch.tensor([[True, True, True]]), torch.tensor([[True, True, True]]))
    assert keep.should_stop.tolist() == [False]
    assert out.loss_weights[0].tolist() == pytest.approx([0.6, 0.1, 0.1])


def test_stopper_truncate_mode_cuts_after_the_stop_point():
    # w_drop 0.5: the 2nd drift event (column 2) brings the weight to 0. Truncate keeps
    # the release's w + w_base up to and including that token, then 0.
    stopper = OnlineStopper(1, w_drop=0.5, w_base=0.1, mode="truncate")
    first = stopper.update(torch.tensor([[True, False]]), torch.tensor([[True, True]]))
    assert first.loss_weights[0].tolist() == pytest.approx([0.6, 0.6])
    assert first.should_stop.tolist() == [False]
    second = stopper.update(torch.tensor([[True, False, True]]), torch.ones(1, 3, dtype=torch.bool))
    assert second.weights.tolist() == [[0.0, 0.0, 0.0]]
    assert second.loss_weights[0].tolist() == pytest.approx([0.1, 0.0, 0.0])
    assert second.should_stop.tolist() == [True]
    assert stopper.stop_reason.tolist() == [WEIGHT_ZERO] and stopper.stop_position.tolist() == [2]
    # A drift budget stops before the weight reaches 0; later tokens get w = lw = 0.
    budget = OnlineStopper(1, w_drop=0.1, w_base=0.5, mode="truncate", drift_budget=2)
    out = budget.update(
        torch.tensor([[True, True, False, True]]), torch.ones(1, 4, dtype=torch.bool)
    )
    assert out.weights[0].tolist() == pytest.approx([0.9, 0.8, 0.0, 0.0])
    assert out.loss_weights[0].tolist() == pytest.approx([1.4, 1.3, 0.0, 0.0])
    assert budget.stop_reason.tolist() == [DRIFT_BUDGET] and budget.effective_length.tolist() == [2]


def test_stop_rules_need_truncate_mode():
    with pytest.raises(ValueError, match="prune.mode=truncate"):
        OnlineStopper(1, w_drop=0.1, w_base=0.5, drift_budget=3)
    with pytest.raises(ValueError, match="prune.mode=truncate"):
        PruneConfig(max_consecutive_bad=2)
    with pytest.raises(ValueError, match="prune.mode"):
        PruneConfig(mode="prune")


def test_stopper_hand_worked_consecutive_and_budget():
    valid2 = torch.tensor([[True, True]])
    stopper = OnlineStopper(3, w_drop=0.1, w_base=0.5, mode="truncate", max_consecutive_bad=2)
    # Row 0: bad, pad | bad -> run of 2 (padding neither counts nor resets).
    # Row 1: bad, good | bad -> runs of 1.  Row 2: good, bad | bad -> run of 2.
    stopper.update(
        torch.tensor([[True, True], [True, False], [False, True]]),
        torch.tensor([[True, False], [True, True], [True, True]]),
    )
    assert stopper.should_stop.tolist() == [False, False, False]
    out = stopper.update(torch.tensor([[True], [True], [True]]), torch.ones(3, 1, dtype=torch.bool))
    assert out.should_stop.tolist() == [True, False, True]
    assert stopper.stop_reason.tolist() == [CONSECUTIVE, NOT_STOPPED, CONSECUTIVE]
    assert stopper.consecutive_bad.tolist() == [2, 1, 2]

    budget = OnlineStopper(2, w_drop=0.1, w_base=0.5, mode="truncate", drift_budget=3)
    budget.update(
        torch.tensor([[True, False, True, True]]), valid2[:, :1].expand(1, 4), torch.tensor([1])
    )
    assert budget.should_stop.tolist() == [False, True]
    assert budget.stop_reason.tolist() == [NOT_STOPPED, DRIFT_BUDGET]
    assert budget.should_stop_rows(torch.tensor([1, 0])).tolist() == [True, False]


def _reference(bad, valid, w_drop, w_base, mode, drift_budget, max_run, eps=1e-8):
    """Per-token weights, loss weights, and the stop column of one sample, by a plain loop."""
    count = run = 0
    stopped, stop_at = False, -1
    weights, loss_weights = [], []
    for t, (is_bad, is_valid) in enumerate(zip(bad, valid)):
        if not is_valid:
            weights.append(0.0)
            loss_weights.append(0.0)
            continue
        if is_bad:
            count, run = count + 1, run + 1
        else:
            run = 0
        w = min(max(1.0 - w_drop * count, 0.0), 1.0)
        if mode == "truncate" and stopped:
            weights.append(0.0)
            loss_weights.append(0.0)
            continue
        weights.append(w)
        loss_weights.append(w + w_base)
        weight_rule = w_drop > 0 and (mode == "truncate" or w_base == 0)
        if not stopped and (
            (weight_rule and w <= eps)
            or (drift_budget is not None and count >= drift_budget)
            or (max_run is not None and run >= max_run)
        ):
            stopped, stop_at = True, t
    return weights, loss_weights, stop_at


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(1, 14),
    st.lists(st.integers(1, 5), min_size=1, max_size=8),
    st.sampled_from([0.0, 0.25, 0.3, 1.0]),
    st.sampled_from([0.0, 0.5]),
    st.sampled_from(["released", "truncate"]),
    st.sampled_from([None, 2, 4]),
    st.sampled_from([None, 1, 3]),
    st.integers(0, 2**31 - 1),
)
def test_streaming_equals_batch_and_loop(
    b, s, widths, w_drop, w_base, mode, drift_budget, max_run, seed
):
    if mode == "released":
        drift_budget = max_run = None
    gen = torch.Generator().manual_seed(seed)
    bad = torch.rand(b, s, generator=gen) > 0.5
    valid = torch.rand(b, s, generator=gen) > 0.2
    # Sample i leaves the running batch after its own random number of columns.
    leave_at = torch.randint(1, s + 1, (b,), generator=gen).tolist()
    stopper = OnlineStopper(
        b, w_drop=w_drop, w_base=w_base, mode=mode, drift_budget=drift_budget,
        max_consecutive_bad=max_run,
    )  # fmt: skip
    rule = WeightRule(
        w_drop=w_drop, w_base=w_base, mode=mode, drift_budget=drift_budget,
        max_consecutive_bad=max_run,
    )  # fmt: skip
    pieces = [[] for _ in range(b)]
    start, chunk = 0, 0
    while start < s:
        width = min(widths[chunk % len(widths)], s - start)
        rows = [i for i in range(b) if leave_at[i] > start]
        order = torch.randperm(len(rows), generator=gen).tolist()  # any row order
        rows = [rows[j] for j in order]
        if rows:
            index = torch.tensor(rows)
            out = stopper.update(
                bad[index, start : start + width], valid[index, start : start + width], index
            )
            for r, sample in enumerate(rows):
                pieces[sample].append(out.weights[r])
                seen = slice(0, start + width)
                _, _, stop_at = _reference(
                    bad[sample, seen].tolist(), valid[sample, seen].tolist(),
                    w_drop, w_base, mode, drift_budget, max_run,
                )  # fmt: skip
                assert out.should_stop[r].item() == (stop_at >= 0)
        start += width
        chunk += 1
    result = stopper.result()
    for i in range(b):
        length = sum(p.numel() for p in pieces[i])
        w, lw, stop_at = _reference(
            bad[i, :length].tolist(), valid[i, :length].tolist(),
            w_drop, w_base, mode, drift_budget, max_run,
        )  # fmt: skip
        batch = reliability_weights(bad[i : i + 1, :length], valid[i : i + 1, :length], rule=rule)
        assert batch.weights[0].tolist() == pytest.approx(w, abs=1e-6)
        assert batch.loss_weights[0].tolist() == pytest.approx(lw, abs=1e-6)
        assert batch.stop_position[0].item() == stop_at == result.stop_position[i].item()
        # Streaming equals the whole-sequence form bitwise.
        assert torch.equal(torch.cat(pieces[i]), batch.weights[0])
        assert torch.equal(result.weights[i, :length], batch.weights[0])
        assert torch.equal(result.loss_weights[i, :length], batch.loss_weights[0])
        assert not result.weights[i, length:].any()
        assert result.effective_length[i].item() == batch.effective_length[0].item()
        assert result.num_bad_events[i].item() == batch.num_bad_events[0].item()


def test_stopper_bad_input():
    stopper = OnlineStopper.from_config(2, PruneConfig())
    ones = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="sample_index"):
        stopper.update(ones, ones, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="sample_index"):
        stopper.update(ones, ones, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="valid_mask"):
        stopper.update(ones, ones[:, :2])
    with pytest.raises(ValueError, match="sample_index"):
        stopper.update(ones[:1], ones[:1])
    with pytest.raises(ValueError, match="prune.w_drop"):
        OnlineStopper(2, w_drop=-1.0, w_base=0.0)


@SETTINGS
@given(
    st.integers(1, 4),
    st.integers(0, 12),
    st.integers(0, 9),
    st.sampled_from([0.0, 0.1, 0.25, 0.3, 1.0]),
    st.sampled_from([0.0, 0.5]),
    st.sampled_from(["released", "truncate"]),
    st.sampled_from([None, 2, 5]),
    st.sampled_from([None, 1, 3]),
    st.integers(0, 2**31 - 1),
)
def test_could_stop_within_equals_feeding_all_drift_columns(
    b, fed, tokens, w_drop, w_base, mode, drift_budget, max_run, seed
):
    """The stop rules at the last of ``tokens`` worst-case columns give the same verdict
    as feeding ``tokens`` valid drift events after the state so far (a copy of the
    stopper, so the one under test is untouched)."""
    import copy

    if mode == "released":
        drift_budget = max_run = None
    gen = torch.Generator().manual_seed(seed)
    stopper = OnlineStopper(
        b, w_drop=w_drop, w_base=w_base, mode=mode, drift_budget=drift_budget,
        max_consecutive_bad=max_run,
    )  # fmt: skip
    if fed:
        bad = torch.rand(b, fed, generator=gen) > 0.6
        stopper.update(bad, torch.rand(b, fed, generator=gen) > 0.1)
    rows = torch.randperm(b, generator=gen)[: int(torch.randint(1, b + 1, (1,), generator=gen))]
    expected = False
    if tokens:
        fed_worst = copy.deepcopy(stopper)
        worst = torch.ones(rows.numel(), tokens, dtype=torch.bool)
        before = fed_worst.should_stop[rows].clone()
        fed_worst.update(worst, worst, rows)
        expected = bool((fed_worst.should_stop[rows] & ~before).any())
    assert stopper.could_stop_within(tokens, rows) == expected
