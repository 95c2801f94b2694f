"""Sampling temperature reaches scoring and training, as in the authors' release.

The release divides the student's scoring and training logits by the rollout temperature
and the teacher's by ``teacher_temperature``. Reference: the HF transformers models the
run was built from, full-vocabulary ``log_softmax(logits / T)`` in float64.
"""

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_run import make_tiny_run

STUDENT_T, TEACHER_T = 2.0, 0.5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run_temperature")
    return root, make_tiny_run(root)


def _scored_batch(overrides):
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig
    from megatron_opd.distributed import destroy_model_parallel, init_distributed
    from megatron_opd.training.setup import build_components
    from megatron_opd.training.trainer import Trainer

    config = build_config(OPDConfig, merge_overrides({}, overrides))
    groups = init_distributed(config.parallel, seed=0)
    try:
        trainer = Trainer(config, groups, build_components(config, groups))
        batch = trainer.rollout_and_score()
        names = (
            "tokens", "prompt_lengths", "response_lengths", "sampled_log_probs",
            "student_sampled_log_probs", "student_topk_ids", "student_topk_log_probs",
            "teacher_topk_ids", "teacher_topk_log_probs", "teacher_sampled_log_probs",
        )  # fmt: skip
        return {name: getattr(batch, name).cpu() for name in names}
    finally:
        destroy_model_parallel()


def test_scoring_divides_logits_by_the_temperatures(tiny_run):
    from transformers import AutoModelForCausalLM

    root, overrides = tiny_run
    run = [*overrides, f"rollout.temperature={STUDENT_T}", f"loss.teacher_temperature={TEACHER_T}"]
    got = run_distributed(_scored_batch, 1, run, timeout_s=200)[0]
    models = {
        name: AutoModelForCausalLM.from_pretrained(root / name, torch_dtype=torch.float64).eval()
        for name in ("student", "teacher")
    }
    tokens = got["tokens"]
    with torch.no_grad():
        student = (models["student"](tokens).logits / STUDENT_T).log_softmax(-1)
        teacher = (models["teacher"](tokens).logits / TEACHER_T).log_softmax(-1)
    checked = 0
    for i in range(tokens.shape[0]):
        p, r = int(got["prompt_lengths"][i]), int(got["response_lengths"][i])
        cols = slice(p, p + r)
        targets = tokens[i, cols]
        s_ref, t_ref = student[i, p - 1 : p + r - 1], teacher[i, p - 1 : p + r - 1]
        s_sampled = s_ref.gather(-1, targets[:, None])[:, 0].float()
        torch.testing.assert_close(
            got["student_sampled_log_probs"][i, cols], s_sampled, atol=2e-5, rtol=0
        )
        # The engine records the sampling policy's log-probs (also at T = 2).
        torch.testing.assert_close(got["sampled_log_probs"][i, cols], s_sampled, atol=2e-5, rtol=0)
        t_sampled = t_ref.gather(-1, targets[:, None])[:, 0].float()
        torch.testing.assert_close(
            got["teacher_sampled_log_probs"][i, cols], t_sampled, atol=2e-5, rtol=0
        )
        for side, ref in (("student", s_ref), ("teacher", t_ref)):
            ids = got[f"{side}_topk_ids"][i, cols]
            torch.testing.assert_close(
                got[f"{side}_topk_log_probs"][i, cols],
                ref.gather(-1, ids).float(),
                atol=2e-5,
                rtol=0,
            )
            assert torch.equal(ids[:, 0], ref.argmax(-1))
        checked += r
    assert checked > 0
    # At T = 0.5 the teacher is sharper than at 1: its top-1 mass is larger.
    untempered = models["teacher"](tokens).logits.log_softmax(-1).max(-1).values
    assert (teacher.max(-1).values >= untempered - 1e-9).all()


def test_training_loss_uses_the_temperature():
    from megatron_opd.config.prune import LossConfig
    from megatron_opd.training.forward_step import compute_micro_batch_loss
    from megatron_opd.training.micro_batches import TrainMicroBatch

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64).log_softmax(-1)
    t_lp, t_ids = teacher.topk(4, dim=-1)
    inputs = {"valid_mask": torch.ones(2, 5, dtype=torch.bool),
              "loss_weights": torch.ones(2, 5), "teacher_topk_ids": t_ids,
              "teacher_topk_log_probs": t_lp.float()}  # fmt: skip
    micro = TrainMicroBatch(tokens=torch.zeros(2, 5, dtype=torch.long),
                            position_ids=torch.zeros(2, 5, dtype=torch.long),
                            loss_inputs=inputs, num_tokens=10)  # fmt: skip
    config = LossConfig(kind="forward_topk_kl", tail_bucket=False)
    loss_t, _, _ = compute_micro_batch_loss(logits, micro, loss_config=config, tp_group=None,
                                            vocab_size=11, temperature=2.0)  # fmt: skip
    # Reference: forward KL over the teacher's top-4, renormalised, with student logits / 2.
    student = (logits / 2.0).log_softmax(-1).gather(-1, t_ids)
    p_t = t_lp.log_softmax(-1)
    p_s = student.log_softmax(-1)
    reference = (p_t.exp() * (p_t - p_s)).sum()
    assert loss_t.item() == pytest.approx(reference.item(), rel=1e-5)
