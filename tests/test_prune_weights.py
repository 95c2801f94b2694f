"""Compatibility signals, drift events, reliability weights and the prune config.

References are hand-worked cases and plain-python loops, never the code's own output.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opd.config.prune import BudgetConfig, LossConfig, PruneConfig
from megatron_opd.prune import (
    drift_events,
    overlap_ratio,
    reliability_weights,
    teacher_top_p_accept,
    teacher_top_p_bad_events,
)

SETTINGS = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------- overlap ratio


def test_overlap_ratio_hand_worked():
    student = torch.tensor([[[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]]])
    teacher = torch.tensor([[[4, 9, 1, 7], [8, 7, 6, 5], [1, 2, 3, 4]]])
    valid = torch.tensor([[True, True, False]])
    ratio, mask = overlap_ratio(student, teacher, valid)
    assert ratio.tolist() == [[0.5, 1.0, 0.0]]
    assert mask.tolist() == [
        [[True, False, False, True], [True, True, True, True], [False, False, False, False]]
    ]


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_overlap_ratio_matches_set_loop(b, s, k, seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = k + 4
    student = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(b * s)])
    teacher = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(b * s)])
    student, teacher = student.view(b, s, k), teacher.view(b, s, k)
    valid = torch.rand(b, s, generator=gen) > 0.3
    ratio, mask = overlap_ratio(student, teacher, valid)
    for i in range(b):
        for t in range(s):
            tset = set(teacher[i, t].tolist())
            expected = [bool(valid[i, t]) and x in tset for x in student[i, t].tolist()]
            assert mask[i, t].tolist() == expected
            assert ratio[i, t].item() == pytest.approx(sum(expected) / k)


# ---------------------------------------------------------------- teacher top-p accept


def test_top_p_accept_hand_worked():
    ids = torch.tensor([[[10, 11, 12, 13]]])
    log_probs = torch.tensor([[[0.1, 0.6, 0.25, 0.05]]]).log()
    # Sorted: 11 (0.6), 12 (0.85 cumulative >= 0.7): accept {11, 12}.
    for sampled, expected in ((12, True), (11, True), (10, False), (13, False), (99, False)):
        got = teacher_top_p_accept(torch.tensor([[sampled]]), ids, log_probs, 0.7)
        assert got.tolist() == [[expected]], sampled
    # p = 0.5: the first id alone reaches it.
    assert teacher_top_p_accept(torch.tensor([[12]]), ids, log_probs, 0.5).tolist() == [[False]]
    assert teacher_top_p_accept(torch.tensor([[11]]), ids, log_probs, 0.5).tolist() == [[True]]
    # Top-K mass 0.9 never reaches p = 1: all K accepted.
    short = torch.tensor([[[0.5, 0.3, 0.1]]]).log()
    ids3 = torch.tensor([[[1, 2, 3]]])
    assert teacher_top_p_accept(torch.tensor([[3]]), ids3, short, 1.0).tolist() == [[True]]
    assert teacher_top_p_accept(torch.tensor([[4]]), ids3, short, 1.0).tolist() == [[False]]


def test_top_p_bad_events_only_on_valid_tokens():
    ids = torch.tensor([[[1, 2], [1, 2]]])
    log_probs = torch.tensor([[[0.9, 0.05], [0.9, 0.05]]]).log()
    sampled = torch.tensor([[2, 2]])
    bad = teacher_top_p_bad_events(sampled, ids, log_probs, 0.8, torch.tensor([[True, False]]))
    assert bad.tolist() == [[True, False]]


@SETTINGS
@given(st.integers(1, 6), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_top_p_accept_matches_loop(k, p, seed):
    gen = torch.Generator().manual_seed(seed)
    b, s = 2, 3
    ids = torch.stack([torch.randperm(k + 3, generator=gen)[:k] for _ in range(b * s)]).view(
        b, s, k
    )
    probs = torch.rand(b, s, k + 1, generator=gen, dtype=torch.float64).softmax(-1)[..., :k]
    sampled = torch.randint(0, k + 3, (b, s), generator=gen)
    got = teacher_top_p_accept(sampled, ids, probs.log(), p)
    for i in range(b):
        for t in range(s):
            pairs = sorted(zip(probs[i, t].tolist(), ids[i, t].tolist()), reverse=True)
            accepted, total = [], 0.0
            for prob, token in pairs:
                accepted.append(token)
                total += prob
                if total >= p:
                    break
            if abs(total - p) < 1e-5:  # float32 cumsum may land either side of p
                continue
            assert got[i, t].item() == (sampled[i, t].item() in accepted)


def test_drift_events_dispatch():
    student = torch.tensor([[[1, 2], [3, 4]]])
    teacher = torch.tensor([[[1, 9], [3, 4]]])
    valid = torch.tensor([[True, True]])
    bad, ratio = drift_events(
        metric="overlap",
        threshold=0.7,
        valid_mask=valid,
        student_topk_ids=student,
        teacher_topk_ids=teacher,
    )
    assert bad.tolist() == [[True, False]] and ratio.tolist() == [[0.5, 1.0]]
    with pytest.raises(ValueError, match="sampled_ids"):
        drift_events(metric="teacher_top_p_accept", threshold=0.7, valid_mask=valid)
    with pytest.raises(ValueError, match="prune.metric"):
        drift_events(metric="entropy", threshold=0.7, valid_mask=valid)


# ---------------------------------------------------------------- reliability weights


def test_reliability_weights_hand_worked():
    bad = torch.tensor([[0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    valid = torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # prompt, 4 tokens, pad
    out = reliability_weights(bad, valid, w_drop=0.4, w_base=0.5)
    assert out.weights[0].tolist() == pytest.approx([0, 0.6, 0.6, 0.2, 0, 0], abs=1e-6)
    assert out.loss_weights[0].tolist() == pytest.approx([0, 1.1, 1.1, 0.7, 0.5, 0], abs=1e-6)
    assert out.effective_length.tolist() == [3]
    assert out.num_bad_events.tolist() == [3]  # the bad event on padding does not count


def _weights_loop(bad, valid, w_drop, w_base, eps=1e-8):
    weights, loss_weights, eff = [], [], 0
    count = 0
    for is_bad, is_valid in zip(bad, valid):
        if not is_valid:
            weights.append(0.0)
            loss_weights.append(0.0)
            continue
        count += int(is_bad)
        w = min(max(1.0 - w_drop * count, 0.0), 1.0)
        weights.append(w)
        loss_weights.append(w + w_base)
        eff += w > eps
    return weights, loss_weights, eff


bool_rows = st.integers(1, 4).flatmap(
    lambda b: st.integers(1, 12).flatmap(
        lambda s: st.tuples(
            st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=b, max_size=b),
            st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=b, max_size=b),
        )
    )
)


@SETTINGS
@given(bool_rows, st.floats(0.0, 0.7), st.floats(0.0, 2.0))
def test_reliability_weights_match_loop_and_are_monotone(rows, w_drop, w_base):
    bad, valid = torch.tensor(rows[0]), torch.tensor(rows[1])
    out = reliability_weights(bad, valid, w_drop, w_base)
    for i in range(bad.shape[0]):
        w, lw, eff = _weights_loop(rows[0][i], rows[1][i], w_drop, w_base)
        assert out.weights[i].tolist() == pytest.approx(w, abs=1e-6)
        assert out.loss_weights[i].tolist() == pytest.approx(lw, abs=1e-6)
        assert out.effective_length[i].item() == eff
        on_valid = out.weights[i][valid[i]]
        assert bool((on_valid[1:] <= on_valid[:-1]).all())


@SETTINGS
@given(bool_rows, st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_padding_never_changes_weights(rows, extra, seed):
    bad, valid = torch.tensor(rows[0]), torch.tensor(rows[1])
    gen = torch.Generator().manual_seed(seed)
    pad_bad = torch.rand(bad.shape[0], extra, generator=gen) > 0.5
    padded_bad = torch.cat([bad, pad_bad], dim=1)
    padded_valid = torch.cat([valid, torch.zeros_like(pad_bad)], dim=1)
    a = reliability_weights(bad, valid, 0.3, 0.2)
    b = reliability_weights(padded_bad, padded_valid, 0.3, 0.2)
    s = bad.shape[1]
    assert torch.equal(a.weights, b.weights[:, :s]) and not b.weights[:, s:].any()
    assert torch.equal(a.loss_weights, b.loss_weights[:, :s]) and not b.loss_weights[:, s:].any()
    assert torch.equal(a.effective_length, b.effective_length)


# ---------------------------------------------------------------- bad input and config


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval(value):
    with pytest.raises(ValueError, match="prune.threshold"):
        PruneConfig(threshold=value)
    with pytest.raises(ValueError, match="threshold"):
        teacher_top_p_accept(
            torch.zeros(1, 1, dtype=torch.int64),
            torch.zeros(1, 1, 2, dtype=torch.int64),
            torch.zeros(1, 1, 2),
            value,
        )


@pytest.mark.parametrize("name", ["w_drop", "w_base"])
@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_bad_weight_params(name, value):
    with pytest.raises(ValueError, match=f"prune.{name}"):
        PruneConfig(**{name: value})
    kwargs = {"w_drop": 0.1, "w_base": 0.1, name: value}
    with pytest.raises(ValueError, match=f"prune.{name}"):
        reliability_weights(
            torch.zeros(1, 2, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool), **kwargs
        )


def test_shape_mismatches_raise():
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        overlap_ratio(
            torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="valid_mask"):
        overlap_ratio(
            torch.zeros(1, 2, 3, dtype=torch.int64),
            torch.zeros(1, 2, 3, dtype=torch.int64),
            torch.ones(1, 3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="bad_events"):
        reliability_weights(
            torch.zeros(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool), 0.1, 0.1
        )


def test_config_validation():
    assert PruneConfig().threshold == 0.7 and PruneConfig().w_drop == 0.01
    assert PruneConfig().w_base == 0.5 and PruneConfig().top_k == 16
    with pytest.raises(ValueError, match="prune.top_k"):
        PruneConfig(top_k=0)
    with pytest.raises(ValueError, match="prune.top_k=16 is larger than the vocabulary"):
        PruneConfig().check_vocab_size(10)
    PruneConfig().check_vocab_size(16)
    with pytest.raises(ValueError, match="prune.metric"):
        PruneConfig(metric="entropy")
    with pytest.raises(ValueError, match="prune.drift_budget"):
        PruneConfig(mode="truncate", drift_budget=0)
    with pytest.raises(ValueError, match="budget.min_len"):
        BudgetConfig(min_len=2000, max_len=1000)
    with pytest.raises(ValueError, match="budget.step"):
        BudgetConfig(step=0)
    with pytest.raises(ValueError, match="budget.hit_ratio"):
        BudgetConfig(hit_ratio=1.5)
    with pytest.raises(ValueError, match="budget.shrink_patience"):
        BudgetConfig(shrink_patience=0)
    with pytest.raises(ValueError, match="loss.kind"):
        LossConfig(kind="mse")
    with pytest.raises(ValueError, match="loss.clip_low"):
        LossConfig(clip_low=1.0)
    with pytest.raises(ValueError, match="loss.jsd_beta"):
        LossConfig(jsd_beta=math.nan)
    with pytest.raises(ValueError, match="loss.clip_ratio_c"):
        LossConfig(clip_ratio_c=0.5)


def test_config_builds_from_yaml_mapping():
    from megatron_opd.config.loader import build_config

    cfg = build_config(PruneConfig, {"threshold": 0.9, "mode": "truncate", "drift_budget": 50})
    assert cfg.threshold == 0.9 and cfg.drift_budget == 50 and cfg.mode == "truncate"
    with pytest.raises(ValueError, match="prune.w_drop"):
        build_config(PruneConfig, {"w_drop": -1.0}, prefix="prune.")
