"""``megatron-opd demo``: Prune-OPD end to end on CPU in minutes, nothing downloaded.

1. Assets (cached under ``--out``): the built-in chain-sum reasoning task (multi-step
   arithmetic, worked step-by-step solutions, boxed answers), a SentencePiece tokenizer
   trained on it, a teacher trained by SFT until it solves >= 90 % of held-out problems,
   and a smaller student SFT'd only briefly (visibly worse).
2. Prune-OPD at TP=2 across two processes (torchrun), ``prune.mode=truncate``: chunked
   rollouts scored by the teacher as they are generated, each response ending at its stop
   point (the 5th drift event) with the online stop, drift weights, the dynamic budget,
   trimmed training. The teacher and the untrained student are evaluated first.
3. The same number of steps of plain OPD (no weights, no budget, no early stop): the
   reference for the tokens Prune-OPD saved.
4. A summary on the console, ``summary.json`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

_DEMO_STEPS = 32


def demo_config(assets, out: Path, *, steps: int, pruned: bool) -> dict:
    """The OPD config of one demo run (``pruned=False``: the plain-OPD reference)."""
    name = "prune_opd" if pruned else "plain_opd"
    config = {
        "student": {"path": str(assets.student_dir), "transformer_impl": "local"},
        "teacher": {"path": str(assets.teacher_dir), "transformer_impl": "local"},
        "parallel": {"tensor_parallel_size": 2, "timeout_seconds": 300},
        "data": {
            "train_path": str(assets.train_prompts),
            "max_prompt_length": 64,
            "prompts_per_step": 16,
        },
        "rollout": {"n_samples_per_prompt": 4, "max_new_tokens": 128, "chunk_size": 16},
        # A drift event is a sampled token outside the teacher's 90 % top-p set: the tiny
        # teacher is near-certain at almost every position, so the ids ranked 2..K of both
        # models are noise and the top-K overlap flags ~20 % of tokens where the two agree.
        # Weights reach 0 at the 5th event: in truncate mode the response ends there (the
        # online stop ends its generation, trimming cuts the rest of its last chunk); before
        # it, the release's w + w_base.
        "prune": {
            "mode": "truncate",
            "metric": "teacher_top_p_accept",
            "threshold": 0.9,
            "top_k": 4,
            "w_drop": 0.2,
            "w_base": 0.5,
        },  # fmt: skip
        # As released, the budget starts at its floor and grows only when >= 10 % of the
        # samples' reliable lengths reach it: 64 tokens covers the 4-5 term solutions
        # (35-50 tokens), the 8-term ones need ~83.
        "budget": {"init_len": 64, "min_len": 64, "max_len": 128, "step": 8, "margin": 8},
        # Forward KL over the teacher's top-K (+ tail bucket). The release's top-K
        # reverse-KL policy gradient (loss.kind=topk_reverse_kl_pg) collapsed this tiny
        # student at every learning rate fast enough to matter here, and so did an
        # independent single-process implementation of it; see README.
        "loss": {"kind": "forward_topk_kl"},
        "training": {
            "num_steps": steps,
            # Cosine decay to 1/10: the last steps settle instead of jumping around (a
            # constant 2e-3 ended anywhere between 18 % and 39 % on the same assets).
            "lr": 2e-3,
            "min_lr": 2e-4,
            "lr_decay_style": "cosine",
            # 64 samples per step in 8 mini-batches: 8 optimizer updates per rollout (the
            # rollout is ~3/4 of a step's time on CPU, an update ~1/40).
            "num_mini_batches": 8,
            "micro_batch_tokens": 4096,
            "max_micro_batch_rows": 32,
        },  # fmt: skip
        "checkpoint": {
            "save_dir": str(out / name / "checkpoints"),
            "save_interval": 0,
            "keep_last": 1,
        },  # fmt: skip
        "logging": {"log_dir": str(out / name / "logs"), "progress_bar": True},
        "eval": {
            "datasets": [str(assets.eval_prompts)],
            "k": 1,
            "temperature": 0.0,
            "max_new_tokens": 128,
            "max_problems": 200,
            "interval": 16,  # the accuracy curve (plus before and after)
        },  # fmt: skip
    }
    if not pruned:
        config["prune"]["enable"] = False
        config["budget"]["enable"] = False
        config["rollout"]["chunk_size"] = 0
        config["checkpoint"]["export_hf_dir"] = None
    else:
        config["checkpoint"]["export_hf_dir"] = str(out / name / "student_hf")
    return config


def _launch(config: dict, run_dir: Path, *, eval_before: bool) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in (run_dir / "checkpoints", run_dir / "student_hf", run_dir / "logs"):
        if stale.exists():
            import shutil

            shutil.rmtree(stale)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    report = run_dir / "report.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "megatron_opd.demo.distill", "--config", str(config_path), "--report", str(report),
        "--samples",
    ]  # fmt: skip
    if eval_before:
        command += ["--eval-before", "--eval-teacher"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise SystemExit(
            f"demo: the distillation run in {run_dir} failed (exit {result.returncode})"
        )
    return json.loads(report.read_text())


def _totals(history: list[dict]) -> dict:
    keys = ("tokens_generated", "tokens_scored", "tokens_trained", "tokens_trimmed",
            "samples_stopped", "samples_truncated", "time_rollout_s", "time_score_s",
            "time_train_s", "time_step_s")  # fmt: skip
    return {k: sum(h.get(k, 0.0) for h in history) for k in keys}


def _plot(pruned: dict, plain: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 7.5))
    series = (("Prune-OPD", pruned["history"], "tab:blue"),
              ("plain OPD", plain["history"], "tab:gray"))  # fmt: skip
    panels = (
        (axes[0, 0], "reverse_kl_topk", "reverse KL to teacher (student top-K)"),
        (axes[0, 1], "bad_event_rate", "drift events per response token"),
    )
    for ax, key, title in panels:
        for label, history, color in series:
            ax.plot([h["step"] for h in history], [h[key] for h in history], label=label,
                    color=color)  # fmt: skip
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    cumulative = (
        (axes[1, 0], "tokens_generated", "tokens generated, cumulative"),
        (axes[1, 2], "time_step_s", "step time (rollout + score + train), cumulative s"),
    )
    for ax, key, title in cumulative:
        for label, history, color in series:
            totals = list(itertools.accumulate(h[key] for h in history))
            ax.plot([h["step"] for h in history], totals, label=label, color=color)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    ax = axes[0, 2]
    before = pruned["evals"]["student_before"]["pass@1"]
    for label, report, color in (("Prune-OPD", pruned, "tab:blue"),
                                 ("plain OPD", plain, "tab:gray")):  # fmt: skip
        points = [(0, before)]
        points += [(e["step"], e["pass@1"]) for e in report.get("evals_during", [])]
        points.append((report["history"][-1]["step"], report["evals"]["student_after"]["pass@1"]))
        ax.plot(*zip(*points), marker="o", label=label, color=color)
    ax.axhline(pruned["evals"]["teacher"]["pass@1"], color="tab:green", ls="--", label="teacher")
    ax.set_title("student held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    steps = [h["step"] for h in pruned["history"]]
    ax = axes[1, 1]
    ax.plot(steps, [h["budget"] for h in pruned["history"]], label="response budget")
    ax.plot(steps, [h["effective_length_mean"] for h in pruned["history"]],
            label="mean effective length")  # fmt: skip
    ax.set_title("Prune-OPD budget and effective length")
    ax.set_xlabel("step")
    ax.legend()
    evals = pruned["evals"]
    fig.suptitle(
        "megatron-opd demo: teacher {:.0%}, student {:.0%} -> {:.0%} (Prune-OPD), "
        "{:.0%} (plain OPD)".format(
            evals["teacher"]["pass@1"],
            evals["student_before"]["pass@1"],
            evals["student_after"]["pass@1"],
            plain["evals"]["student_after"]["pass@1"],
        )  # fmt: skip
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run the demo; see the module docstring."""
    parser = argparse.ArgumentParser(prog="megatron-opd demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out", help="output directory (cached assets)")
    parser.add_argument("--steps", type=int, default=_DEMO_STEPS, help="distillation steps")
    parser.add_argument(
        "--quick", action="store_true", help="tiny assets, 4 steps: a smoke test only"
    )
    args = parser.parse_args(argv)
    from megatron_opd.demo.assets import make_demo_assets
    from megatron_opd.demo.payoff import mechanism_savings

    out = Path(args.out).resolve()
    steps = 4 if args.quick else args.steps
    phases: dict[str, float] = {}
    t = time.perf_counter()
    print(f"[demo] 1/3 building assets in {out / 'assets'} (cached after the first run)")
    assets = make_demo_assets(out / "assets", tiny=args.quick)
    phases["assets (tokenizer, teacher SFT, student SFT)"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[demo] 2/3 Prune-OPD, {steps} steps at TP=2 on 2 processes")
    pruned = _launch(demo_config(assets, out, steps=steps, pruned=True), out / "prune_opd",
                     eval_before=True)  # fmt: skip
    phases["Prune-OPD run (incl. evaluations)"] = time.perf_counter() - t
    t = time.perf_counter()
    print(f"[demo] 3/3 plain OPD reference, {steps} steps")
    plain = _launch(demo_config(assets, out, steps=steps, pruned=False), out / "plain_opd",
                    eval_before=False)  # fmt: skip
    phases["plain OPD run (incl. evaluation)"] = time.perf_counter() - t

    totals_pruned, totals_plain = _totals(pruned["history"]), _totals(plain["history"])
    saved = {
        k: 1.0 - totals_pruned[k] / totals_plain[k] if totals_plain[k] else 0.0
        for k in totals_plain
    }
    evals = pruned["evals"]

    def kl_start_end(history):
        values = [h["reverse_kl_topk"] for h in history]
        head = values[: max(1, len(values) // 5)]
        tail = values[-max(1, len(values) // 5) :]
        return sum(head) / len(head), sum(tail) / len(tail)

    summary = {
        "reverse_kl_topk_first_to_last_fifth": {
            "prune_opd": kl_start_end(pruned["history"]),
            "plain_opd": kl_start_end(plain["history"]),
        },
        "teacher_accuracy": evals["teacher"]["pass@1"],
        "student_accuracy_before": evals["student_before"]["pass@1"],
        "student_accuracy_after_prune_opd": evals["student_after"]["pass@1"],
        "student_accuracy_after_plain_opd": plain["evals"]["student_after"]["pass@1"],
        "eval_problems": evals["teacher"]["num_problems"],
        "steps": steps,
        "totals_prune_opd": totals_pruned,
        "totals_plain_opd": totals_plain,
        "saved_fraction": saved,
        "mechanisms": mechanism_savings(pruned["samples"], plain["samples"]),
        "wall_time_s": phases,
        "run_times_s": {"prune_opd": pruned["times"], "plain_opd": plain["times"]},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _plot(pruned, plain, out / "curves.png")

    print("\n=== megatron-opd demo: Prune-OPD on the chain-sum task (CPU, TP=2) ===")
    print(f"held-out problems: {summary['eval_problems']} (greedy, graded with math-verify)")
    print(f"  teacher accuracy                 {summary['teacher_accuracy']:6.1%}")
    print(f"  student before distillation      {summary['student_accuracy_before']:6.1%}")
    print(f"  student after Prune-OPD          {summary['student_accuracy_after_prune_opd']:6.1%}")
    print(f"  student after plain OPD          {summary['student_accuracy_after_plain_opd']:6.1%}")
    for run, (first, last) in summary["reverse_kl_topk_first_to_last_fifth"].items():
        print(f"  reverse KL to teacher ({run}): {first:.3f} -> {last:.3f} (first -> last fifth)")
    print(f"tokens over {steps} steps        Prune-OPD    plain OPD    saved")
    for key in ("tokens_generated", "tokens_scored", "tokens_trained"):
        print(f"  {key:<24} {totals_pruned[key]:>10.0f}   {totals_plain[key]:>10.0f}   "
              f"{saved[key]:6.1%}")  # fmt: skip
    print(f"step time (rollout+score+train)  {totals_pruned['time_step_s']:8.1f} s "
          f"{totals_plain['time_step_s']:8.1f} s   {saved['time_step_s']:6.1%}")  # fmt: skip
    m = summary["mechanisms"]
    print("what each Prune-OPD mechanism did (tokens saved: vs plain OPD's response to the same "
          "prompt at the same step):")  # fmt: skip
    print(f"  online stop: {m['samples_stopped']:.0f} samples stopped early, "
          f"~{m['stop']:.0f} tokens not generated")  # fmt: skip
    print(f"  budget:      {m['samples_at_budget']:.0f} samples ended at the budget, "
          f"~{m['budget']:.0f} tokens not generated")  # fmt: skip
    print(f"  trimming:    {totals_pruned['tokens_trimmed']:.0f} generated tokens after stop "
          "points cut from training")  # fmt: skip
    print("wall time per phase:")
    for name, seconds in phases.items():
        print(f"  {name:<44} {seconds:7.1f} s")
    print(f"curves: {out / 'curves.png'}   summary: {out / 'summary.json'}")
    print(f"distilled student (HF format): {out / 'prune_opd' / 'student_hf'}")


if __name__ == "__main__":
    main()
