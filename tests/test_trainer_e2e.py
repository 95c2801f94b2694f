"""The Prune-OPD trainer end to end on CPU (gloo, 2 processes): TP=2, PP=2, DP=2, exact
trimming, resume, and the errors a user can cause before training starts."""

import json
import shutil

import pytest

from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_run import make_tiny_run

_COMPARED = (
    "loss", "reverse_kl", "reverse_kl_topk", "overlap_ratio_mean", "effective_length_mean",
    "budget", "tokens_trained", "grad_norm",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    return root, make_tiny_run(root)


def _config(overrides):
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig

    return build_config(OPDConfig, merge_overrides({}, overrides))


def _train(overrides):
    from megatron_opd.train import run_training

    history = run_training(_config(overrides), destroy_process_group=False)
    return [{k: h[k] for k in (*_COMPARED, "step")} for h in history]


def _layout(tp, pp):
    return [f"parallel.tensor_parallel_size={tp}", f"parallel.pipeline_parallel_size={pp}"]


def test_reverse_kl_falls_at_tp2_pp2_dp2(tiny_run):
    root, overrides = tiny_run
    run = [*overrides, "training.num_steps=6", "training.lr=0.03", "rollout.n_samples_per_prompt=4"]
    trajectories = {}
    for name, layout in (("tp2", _layout(2, 1)), ("pp2", _layout(1, 2)), ("dp2", _layout(1, 1))):
        history = run_distributed(_train, 2, [*run, *layout], timeout_s=400)[0]
        assert len(history) == 6
        assert all(v == v and abs(v) < 1e9 for h in history for v in h.values())  # finite
        trajectories[name] = kl = [h["reverse_kl_topk"] for h in history]
        assert sum(kl[-2:]) < 0.85 * sum(kl[:2]), trajectories


def _trim_gradients(overrides):
    import torch

    from megatron_opd.distributed import init_distributed
    from megatron_opd.training.setup import build_components
    from megatron_opd.training.trainer import Trainer

    config = _config(overrides)
    groups = init_distributed(config.parallel, seed=config.training.seed)
    trainer = Trainer(config, groups, build_components(config, groups))
    batch = trainer.rollout_and_score()
    results = {}
    for trim in (True, False):
        config.training.trim = trim
        plan = trainer.prune_and_plan(batch)
        loss_sum, num_tokens = trainer.forward_backward(batch, plan)
        grads = torch.cat(
            [p.main_grad.reshape(-1).clone() for p in trainer.student[0].parameters()]
        )
        results[trim] = (plan.num_kept_tokens, loss_sum, num_tokens, grads)
    (kept_t, loss_t, n_t, g_t), (kept_u, loss_u, n_u, g_u) = results[True], results[False]
    return {
        "kept": (kept_t, kept_u),
        "loss": (loss_t, loss_u),
        "num_tokens": (n_t, n_u),
        "max_grad_diff": float((g_t - g_u).abs().max()),
        "grad_scale": float(g_u.abs().max()),
    }


def test_trimming_gives_the_same_gradients_as_the_untrimmed_batch(tiny_run):
    root, overrides = tiny_run
    for layout in (_layout(2, 1), _layout(1, 2)):
        out = run_distributed(_trim_gradients, 2, [*overrides, *layout], timeout_s=300)
        for rank_out in out:
            kept_trimmed, kept_full = rank_out["kept"]
            assert kept_trimmed < kept_full, rank_out  # trimming really cut tokens
            assert rank_out["num_tokens"][0] == rank_out["num_tokens"][1]
            assert abs(rank_out["loss"][0] - rank_out["loss"][1]) < 1e-5
            assert rank_out["grad_scale"] > 0
            assert rank_out["max_grad_diff"] < 1e-5, rank_out


def _mini_batches(overrides):
    import torch

    from megatron_opd.distributed import init_distributed
    from megatron_opd.training.forward_step import make_forward_step
    from megatron_opd.training.setup import build_components
    from megatron_opd.training.trainer import Trainer

    config = _config(overrides)
    groups = init_distributed(config.parallel, seed=config.training.seed)
    trainer = Trainer(config, groups, build_components(config, groups))

    def grads():
        return torch.cat([p.main_grad.reshape(-1).clone() for p in trainer.student[0].parameters()])

    # Token-weighted mini-batch gradients at the same weights add up to the whole batch's.
    batch = trainer.rollout_and_score()
    full_plan = trainer.prune_and_plan(batch)
    full_loss, full_tokens = trainer.forward_backward(batch, full_plan)
    full = grads() * full_tokens
    # Several updates per step: the PPO old log-probs come from scoring; at the step's first
    # update they are the current ones, so the gradient equals the on-policy form's.
    assert trainer.updates_per_step > 1
    on_policy_step, trainer._forward_step = trainer._forward_step, make_forward_step(
        loss_config=config.loss, tp_group=groups.tp_group, vocab_size=trainer.c.vocab_size,
        is_last_stage=groups.is_last_stage, device=groups.platform.device, old_from_scoring=False,
    )  # fmt: skip
    trainer.forward_backward(batch, full_plan)
    on_policy = grads() * full_tokens
    trainer._forward_step = on_policy_step
    summed, covered = torch.zeros_like(full), []
    for rows, sub in trainer.split_mini_batches(batch, 2):
        loss_sum, num_tokens = trainer.forward_backward(sub, trainer.plan(sub))
        summed += grads() * num_tokens
        covered += rows.tolist()
    # A real step: 2 mini-batches x 2 epochs = 4 optimizer updates, 1 scheduler step.
    updates, real_step = [], trainer.optimizer.step

    def counted_step():
        updates.append(1)
        return real_step()

    trainer.optimizer.step = counted_step
    scheduler_before = trainer.scheduler.num_steps
    metrics = trainer.train_step()
    return {
        "rows": (sorted(covered), batch.batch_size),
        "max_diff": float((summed - full).abs().max()),
        "old_diff": float((on_policy - full).abs().max()),
        "scale": float(full.abs().max()),
        "updates": len(updates),
        "scheduler_steps": trainer.scheduler.num_steps - scheduler_before,
        "loss": metrics["loss"],
        "skipped": metrics["skipped"],
    }


def test_mini_batches_split_the_step_into_several_exact_updates(tiny_run):
    root, overrides = tiny_run
    run = [*overrides, "training.num_mini_batches=2", "training.num_epochs=2"]
    layouts = (_layout(2, 1), [*_layout(1, 2), "loss.id_set=union"], _layout(1, 1))  # DP=2
    for layout in layouts:
        for out in run_distributed(_mini_batches, 2, [*run, *layout], timeout_s=300):
            rows, batch_size = out["rows"]
            assert rows == list(range(batch_size)), out  # every sample once
            tolerance = 1e-5 * max(1.0, out["scale"])
            assert out["scale"] > 0 and out["max_diff"] < tolerance, out
            assert out["old_diff"] < 1e-4 * max(1.0, out["scale"]), out
            assert out["updates"] == 4 and out["scheduler_steps"] == 1, out
            assert out["skipped"] == 0.0 and out["loss"] == out["loss"], out


def test_stop_and_resume_equals_an_uninterrupted_run(tiny_run, tmp_path):
    root, overrides = tiny_run
    base = [*overrides, *_layout(2, 1), "training.num_steps=4"]
    full = run_distributed(
        _train, 2, [*base, f"checkpoint.save_dir={tmp_path / 'a'}", "checkpoint.save_interval=2"]
    )[0]
    first = run_distributed(
        _train, 2, [*base, "training.num_steps=2", f"checkpoint.save_dir={tmp_path / 'b'}"]
    )[0]
    # A run killed after step 2's checkpoint leaves a half-written step 3: it must be ignored.
    (tmp_path / "b" / ".tmp-step_00000003" / "model_optim").mkdir(parents=True)
    resumed = run_distributed(_train, 2, [*base, f"checkpoint.save_dir={tmp_path / 'b'}"])[0]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]  # history restored from checkpoint
    assert first == full[:2]
    for expected, got in zip(full[2:], resumed[2:]):
        for key in _COMPARED:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), (key, got)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "latest", "step_00000002", "step_00000004",
    ]  # fmt: skip


