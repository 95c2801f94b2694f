"""OPD losses against hand-worked values and straightforward per-token reference loops
(float64, scalar torch ops so autograd gives the reference gradients)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_opd.config.prune import LossConfig
from megatron_opd.losses import (
    build_id_set,
    forward_topk_kl_loss,
    gkd_jsd_loss,
    opd_loss,
    sampled_reverse_kl_pg_loss,
    topk_reverse_kl_loss,
    topk_reverse_kl_pg_loss,
)

SETTINGS = settings(max_examples=30, deadline=None)
LN2 = math.log(2.0)


# ---------------------------------------------------------------- references


def ref_ppo(adv, ratio, clip_low, clip_high, clip_c):
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if clip_c is not None and adv < 0:
        loss = torch.minimum(loss, -adv * clip_c)
    return loss


def ref_topk_pg(cur, old, teacher, id_mask, lw, valid, mode, clip=(0.2, 0.2, 3.0)):
    total = cur.new_zeros(())
    b, s, m = cur.shape
    for i in range(b):
        for t in range(s):
            if not valid[i][t]:
                continue
            ids = [j for j in range(m) if id_mask[i][t][j]]
            if mode == "student_p":
                z = sum(math.exp(old[i][t][j]) for j in ids)
                w = {j: math.exp(old[i][t][j]) / z for j in ids}
            elif mode == "teacher_p":
                z = sum(math.exp(teacher[i][t][j]) for j in ids)
                w = {j: math.exp(teacher[i][t][j]) / z for j in ids}
            else:  # the release: softmax of zeros over the id set
                w = dict.fromkeys(ids, 1.0 / len(ids)) if ids else {}
            for j in ids:
                adv = torch.tensor(-(old[i][t][j] - teacher[i][t][j]) * w[j] * lw[i][t])
                ratio = torch.exp(cur[i, t, j] - old[i][t][j])
                total = total + ref_ppo(adv, ratio, *clip)
    return total


def ref_sampled_pg(cur, old, teacher, lw, valid, estimator, clip=(0.2, 0.2, 3.0)):
    total = cur.new_zeros(())
    for i in range(cur.shape[0]):
        for t in range(cur.shape[1]):
            if not valid[i][t]:
                continue
            d = teacher[i][t] - old[i][t]
            reward = d if estimator == "k1" else -(math.exp(d) - 1 - d)
            adv = torch.tensor(reward * lw[i][t])
            total = total + ref_ppo(adv, torch.exp(cur[i, t] - old[i][t]), *clip)
    return total


def ref_buckets(log_probs, ids, tail):
    probs = [torch.exp(log_probs[j]) for j in ids]
    if tail:
        return probs + [1 - sum(probs)]
    z = sum(probs)
    return [p / z for p in probs]


def ref_kl(p, q):
    return sum(pi * torch.log(pi / qi) for pi, qi in zip(p, q))


def ref_divergence(student, teacher, id_mask, lw, valid, kind, tail, beta=0.5):
    total = student.new_zeros(())
    b, s, m = student.shape
    for i in range(b):
        for t in range(s):
            if not valid[i][t]:
                continue
            ids = [j for j in range(m) if id_mask[i][t][j]]
            q = ref_buckets(student[i, t], ids, tail)
            p = ref_buckets(teacher[i, t], ids, tail)
            if kind == "forward":
                value = ref_kl(p, q)
            elif kind == "reverse":
                value = ref_kl(q, p)
            elif beta == 0:
                value = ref_kl(p, q)
            elif beta == 1:
                value = ref_kl(q, p)
            else:
                mix = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
                value = beta * ref_kl(p, mix) + (1 - beta) * ref_kl(q, mix)
            total = total + value * lw[i][t]
    return total


# ---------------------------------------------------------------- random cases


def make_case(seed, b=2, s=3, k=3, vocab=8):
    """Full-vocabulary float64 distributions and their top-K views."""
    gen = torch.Generator().manual_seed(seed)
    student_full = torch.randn(b, s, vocab, generator=gen, dtype=torch.float64).log_softmax(-1)
    teacher_full = torch.randn(b, s, vocab, generator=gen, dtype=torch.float64).log_softmax(-1)
    s_ids = student_full.topk(k, dim=-1).indices
    t_ids = teacher_full.topk(k, dim=-1).indices
    valid = torch.rand(b, s, generator=gen) > 0.25
    valid[0, 0] = True
    lw = torch.rand(b, s, generator=gen, dtype=torch.float64) * 1.5
    noise = 0.4 * torch.randn(b, s, vocab, generator=gen, dtype=torch.float64)
    return student_full, teacher_full, s_ids, t_ids, valid, lw, noise


def grads(loss, tensor):
    return torch.autograd.grad(loss, tensor)[0]


# ---------------------------------------------------------------- id sets


def test_build_id_set_hand_worked():
    s = torch.tensor([[[1, 2, 3]]])
    t = torch.tensor([[[3, 4, 1]]])
    ids, mask = build_id_set(s, t, "only_stu")
    assert ids.tolist() == [[[1, 2, 3]]] and mask.all()
    ids, mask = build_id_set(s, t, "only_tch")
    assert ids.tolist() == [[[3, 4, 1]]] and mask.all()
    ids, mask = build_id_set(s, t, "intersection")
    assert ids.tolist() == [[[1, 2, 3]]] and mask.tolist() == [[[True, False, True]]]
    ids, mask = build_id_set(s, t, "union")
    assert ids.tolist() == [[[1, 2, 3, 3, 4, 1]]]
    assert mask.tolist() == [[[True, True, True, False, True, False]]]
    with pytest.raises(ValueError, match="loss.id_set"):
        build_id_set(s, t, "xor")
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        build_id_set(s, t[..., :2], "union")


# ---------------------------------------------------------------- top-K reward + PPO


def test_topk_pg_hand_worked():
    # Student (rollout) top-2 probs 0.6, 0.2 -> student_p weights 0.75, 0.25.
    # Teacher 0.3, 0.4. r = -(ln .6 - ln .3) * .75 = -.75 ln2; -(ln .2 - ln .4) * .25 = .25 ln2.
    old = torch.tensor([[[0.6, 0.2]]], dtype=torch.float64).log()
    teacher = torch.tensor([[[0.3, 0.4]]], dtype=torch.float64).log()
    cur = old.clone().requires_grad_()
    loss, num, metrics = topk_reverse_kl_pg_loss(
        student_log_probs=cur,
        old_student_log_probs=old,
        teacher_log_probs=teacher,
        id_mask=torch.ones(1, 1, 2, dtype=torch.bool),
        loss_weights=torch.tensor([[2.0]]),
        valid_mask=torch.tensor([[True]]),
    )
    # ratio = 1: loss = -sum(A) = -(2 * (-.75 + .25) ln2) = ln2; d loss / d cur_j = -A_j.
    assert loss.item() == pytest.approx(LN2, rel=1e-6)
    assert num.item() == 1 and num.dtype == torch.int32
    assert grads(loss, cur)[0, 0].tolist() == pytest.approx([1.5 * LN2, -0.5 * LN2], rel=1e-6)
    assert metrics["opd/clip_fraction"].item() == 0.0


def test_topk_pg_uniform_weight_is_one_over_set_size():
    # reward_weight none, 4 ids with old - teacher = ln 2 each: A_j = -ln2 / 4 (the release
    # takes a softmax of zeros over the set), so at ratio 1 the loss is -sum(A) = ln 2.
    old = torch.full((1, 1, 4), -2.0, dtype=torch.float64)
    teacher = old - LN2
    cur = old.clone().requires_grad_()
    loss, _, _ = topk_reverse_kl_pg_loss(
        student_log_probs=cur, old_student_log_probs=old, teacher_log_probs=teacher,
        id_mask=torch.ones(1, 1, 4, dtype=torch.bool), loss_weights=None,
        valid_mask=torch.tensor([[True]]), reward_weight="none",
    )  # fmt: skip
    assert loss.item() == pytest.approx(LN2, rel=1e-6)
    assert grads(loss, cur)[0, 0].tolist() == pytest.approx([LN2 / 4] * 4, rel=1e-6)


def test_topk_pg_clipping_hand_worked():
    # One id, A = 1 (teacher e times likelier, uniform weight 1/1): ratio 1.5 is clipped at 1.2.
    old = torch.tensor([[[-1.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.0]]], dtype=torch.float64)
    cur = (old + math.log(1.5)).requires_grad_()
    kwargs = dict(old_student_log_probs=old, teacher_log_probs=teacher, reward_weight="none")
    kwargs.update(id_mask=torch.ones(1, 1, 1, dtype=torch.bool), valid_mask=torch.tensor([[True]]))
    loss, _, metrics = topk_reverse_kl_pg_loss(student_log_probs=cur, loss_weights=None, **kwargs)
    assert loss.item() == pytest.approx(-1.2) and grads(loss, cur).item() == 0.0
    assert metrics["opd/clip_fraction"].item() == 1.0
    # A = -1 with ratio 5: dual clip caps the loss at -A * 3 = 3.
    cur = (old + math.log(5.0)).requires_grad_()
    kwargs["teacher_log_probs"] = torch.tensor([[[-2.0]]], dtype=torch.float64)
    loss, _, _ = topk_reverse_kl_pg_loss(student_log_probs=cur, loss_weights=None, **kwargs)
    assert loss.item() == pytest.approx(3.0)
    loss, _, _ = topk_reverse_kl_pg_loss(
        student_log_probs=cur, loss_weights=None, clip_ratio_c=None, **kwargs
    )
    assert loss.item() == pytest.approx(5.0)


@SETTINGS
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["only_stu", "only_tch", "intersection", "union"]),
    st.sampled_from(["student_p", "teacher_p", "none"]),
)
def test_topk_pg_matches_reference(seed, id_set, reward_weight):
    student_full, teacher_full, s_ids, t_ids, valid, lw, noise = make_case(seed)
    ids, mask = build_id_set(s_ids, t_ids, id_set)
    old = student_full.gather(-1, ids)
    teacher = teacher_full.gather(-1, ids)
    cur = (old + noise.gather(-1, ids)).requires_grad_()
    loss, num, _ = topk_reverse_kl_pg_loss(
        student_log_probs=cur,
        old_student_log_probs=old,
        teacher_log_probs=teacher,
        id_mask=mask,
        loss_weights=lw,
        valid_mask=valid,
        reward_weight=reward_weight,
    )
    cur_ref = cur.detach().clone().requires_grad_()
    ref = ref_topk_pg(
        cur_ref,
        old.tolist(),
        teacher.tolist(),
        mask.tolist(),
        lw.tolist(),
        valid.tolist(),
        reward_weight,
    )
    assert num.item() == int(valid.sum())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grads(loss, cur), grads(ref, cur_ref), rtol=1e-5, atol=1e-6)


def test_empty_intersection_gives_zero_and_finite_grad():
    cur = torch.full((1, 1, 2), -1.0, requires_grad=True)
    loss, num, metrics = topk_reverse_kl_pg_loss(
        student_log_probs=cur,
        old_student_log_probs=torch.full((1, 1, 2), float("-inf")),
        teacher_log_probs=torch.full((1, 1, 2), -2.0),
        id_mask=torch.zeros(1, 1, 2, dtype=torch.bool),
        loss_weights=torch.ones(1, 1),
        valid_mask=torch.ones(1, 1, dtype=torch.bool),
    )
    assert loss.item() == 0.0 and num.item() == 1
    assert torch.equal(grads(loss, cur), torch.zeros(1, 1, 2))
    assert all(torch.isfinite(v).all() for v in metrics.values())


# ---------------------------------------------------------------- sampled-token PG


def test_sampled_pg_hand_worked():
    old = torch.tensor([[0.5]], dtype=torch.float64).log()
    teacher = torch.tensor([[0.25]], dtype=torch.float64).log()
    for estimator, expected in (("k1", LN2), ("k3", LN2 - 0.5)):
        cur = old.clone().requires_grad_()
        loss, num, _ = sampled_reverse_kl_pg_loss(
            student_log_probs=cur,
            old_student_log_probs=old,
            teacher_log_probs=teacher,
            loss_weights=None,
            valid_mask=torch.tensor([[True]]),
            kl_estimator=estimator,
        )
        # ratio 1: loss = -A, d loss / d cur = -A.
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert grads(loss, cur).item() == pytest.approx(expected, rel=1e-6)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from(["k1", "k3"]))
def test_sampled_pg_matches_reference(seed, estimator):
    student_full, teacher_full, _, _, valid, lw, noise = make_case(seed)
    sampled = torch.randint(0, 8, valid.shape, generator=torch.Generator().manual_seed(seed))
    old = student_full.gather(-1, sampled[..., None])[..., 0]
    teacher = teacher_full.gather(-1, sampled[..., None])[..., 0]
    cur = (old + noise[..., 0]).requires_grad_()
    loss, _, _ = sampled_reverse_kl_pg_loss(
        student_log_probs=cur,
        old_student_log_probs=old,
        teacher_log_probs=teacher,
        loss_weights=lw,
        valid_mask=valid,
        kl_estimator=estimator,
    )
    cur_ref = cur.detach().clone().requires_grad_()
    ref = ref_sampled_pg(
        cur_ref, old.tolist(), teacher.tolist(), lw.tolist(), valid.tolist(), estimator
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grads(loss, cur), grads(ref, cur_ref), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- divergences


def _one_token(student_probs, teacher_probs):
    return (
        torch.tensor([[student_probs]], dtype=torch.float64).log().requires_grad_(),
        torch.tensor([[teacher_probs]], dtype=torch.float64).log(),
    )


def test_forward_kl_hand_worked():
    student, teacher = _one_token([0.25, 0.25], [0.5, 0.25])
    common = dict(loss_weights=None, valid_mask=torch.tensor([[True]]))
    # Tail: P = (.5, .25, .25), Q = (.25, .25, .5): .5 ln2 + 0 + .25 ln(1/2) = .25 ln2.
    loss, _, _ = forward_topk_kl_loss(
        student_log_probs=student, teacher_log_probs=teacher, **common
    )
    assert loss.item() == pytest.approx(0.25 * LN2, rel=1e-6)
    # Renormalised: P = (2/3, 1/3), Q = (1/2, 1/2).
    loss, _, _ = forward_topk_kl_loss(
        student_log_probs=student, teacher_log_probs=teacher, tail_bucket=False, **common
    )
    expected = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_reverse_kl_and_jsd_hand_worked():
    student, teacher = _one_token([0.5, 0.5], [0.25, 0.75])
    common = dict(loss_weights=None, valid_mask=torch.tensor([[True]]), tail_bucket=False)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    loss, _, _ = topk_reverse_kl_loss(
        student_log_probs=student, teacher_log_probs=teacher, id_mask=mask, **common
    )
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-6)
    # beta = 0.5: M = (3/8, 5/8).
    loss, _, _ = gkd_jsd_loss(student_log_probs=student, teacher_log_probs=teacher, **common)
    kl_pm = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    kl_qm = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    assert loss.item() == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, rel=1e-6)
    # Masking one id out of the set leaves a single certain bucket: KL = 0.
    loss, _, _ = topk_reverse_kl_loss(
        student_log_probs=student,
        teacher_log_probs=teacher,
        id_mask=torch.tensor([[[True, False]]]),
        **common,
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


@SETTINGS
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["forward", "jsd", "reverse"]),
    st.booleans(),
    st.sampled_from([0.0, 0.3, 1.0]),
)
def test_divergences_match_reference(seed, kind, tail, beta):
    student_full, teacher_full, s_ids, t_ids, valid, lw, _ = make_case(seed)
    if kind == "reverse":
        ids, mask = build_id_set(s_ids, t_ids, "union")
    else:
        ids, mask = t_ids, torch.ones_like(t_ids, dtype=torch.bool)
    student = student_full.gather(-1, ids).requires_grad_()
    teacher = teacher_full.gather(-1, ids)
    common = dict(
        student_log_probs=student, teacher_log_probs=teacher, loss_weights=lw, valid_mask=valid
    )
    if kind == "forward":
        loss, _, _ = forward_topk_kl_loss(tail_bucket=tail, **common)
    elif kind == "jsd":
        loss, _, _ = gkd_jsd_loss(beta=beta, tail_bucket=tail, **common)
    else:
        loss, _, _ = topk_reverse_kl_loss(id_mask=mask, tail_bucket=tail, **common)
    student_ref = student.detach().clone().requires_grad_()
    ref = ref_divergence(
        student_ref, teacher, mask.tolist(), lw.tolist(), valid.tolist(), kind, tail, beta
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grads(loss, student), grads(ref, student_ref), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- properties of every loss


def _all_losses(seed, s_extra=0):
    """(name, call(loss_weights, valid, pad) -> (loss, num, grad)) for every loss kind."""
    student_full, teacher_full, s_ids, t_ids, valid, lw, noise = make_case(seed)
    ids, mask = build_id_set(s_ids, t_ids, "union")

    def pad(x, value):
        if s_extra == 0:
            return x
        shape = list(x.shape)
        shape[1] = s_extra
        return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], dim=1)

    tensors = {
        "student_log_probs": pad(student_full.gather(-1, ids) + noise.gather(-1, ids), -3.7),
        "old_student_log_probs": pad(student_full.gather(-1, ids), -1.3),
        "teacher_log_probs": pad(teacher_full.gather(-1, ids), -0.2),
        "id_mask": pad(mask, True),
    }
    sampled = {k: v[..., 0] for k, v in tensors.items() if k != "id_mask"}
    return tensors, sampled, pad(valid, False), pad(lw, 9.0)


@SETTINGS
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(
        [
            "topk_reverse_kl_pg",
            "sampled_reverse_kl_pg",
            "forward_topk_kl",
            "gkd_jsd",
            "topk_reverse_kl",
        ]
    ),
    st.floats(0.1, 3.0),
)
def test_unit_weights_equal_unweighted_and_scale(seed, kind, scale):
    tensors, sampled, valid, _ = _all_losses(seed)
    config = LossConfig(kind=kind)
    inputs = sampled if kind == "sampled_reverse_kl_pg" else dict(tensors)
    if kind in ("forward_topk_kl", "gkd_jsd"):
        inputs.pop("old_student_log_probs")
        inputs.pop("id_mask")
    if kind == "topk_reverse_kl":
        inputs.pop("old_student_log_probs")

    def run(loss_weights):
        leaf = inputs["student_log_probs"].detach().clone().requires_grad_()
        loss, num, _ = opd_loss(
            config,
            **{**inputs, "student_log_probs": leaf},
            valid_mask=valid,
            loss_weights=loss_weights,
        )
        return loss, num, grads(loss, leaf)

    ones = torch.ones(valid.shape, dtype=torch.float64)
    base, weighted = run(None), run(ones)
    assert torch.allclose(base[0], weighted[0]) and torch.allclose(base[2], weighted[2])
    assert base[1].item() == int(valid.sum())
    scaled = run(ones * scale)
    assert scaled[0].item() == pytest.approx(scale * base[0].item(), rel=1e-5, abs=1e-7)


@SETTINGS
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(
        [
            "topk_reverse_kl_pg",
            "sampled_reverse_kl_pg",
            "forward_topk_kl",
            "gkd_jsd",
            "topk_reverse_kl",
        ]
    ),
    st.integers(1, 3),
)
def test_padding_never_changes_loss(seed, kind, extra):
    config = LossConfig(kind=kind)
    results = []
    for s_extra in (0, extra):
        tensors, sampled, valid, lw = _all_losses(seed, s_extra)
        inputs = sampled if kind == "sampled_reverse_kl_pg" else dict(tensors)
        if kind in ("forward_topk_kl", "gkd_jsd"):
            inputs.pop("old_student_log_probs")
        if kind == "topk_reverse_kl":
            inputs.pop("old_student_log_probs")
        leaf = inputs["student_log_probs"].detach().clone().requires_grad_()
        loss, num, _ = opd_loss(
            config, **{**inputs, "student_log_probs": leaf}, valid_mask=valid, loss_weights=lw
        )
        results.append((loss, num, grads(loss, leaf)))
    (loss_a, num_a, grad_a), (loss_b, num_b, grad_b) = results
    s = grad_a.shape[1]
    assert torch.allclose(loss_a, loss_b) and num_a.item() == num_b.item()
    assert torch.allclose(grad_a, grad_b[:, :s]) and not grad_b[:, s:].any()


def test_dispatcher_checks_tensors():
    with pytest.raises(ValueError, match="missing \\['old_student_log_probs'"):
        opd_loss(
            LossConfig(),
            student_log_probs=torch.zeros(1, 1, 2),
            teacher_log_probs=torch.zeros(1, 1, 2),
            id_mask=torch.ones(1, 1, 2, dtype=torch.bool),
            valid_mask=torch.ones(1, 1, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="unexpected \\['id_mask'\\]"):
        opd_loss(
            LossConfig(kind="sampled_reverse_kl_pg"),
            student_log_probs=torch.zeros(1, 1),
            old_student_log_probs=torch.zeros(1, 1),
            teacher_log_probs=torch.zeros(1, 1),
            valid_mask=torch.ones(1, 1, dtype=torch.bool),
            id_mask=torch.ones(1, 1, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="teacher_log_probs"):
        forward_topk_kl_loss(
            student_log_probs=torch.zeros(1, 2, 3),
            teacher_log_probs=torch.zeros(1, 2, 4),
            loss_weights=None,
            valid_mask=torch.ones(1, 2, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="valid_mask"):
        forward_topk_kl_loss(
            student_log_probs=torch.zeros(1, 2, 3),
            teacher_log_probs=torch.zeros(1, 2, 3),
            loss_weights=None,
            valid_mask=torch.ones(2, 2, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="loss.jsd_beta"):
        gkd_jsd_loss(
            student_log_probs=torch.zeros(1, 1, 1),
            teacher_log_probs=torch.zeros(1, 1, 1),
            loss_weights=None,
            valid_mask=torch.ones(1, 1, dtype=torch.bool),
            beta=1.5,
        )


def test_dispatcher_passes_config_knobs():
    # forward_topk_kl with tail_bucket=False must equal the renormalised hand value.
    student, teacher = _one_token([0.25, 0.25], [0.5, 0.25])
    loss, _, _ = opd_loss(
        LossConfig(kind="forward_topk_kl", tail_bucket=False),
        student_log_probs=student,
        teacher_log_probs=teacher,
        valid_mask=torch.tensor([[True]]),
    )
    assert loss.item() == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3), rel=1e-6)
    # sampled k3 through the dispatcher.
    old = torch.tensor([[0.5]], dtype=torch.float64).log()
    loss, _, _ = opd_loss(
        LossConfig(kind="sampled_reverse_kl_pg", kl_estimator="k3"),
        student_log_probs=old.clone(),
        old_student_log_probs=old,
        teacher_log_probs=torch.tensor([[0.25]], dtype=torch.float64).log(),
        valid_mask=torch.tensor([[True]]),
    )
    assert loss.item() == pytest.approx(LN2 - 0.5, rel=1e-6)
