"""`megatron-opd demo --quick`, the README's first command in its smoke-test form, end to end:
assets, Prune-OPD and plain OPD under torchrun at TP=2, summary, curves, exported student."""

import json
import os
import subprocess
import sys

from PIL import Image


def test_quick_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "demo", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "student after Prune-OPD" in run.stdout and "tokens_generated" in run.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval_problems"] == 16
    accuracies = [
        "teacher_accuracy",
        "student_accuracy_before",
        "student_accuracy_after_prune_opd",
        "student_accuracy_after_plain_opd",
    ]
    for key in accuracies:
        assert 0.0 <= summary[key] <= 1.0
    for run_name in ("totals_prune_opd", "totals_plain_opd"):
        assert summary[run_name]["tokens_generated"] > 0
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size[0] > 800 and image.size[1] > 600
    exported = tmp_path / "prune_opd" / "student_hf"
    assert (exported / "config.json").exists() and (exported / "tokenizer.model").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(exported)  # a complete HF checkpoint
    history = json.loads((tmp_path / "prune_opd" / "report.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["loss"] == h["loss"] for h in history)  # finite
