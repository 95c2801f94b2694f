"""The prune code and the losses on every available device give the CPU float64 results
(CUDA cases skip cleanly without a GPU)."""

import pytest
import torch

from megatron_opd.config.prune import LossConfig
from megatron_opd.losses import build_id_set, opd_loss
from megatron_opd.prune import (
    OnlineStopper,
    TrimPlan,
    overlap_ratio,
    plan_trimming,
    prune_metrics,
    reliability_weights,
    teacher_top_p_bad_events,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


def _case():
    gen = torch.Generator().manual_seed(7)
    b, s, k, vocab = 3, 9, 4, 16
    student = torch.randn(b, s, vocab, generator=gen, dtype=torch.float64).log_softmax(-1)
    teacher = torch.randn(b, s, vocab, generator=gen, dtype=torch.float64).log_softmax(-1)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[:, :2] = False  # prompt
    valid[1, 6:] = False  # short response
    sampled = torch.randint(0, vocab, (b, s), generator=gen)
    return student, teacher, valid, sampled, k


def _pipeline(device):
    """Drift events -> weights -> stopper -> trimming -> loss, all on ``device``; float64
    results on the CPU for comparison."""
    student, teacher, valid, sampled, k = (
        x.to(device) if isinstance(x, torch.Tensor) else x for x in _case()
    )
    s_ids = student.topk(k, dim=-1).indices
    t_ids = teacher.topk(k, dim=-1).indices
    t_lp = teacher.gather(-1, t_ids)
    ratio, _ = overlap_ratio(s_ids, t_ids, valid)
    bad = (ratio < 0.7) & valid
    top_p_bad = teacher_top_p_bad_events(sampled, t_ids, t_lp, 0.6, valid)
    weights = reliability_weights(bad, valid, 0.3, 0.0)
    stopper = OnlineStopper(3, w_drop=0.3, w_base=0.0, device=device)
    for start in range(0, 9, 4):
        stopper.update(bad[:, start : start + 4], valid[:, start : start + 4])
    plan = plan_trimming(weights.loss_weights, max_tokens=12)
    encoded = TrimPlan.from_tensor(plan.to_tensor(device=device))
    ids, mask = build_id_set(s_ids, t_ids, "union")
    cur = (student.gather(-1, ids) + 0.1).requires_grad_()
    loss, num, _ = opd_loss(
        LossConfig(),
        student_log_probs=cur,
        old_student_log_probs=student.gather(-1, ids),
        teacher_log_probs=teacher.gather(-1, ids),
        id_mask=mask,
        loss_weights=weights.loss_weights,
        valid_mask=valid,
    )
    loss.backward()
    metrics = prune_metrics(
        valid_mask=valid,
        bad_events=bad,
        weights=weights.weights,
        effective_lengths=weights.effective_length,
        overlap_ratio=ratio,
        kept_lengths=plan.kept_lengths,
    )
    return {
        "ratio": ratio.cpu().double(),
        "top_p_bad": top_p_bad.cpu(),
        "weights": weights.weights.cpu().double(),
        "stream": stopper.result().weights.cpu().double(),
        "stop": stopper.should_stop.cpu(),
        "layout": [(mb.rows, mb.padded_length) for mb in encoded.micro_batches],
        "loss": loss.detach().cpu(),
        "num": num.cpu(),
        "grad": cur.grad.cpu(),
        "metrics": metrics,
    }


@pytest.mark.parametrize("device", DEVICES)
def test_pipeline_on_device_matches_cpu(device):
    got = _pipeline(device)
    # Independent expectations for this fixed case, by plain loops on the CPU.
    student, teacher, valid, _, k = _case()
    for i in range(3):
        for t in range(9):
            s_set = set(student[i, t].topk(k).indices.tolist())
            t_set = set(teacher[i, t].topk(k).indices.tolist())
            expected = len(s_set & t_set) / k if valid[i, t] else 0.0
            assert got["ratio"][i, t].item() == pytest.approx(expected)
    assert torch.equal(got["weights"], got["stream"])
    assert got["num"].item() == int(valid.sum())
    assert torch.isfinite(got["grad"]).all() and torch.isfinite(got["loss"])
    if device != "cpu":
        ref = _pipeline("cpu")
        for key in ("ratio", "top_p_bad", "stop", "num"):
            assert torch.equal(got[key], ref[key]), key
        assert torch.allclose(got["weights"], ref["weights"])  # a GPU may fuse multiply-add
        assert got["layout"] == ref["layout"]
        assert got["metrics"] == pytest.approx(ref["metrics"])
        assert torch.allclose(got["loss"], ref["loss"]) and torch.allclose(got["grad"], ref["grad"])
