"""Demo assets, tiny variant end to end: files, HF loading, tokenizer, cache, KV-cached greedy."""

import json
import os

import pytest
import torch

from megatron_opd.data.tokenizer import check_same_vocabulary, load_tokenizer
from megatron_opd.demo.assets import make_demo_assets
from megatron_opd.demo.hf_sft import generate_greedy


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_assets")
    return out, make_demo_assets(out, tiny=True, seed=0, show_progress=False)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_assets_load_and_round_trip(tiny_assets):
    from transformers import Qwen3ForCausalLM

    _, assets = tiny_assets
    train, held_out = _rows(assets.train_prompts), _rows(assets.eval_prompts)
    assert len(train) == 64 and len(held_out) == 16
    assert not {r["problem"] for r in train} & {r["problem"] for r in held_out}
    for row in held_out:  # answers agree with the problem's own terms
        terms = [int(t.split("=")[1]) for t in row["problem"].removeprefix("Add: ").split()]
        assert row["answer"] == str(sum(terms))
    tokenizer = check_same_vocabulary(assets.teacher_dir, assets.student_dir)
    assert check_same_vocabulary(assets.tokenizer_dir, assets.teacher_dir).vocab_size == (
        tokenizer.vocab_size
    )
    text = tokenizer.format_prompt(held_out[0]["problem"]) + held_out[0]["solution"]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    for directory, layers in ((assets.teacher_dir, 2), (assets.student_dir, 1)):
        assert (directory / "model.safetensors").is_file()
        model = Qwen3ForCausalLM.from_pretrained(directory)
        assert model.config.num_hidden_layers == layers
        assert model.config.vocab_size == tokenizer.vocab_size
        assert model.config.tie_word_embeddings
        assert model.config.eos_token_id == tokenizer.eos_id
    for report in (assets.teacher_report, assets.student_report):
        assert 0.0 <= report["accuracy"] <= 1.0 and report["steps"] >= 1


def test_kv_cached_greedy_matches_recomputation(tiny_assets):
    from transformers import Qwen3ForCausalLM

    _, assets = tiny_assets
    tokenizer = load_tokenizer(assets.teacher_dir)
    model = Qwen3ForCausalLM.from_pretrained(assets.teacher_dir).eval()
    problems = [r["problem"] for r in _rows(assets.eval_prompts)[:4]]
    problems[1] = problems[1] + " c=5"  # different prompt lengths exercise left padding
    cached = generate_greedy(model, tokenizer, problems, max_new_tokens=12, batch_size=4)
    for problem, response in zip(problems, cached):
        ids = tokenizer.encode_prompt(problem)
        generated = []
        with torch.no_grad():
            for _ in range(12):  # reference: one unpadded sequence, full forward per token
                logits = model(input_ids=torch.tensor([ids + generated])).logits[0, -1]
                token = int(logits.argmax())
                if token == tokenizer.eos_id:
                    break
                generated.append(token)
        assert response == tokenizer.decode(generated)


def test_cache_reuses_and_rebuilds_only_changed_parts(tiny_assets):
    out, assets = tiny_assets
    stamps = {
        p: os.stat(p / "model.safetensors").st_mtime_ns
        for p in (assets.teacher_dir, assets.student_dir)
    }
    again = make_demo_assets(out, tiny=True, seed=0, show_progress=False)
    assert again.teacher_report == assets.teacher_report
    assert {p: os.stat(p / "model.safetensors").st_mtime_ns for p in stamps} == stamps
    make_demo_assets(out, tiny=True, seed=0, show_progress=False, student_max_seconds=1.0)
    assert (
        os.stat(assets.teacher_dir / "model.safetensors").st_mtime_ns == stamps[assets.teacher_dir]
    )
    assert (
        os.stat(assets.student_dir / "model.safetensors").st_mtime_ns != stamps[assets.student_dir]
    )
    with pytest.raises(ValueError, match="unknown setting"):
        make_demo_assets(out, tiny=True, teacher_seconds=3)


@pytest.mark.slow
def test_full_demo_assets_reach_targets(tmp_path):
    assets = make_demo_assets(tmp_path, seed=0, show_progress=False)
    assert assets.teacher_report["accuracy"] >= 0.9
    assert 0.0 < assets.student_report["accuracy"] < assets.teacher_report["accuracy"]


def test_thread_probe_keeps_the_faster_count():
    from megatron_opd.demo.hf_sft import _ThreadProbe

    previous = torch.get_num_threads()
    try:
        for timings, expected in (
            ([1.0, 5.0], 2),
            ([9.0, 1.0], 1),
            ([1.1, 1.5, 1.2, 1.0], 1),
            ([1.0, 1.5, 1.2, 1.3], 2),
        ):
            torch.set_num_threads(2)
            probe = _ThreadProbe()
            step = 1
            for seconds in timings:  # step indices 1, 2, ... alternate 2 threads and 1
                probe.before_step(step)
                assert torch.get_num_threads() == (2 if step % 2 else 1)
                probe.after_step(step + 1, seconds)
                step += 1
            assert probe.done and torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(previous)


def test_weak_teacher_warns():
    from megatron_opd.demo.assets import DemoAssetSettings, _warn_if_weak

    settings = DemoAssetSettings()
    with pytest.warns(RuntimeWarning, match="below teacher_target_accuracy"):
        _warn_if_weak({"accuracy": 0.5, "steps": 10}, {"accuracy": 0.1}, settings)
    with pytest.warns(RuntimeWarning, match="not worse than the teacher"):
        _warn_if_weak({"accuracy": 0.95, "steps": 10}, {"accuracy": 0.95}, settings)


def test_tiny_cpu_recipe_paths_are_where_the_demo_writes(tiny_assets):
    from pathlib import Path

    from megatron_opd.config.loader import load_config
    from megatron_opd.config.opd import OPDConfig

    out, assets = tiny_assets
    recipe = load_config(OPDConfig, Path(__file__).resolve().parents[1] / "examples/tiny_cpu.yaml")
    # `megatron-opd demo` builds its assets in demo_out/assets (demo/run.py).
    for configured, built in (
        (recipe.student.path, assets.student_dir),
        (recipe.teacher.path, assets.teacher_dir),
        (recipe.data.train_path, assets.train_prompts),
        (recipe.eval.datasets[0], assets.eval_prompts),
    ):
        assert Path(configured).relative_to("demo_out/assets") == built.relative_to(out)
        assert built.exists()


def test_step_counted_sft_gives_the_same_models_on_every_build(tmp_path):
    """Counting optimizer steps (the full demo's default) makes the build reproducible:
    two builds from the same seed write bit-identical models, evaluated at the same steps."""
    steps = dict(
        teacher_max_steps=24, teacher_eval_every_steps=8, teacher_min_eval_steps=8,
        student_max_steps=12, student_eval_every_steps=6, student_min_eval_steps=6,
        teacher_target_accuracy=1.0, student_min_accuracy=1.0,  # not reached: run them all
        teacher_max_seconds=600.0, student_max_seconds=600.0,
    )  # fmt: skip
    builds = [
        make_demo_assets(tmp_path / name, tiny=True, seed=3, show_progress=False, **steps)
        for name in ("a", "b")
    ]
    for role, max_steps, evals in (("teacher", 24, [8, 16, 24]), ("student", 12, [6, 12])):
        reports = [getattr(b, f"{role}_report") for b in builds]
        assert [r["steps"] for r in reports] == [max_steps, max_steps]
        assert [h["step"] for h in reports[0]["history"]] == evals
        files = [(getattr(b, f"{role}_dir") / "model.safetensors").read_bytes() for b in builds]
        assert files[0] == files[1]
