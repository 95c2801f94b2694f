"""The payoff benchmark: its analysis on hand-worked cases, its bad-input errors, and a smoke
run of the whole script (bench/reproduce.py --quick)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.demo.arms import ARMS, arm_config, base_config, check_arms
from megatron_opd.demo.payoff import (
    Curve,
    mean_curve,
    mechanism_savings,
    payoff_summary,
    standard_error,
    time_to_accuracy,
)

ROOT = Path(__file__).resolve().parents[1]


def _report(step_seconds, accuracies, eval_every):
    history = [{"step": i + 1, "time_step_s": t, "time_step_wall_s": t}
               for i, t in enumerate(step_seconds)]  # fmt: skip
    during = [{"step": s, "pass@1": accuracies[s // eval_every]}
              for s in range(eval_every, len(step_seconds) + 1, eval_every)]  # fmt: skip
    return {
        "history": history,
        "evals": {
            "student_before": {"pass@1": accuracies[0]},
            "student_after": {"pass@1": accuracies[-1]},
        },  # fmt: skip
        "evals_during": during,
    }


def test_curves_and_time_to_accuracy_hand_worked():
    # Two seeds, 4 steps of 1 s / 3 s, evaluated every 2 steps.
    a = _report([1, 1, 1, 1], [0.1, 0.3, 0.5], 2)
    b = _report([3, 3, 3, 3], [0.1, 0.5, 0.7], 2)
    curve = mean_curve([a, b])
    assert curve.steps == [0, 2, 4]
    assert curve.seconds == [0.0, 4.0, 8.0]  # (2 + 6) / 2, (4 + 12) / 2
    assert curve.accuracy == pytest.approx([0.1, 0.4, 0.6])
    assert curve.spread == pytest.approx([0.0, 0.1, 0.1])
    assert time_to_accuracy(curve, 0.4) == (2, 4.0)
    assert time_to_accuracy(curve, 0.61) is None
    assert standard_error(0.5, 100) == pytest.approx(0.05)


def test_payoff_summary_ratios_hand_worked():
    plain = Curve(steps=[0, 10, 20], seconds=[0, 100, 200], accuracy=[0.1, 0.4, 0.5],
                  spread=[0, 0, 0])  # fmt: skip
    fast = Curve(steps=[0, 10, 20], seconds=[0, 30, 60], accuracy=[0.1, 0.47, 0.52],
                 spread=[0, 0, 0])  # fmt: skip
    summary = payoff_summary({"plain": plain, "fast": fast}, "plain", 100)
    se = math.sqrt(0.5 * 0.5 / 100)  # 0.05
    assert summary["target_accuracy"] == pytest.approx(0.5 - se)
    # plain reaches 0.45 only at its last point; fast at its first point after start.
    assert summary["plain"]["reaches_target_seconds"] == 200
    assert summary["fast"]["reaches_target_at_step"] == 10
    assert summary["fast"]["reach_ratio_vs_baseline_total"] == pytest.approx(0.15)
    assert summary["fast"]["reach_ratio_vs_baseline_reach"] == pytest.approx(0.15)
    assert summary["fast"]["time_ratio_total"] == pytest.approx(0.3)
    assert summary["fast"]["equal_accuracy"]


def test_mechanism_savings_hand_worked():
    # Columns: length, hit_cap, first_drift, num_drift, after_zero, stopped_early, stop_pos.
    plain = {"steps": [{"step": 1, "rows": [[100, 0, 5, 6, 0, 0, -1], [80, 0, -1, 0, 0, 0, -1],
                                            [50, 0, 3, 1, 0, 0, -1]]}]}  # fmt: skip
    pruned = {"steps": [{"step": 1, "rows": [[48, 0, 5, 5, 0, 1, 40], [64, 1, -1, 0, 0, 0, -1],
                                             [60, 0, 3, 1, 0, 0, -1]]}]}  # fmt: skip
    out = mechanism_savings(pruned, plain)
    assert out["stop"] == 52 and out["samples_stopped"] == 1
    assert out["budget"] == 16 and out["samples_at_budget"] == 1
    assert out["total"] == 100 + 80 + 50 - (48 + 64 + 60)
    with pytest.raises(ValueError, match="same data seed"):
        mechanism_savings(pruned, {"steps": [{"step": 1, "rows": plain["steps"][0]["rows"][:2]}]})


def test_arms_change_only_the_method(tmp_path):
    class Assets:
        student_dir = teacher_dir = train_prompts = eval_prompts = tmp_path

    base = base_config(Assets, tmp_path, seed=3, steps=10, max_new_tokens=320, eval_every=5,
                       eval_problems=600)  # fmt: skip
    assert (base["budget"]["init_len"], base["budget"]["step"]) == (64, 8)
    configs = {arm: arm_config(base, arm, pg_lr=1e-4) for arm in ARMS}
    plain, truncate = configs["plain"], configs["truncate"]
    assert not plain["prune"]["enable"] and not plain["budget"]["enable"]
    assert truncate["prune"]["mode"] == "truncate" and truncate["rollout"]["chunk_size"] == 16
    assert configs["released"]["prune"]["mode"] == "released"
    assert configs["released"]["rollout"]["chunk_size"] == 0
    pg = configs["release_pg"]
    assert pg["loss"]["kind"] == "topk_reverse_kl_pg" and pg["prune"]["top_k"] == 16
    assert pg["training"]["num_mini_batches"] == 1 and pg["training"]["lr"] == 1e-4
    assert configs["plain_fkl"]["loss"]["kind"] == "forward_topk_kl"
    assert configs["plain_fkl"]["training"]["lr"] == 1e-4
    stop = configs["stop_trim"]
    assert stop["prune"]["mode"] == "truncate" and not stop["budget"]["enable"]
    assert configs["truncate"]["budget"]["enable"] and configs["released"]["budget"]["enable"]
    for config in configs.values():  # same data, seeds and evaluation everywhere
        assert config["data"] == base["data"] and config["eval"] == base["eval"]
        assert config["rollout"]["seed"] == base["rollout"]["seed"]
    with pytest.raises(ValueError, match="unknown arm"):
        check_arms(["plain", "prune"])


def _reproduce(*args, tmp_path=None, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arms", "plain,fastest"], "--arms: unknown arm(s) ['fastest']"),
        (["--seeds"], "--seeds is empty"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "5", "--eval-every", "2"], "must be a multiple of --eval-every"),
    ],
)
def test_bad_input_is_one_line_before_any_work(tmp_path, args, message):
    result = _reproduce("--out", str(tmp_path / "out"), *args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "out" / "assets").exists()


def test_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _reproduce("--out", str(blocker / "sub"), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --out") and "cannot be written" in result.stderr


def test_quick_run_of_the_whole_script(tmp_path):
    out = tmp_path / "reproduce"
    arms = "plain,released,truncate,release_pg"
    result = _reproduce("--quick", "--out", str(out), "--arms", arms, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"plain", "released", "truncate", "release_pg"}
    for name in ("accuracy_vs_time.png", "lengths_budget.png", "time_breakdown.png",
                 "regime.png", "results.md"):  # fmt: skip
        assert (out / name).stat().st_size > 0
    arms = results["arms"]
    # The mechanisms fired: truncate stopped samples and trimmed tokens; plain did neither.
    assert arms["truncate"]["mean_totals"]["samples_truncated"] > 0
    assert arms["plain"]["mean_totals"]["samples_stopped"] == 0
    assert arms["plain"]["mean_totals"]["tokens_trimmed"] == 0
    # The budget started at its floor: the pruned arms generated fewer tokens than plain.
    assert arms["released"]["ratios_vs_baseline"]["tokens_generated"] < 1.0
    assert results["release_pg_lr"] == 1e-4 and results["release_pg_sweep"]
    assert "| (a) plain OPD" in (out / "results.md").read_text()