def _expect_error(overrides):
    try:
        _train(overrides)
    except ValueError as err:
        return str(err)
    return None


def test_user_errors_are_reported_before_training(tiny_run, tmp_path):
    root, overrides = tiny_run
    # A teacher with another tokenizer.
    other = tmp_path / "other_teacher"
    shutil.copytree(root / "teacher", other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 8
    (other / "config.json").write_text(json.dumps(config))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "Add: a=1 b=2", "answer": "3"}\n{not json\n')
    cases = {
        "vocab": [*overrides, f"teacher.path={other}"],
        "empty": [*overrides, f"data.train_path={empty}"],
        "broken": [*overrides, f"data.train_path={broken}"],
        "long_prompt": [*overrides, "data.max_prompt_length=4"],
        "context": [*overrides, "rollout.max_new_tokens=100000", "budget.max_len=100000"],
        "mini_batches": [*overrides, "training.num_mini_batches=3"],
    }
    messages = {name: run_distributed(_expect_error, 2, case)[0] for name, case in cases.items()}
    assert "vocab" in messages["vocab"].lower() and "teacher" in messages["vocab"].lower()
    assert str(empty) in messages["empty"]
    assert f"{broken}:2" in messages["broken"]
    assert "data.max_prompt_length" in messages["long_prompt"]
    assert "max_position_embeddings" in messages["context"]
    assert "training.num_mini_batches" in messages["mini_batches"]


def _engine_responses(overrides, problems):
    from megatron_opd.config.opd import EvalConfig
    from megatron_opd.conversion import load_model_weights
    from megatron_opd.data.tokenizer import load_tokenizer
    from megatron_opd.distributed import init_distributed
    from megatron_opd.models import build_model
    from megatron_opd.training.evaluation import make_generate_fn

    config = _config(overrides)
    groups = init_distributed(config.parallel, seed=0)
    chunks, info = build_model(config.teacher, groups, role="teacher")
    load_model_weights(chunks, config.teacher, info, groups)
    eval_config = EvalConfig(k=1, temperature=0.0, max_new_tokens=12)
    generate = make_generate_fn(
        chunks[0], load_tokenizer(config.teacher.path), groups, eval_config,
        vocab_size=info.vocab_size, batch_size=3,
    )  # fmt: skip
    return generate(problems)


def test_greedy_evaluation_generates_what_transformers_generates(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_opd.data.tokenizer import load_tokenizer

    root, overrides = tiny_run
    problems = [json.loads(line)["problem"] for line in open(root / "prompts.jsonl")][:6]
    tokenizer = load_tokenizer(root / "teacher")
    model = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32).eval()
    expected = []
    for problem in problems:
        ids = torch.tensor([tokenizer.encode_prompt(problem)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)  # fmt: skip
        expected.append(tokenizer.decode(out[0, ids.shape[1] :].tolist()))
    for layout in (_layout(2, 1), _layout(1, 1)):  # TP=2, then DP=2 (problems split)
        got = run_distributed(_engine_responses, 2, [*overrides, *layout], problems)
        assert got[0] == got[1] == expected


def _nan_losses(overrides):
    import torch

    from megatron_opd.checkpoint import find_latest_checkpoint
    from megatron_opd.distributed import init_distributed
    from megatron_opd.training.setup import build_components
    from megatron_opd.training.trainer import Trainer, TrainingStopped

    config = _config(overrides)
    groups = init_distributed(config.parallel, seed=config.training.seed)
    trainer = Trainer(config, groups, build_components(config, groups))
    before = [p.detach().clone() for p in trainer.student[0].parameters()]
    real_forward_backward = trainer.forward_backward
    calls, snapshot = [], []

    def poisoned(batch, plan):
        loss_sum, num_tokens = real_forward_backward(batch, plan)
        calls.append(loss_sum)
        if len(calls) == 2:  # the weights after the one good step
            snapshot.extend(p.detach().clone() for p in trainer.student[0].parameters())
        if len(calls) >= 2:  # step 1 is good, then the loss turns NaN
            return float("nan"), num_tokens
        return loss_sum, num_tokens

    trainer.forward_backward = poisoned
    try:
        trainer.train()
    except TrainingStopped as err:
        message = str(err)
    else:
        message = None
    after_good_step = find_latest_checkpoint(config.checkpoint.save_dir)
    final = list(trainer.student[0].parameters())
    changed = [not torch.equal(a, b) for a, b in zip(before, final)]
    return {
        "kept_good_state": all(torch.equal(a, b) for a, b in zip(snapshot, final)),
        "message": message,
        "skipped": [h["skipped"] for h in trainer.history],
        "checkpoint": after_good_step.name if after_good_step else None,
        "weights_changed": any(changed),
    }


def test_nan_losses_are_skipped_and_three_in_a_row_stop_with_a_checkpoint(tiny_run, tmp_path):
    root, overrides = tiny_run
    out = run_distributed(
        _nan_losses, 2,
        [*overrides, *_layout(2, 1), "training.num_steps=8", f"checkpoint.save_dir={tmp_path}"],
    )[0]  # fmt: skip
    assert out["message"] is not None and "3 steps in a row" in out["message"]
    assert out["skipped"] == [0.0, 1.0, 1.0, 1.0]
    assert out["checkpoint"] == "step_00000004"
    assert out["weights_changed"]  # the good first step did update the student
    assert out["kept_good_state"]  # the skipped steps did not


def _broadcast_hf_weights(overrides):
    from megatron_opd.conversion import load_model_weights
    from megatron_opd.conversion.export import broadcast_hf_weights
    from megatron_opd.distributed import init_distributed
    from megatron_opd.models import build_model

    config = _config(overrides)
    groups = init_distributed(config.parallel, seed=0)
    chunks, info = build_model(config.teacher, groups, role="teacher")
    load_model_weights(chunks, config.teacher, info, groups)
    return {name: tensor for name, tensor in broadcast_hf_weights(chunks, info, groups)}


def test_weights_for_an_external_engine_equal_the_hf_checkpoint(tiny_run):
    """What the vLLM engine receives on every rank (gathered over TP, broadcast over PP)
    is exactly the HF checkpoint the model was loaded from."""
    import torch
    from safetensors.torch import load_file

    root, overrides = tiny_run
    reference = load_file(root / "teacher" / "model.safetensors")
    for layout in (_layout(2, 1), _layout(1, 2)):
        for received in run_distributed(_broadcast_hf_weights, 2, [*overrides, *layout]):
            assert sorted(received) == sorted(reference)
            assert all(torch.equal(received[name], reference[name]) for name in reference)
