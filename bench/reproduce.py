"""Does Prune-OPD save training time at equal accuracy? Plain OPD vs Prune-OPD, side by side.

    python bench/reproduce.py                      # full run (2 CPU cores: see docs/results.md)
    python bench/reproduce.py --quick              # ~1-2 min smoke run of the whole script
    python bench/reproduce.py --arms plain,truncate --seeds 0 --steps 20

What it does, in one run:

1. Builds (once, cached under ``--out/assets``; not counted) the long-horizon countdown
   task (:mod:`megatron_opd.data.countdown_task`: 118-286-token worked solutions), a
   2-layer teacher that solves >= 90 % of held-out problems and a weaker student.
2. Trains the same student from the same start with the same prompts and seeds in every
   arm (:mod:`megatron_opd.demo.arms`): (a) plain OPD at a fixed maximum length,
   (b) Prune-OPD as released (weights + dynamic budget), (c) Prune-OPD with the online
   stop and trimming (``prune.mode=truncate``), (d) (b) with the release's policy-gradient
   loss at a learning rate picked by a small sweep, and the forward-KL variants of (a)
   and (c). Each run is one single-thread process (``--jobs`` of them side by side).
3. Measures per arm and seed: wall time per phase (rollout, teacher scoring, training),
   tokens generated / scored / trained, samples stopped early, tokens trimmed, greedy
   held-out accuracy (``--eval-problems`` problems, standard error) every
   ``--eval-every`` steps, outside the training clock.
4. Prints and writes (``--out``): ``results.json``, ``results.md`` (the table), and plots:
   ``accuracy_vs_time.png``, ``lengths_budget.png``, ``time_breakdown.png``,
   ``regime.png`` (response lengths, where the first drift event falls, tokens after the
   weight reached 0).

Targets (issue "Prove the payoff"): (c) reaches (a)'s final accuracy (within one standard
error) in <= 40 % of (a)'s wall time; (b) saves 37.6-68 % of (a)'s time at equal accuracy.
The script prints whether each is met and, when not, by how much.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_opd.demo.arms import ARMS

QUICK = {"steps": 2, "eval_every": 2, "eval_problems": 16, "max_new_tokens": 48,
         "sweep_steps": 2, "prompts_per_step": 4}  # fmt: skip
FULL = {"steps": 100, "eval_every": 10, "eval_problems": 600, "max_new_tokens": 320,
        "sweep_steps": 40, "prompts_per_step": 16}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="bench_out/reproduce", help="output folder (cached assets)"
    )
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="comma-separated arms (megatron_opd/demo/arms.py)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="run seeds (default 0 1; --quick: 0)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations")
    parser.add_argument("--eval-problems", type=int, help="held-out problems per evaluation")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (1 thread each)")
    parser.add_argument("--pg-lrs", default=None,
                        help="learning rates of the release_pg sweep, one seed "
                        "(default 1e-4,3e-4,1e-3; --quick: 1e-4)")  # fmt: skip
    parser.add_argument("--pg-lr", type=float, help="skip the sweep: use this release_pg lr")
    parser.add_argument("--quick", action="store_true", help="tiny models and runs: a smoke test")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args) -> tuple[list[str], dict, Path, list[float]]:
    """Everything a user can get wrong, before any work: one line each."""
    from megatron_opd.demo.arms import check_arms

    try:
        arms = check_arms(args.arms.split(","))
    except ValueError as err:
        fail(f"--arms: {err}")
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    if args.pg_lrs is None:
        args.pg_lrs = "1e-4" if args.quick else "1e-4,3e-4,1e-3"
    if not args.seeds:
        fail("--seeds is empty; give at least one seed, e.g. --seeds 0 1")
    if len(set(args.seeds)) != len(args.seeds):
        fail(f"--seeds has repeats: {args.seeds}")
    sizes = dict(QUICK if args.quick else FULL)
    for name in ("steps", "eval_every", "eval_problems"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            sizes[name] = value
    if args.steps is not None and args.eval_every is None:
        sizes["eval_every"] = max(1, min(sizes["eval_every"], args.steps))
    if sizes["steps"] % sizes["eval_every"]:
        fail(
            f"--steps ({sizes['steps']}) must be a multiple of --eval-every ({sizes['eval_every']})"
        )
    if args.jobs < 1:
        fail(f"--jobs must be >= 1, got {args.jobs}")
    try:
        pg_lrs = [float(x) for x in args.pg_lrs.split(",") if x.strip()]
    except ValueError:
        fail(f"--pg-lrs must be comma-separated numbers, got {args.pg_lrs!r}")
    if "release_pg" in arms and args.pg_lr is None and not pg_lrs:
        fail("--pg-lrs is empty and no --pg-lr is given: the release_pg arm needs a lr")
    out = Path(args.out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        fail(f"--out {out} cannot be written ({err.strerror}); pick another folder")
    return arms, sizes, out, pg_lrs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Job:
    name: str
    """``arm/seed_N`` or ``sweep/lr_X``."""
    arm: str
    seed: int
    run_dir: Path
    config: dict | None = None
    needs_pg_lr: bool = False
    process: subprocess.Popen | None = None
    started: float = 0.0


def launch(job: Job) -> None:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "config.yaml").write_text(yaml.safe_dump(job.config, sort_keys=False))
    command = [
        sys.executable, "-m", "megatron_opd.demo.distill", "--config",
        str(job.run_dir / "config.yaml"), "--report", str(job.run_dir / "report.json"),
        "--samples", "--eval-before",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    log = open(job.run_dir / "run.log", "w")  # noqa: SIM115 - closed when the run ends
    job.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    job.started = time.perf_counter()


def run_all(waves: list[list[Job]], *, on_done) -> None:
    """Run each wave's jobs side by side, one wave after the other; a bar with ETA.

    A wave holds the seeds of one arm, so every run is timed next to a copy of itself:
    two single-thread processes share the caches and memory bandwidth of the machine, and
    with mixed partners a run's training time per token moved by up to ~35 % with its
    neighbour's load (measured in a pilot)."""
    from tqdm import tqdm

    total = sum(len(w) for w in waves)
    with tqdm(total=total, desc="runs", unit="run", dynamic_ncols=True) as bar:
        for wave in waves:
            if any(j.needs_pg_lr for j in wave):
                fail("internal: release_pg runs wait for a sweep that has not finished")
            for job in wave:
                launch(job)
            bar.set_postfix_str(", ".join(j.name for j in wave))
            running = list(wave)
            while running:
                time.sleep(0.5)
                for job in [j for j in running if j.process.poll() is not None]:
                    running.remove(job)
                    seconds = time.perf_counter() - job.started
                    if job.process.returncode != 0:
                        for j in running:
                            j.process.kill()
                        tail = (job.run_dir / "run.log").read_text().splitlines()[-15:]
                        fail(f"run {job.name} failed (exit {job.process.returncode}); its log "
                             f"{job.run_dir / 'run.log'} ends:\n" + "\n".join(tail))  # fmt: skip
                    bar.write(f"  done {job.name} in {seconds:.0f} s")
                    bar.update(1)
                    on_done(job)


def load_report(job: Job) -> dict:
    return json.loads((job.run_dir / "report.json").read_text())


def regime(reports: list[dict], cap: int) -> dict:
    """The task's regime from per-sample tables: lengths, where drift starts, tokens after
    the weight reached 0 (first step, last step, all steps)."""
    import torch

    from megatron_opd.training.rollout_stats import COLUMNS

    col = {name: i for i, name in enumerate(COLUMNS)}

    def describe(rows: list[list[int]]) -> dict:
        table = torch.tensor(rows, dtype=torch.float64)
        lengths = table[:, col["response_length"]]
        first = table[:, col["first_drift"]]
        drifted = first >= 0
        where = first[drifted] / lengths[drifted].clamp(min=1)
        q = lambda x, p: float(torch.quantile(x, p)) if x.numel() else float("nan")  # noqa: E731
        return {
            "samples": int(table.shape[0]),
            "length_p10_p50_p90_max": [
                q(lengths, 0.1),
                q(lengths, 0.5),
                q(lengths, 0.9),
                float(lengths.max()),
            ],  # fmt: skip
            "at_cap_fraction": float(table[:, col["hit_cap"]].mean()),
            "with_drift_fraction": float(drifted.double().mean()),
            "first_drift_fraction_p25_p50_p75": [q(where, 0.25), q(where, 0.5), q(where, 0.75)],
            "first_drift_in_first_10pct": float((where < 0.1).double().mean())
            if where.numel()
            else 0.0,
            "tokens_after_weight_zero_fraction": float(
                table[:, col["after_weight_zero"]].sum() / lengths.sum().clamp(min=1)
            ),
        }

    steps = [s for r in reports for s in r["samples"]["steps"]]
    first_step = min(s["step"] for s in steps)
    last_step = max(s["step"] for s in steps)
    return {
        "cap": cap,
        "first_step": describe(
            [row for s in steps if s["step"] == first_step for row in s["rows"]]
        ),
        "last_step": describe([row for s in steps if s["step"] == last_step for row in s["rows"]]),
        "all_steps": describe([row for s in steps for row in s["rows"]]),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    arms, sizes, out, pg_lrs = check_args(args)

    from megatron_opd.demo.arms import ARM_TITLES, arm_config, base_config
    from megatron_opd.demo.assets import long_task_settings, make_demo_assets
    from megatron_opd.demo.payoff import mean_curve, payoff_summary, totals

    started = time.perf_counter()
    print(f"[reproduce] assets in {out / 'assets'} (built once, cached; not timed)")
    assets = make_demo_assets(out / "assets", settings=long_task_settings(0, quick=args.quick))
    teacher, student = assets.teacher_report, assets.student_report
    print(f"[reproduce] teacher {teacher['accuracy']:.1%} / student {student['accuracy']:.1%} "
          f"on {teacher.get('check_problems', '?')} held-out problems (SFT check)")  # fmt: skip
    assets_s = time.perf_counter() - started

    def config_for(arm: str, seed: int, run_dir: Path, steps: int, pg_lr=None) -> dict:
        base = base_config(assets, run_dir, seed=seed, steps=steps,
                           max_new_tokens=sizes["max_new_tokens"],
                           eval_every=min(sizes["eval_every"], steps),
                           eval_problems=sizes["eval_problems"],
                           prompts_per_step=sizes["prompts_per_step"])  # fmt: skip
        return arm_config(base, arm, pg_lr=pg_lr)

    jobs: list[Job] = []
    waves: list[list[Job]] = []
    sweep: dict[float, Job] = {}
    pg_lr = args.pg_lr
    if "release_pg" in arms and pg_lr is None:
        for lr in pg_lrs:
            run_dir = out / "sweep" / f"lr_{lr:g}"
            job = Job(name=f"sweep/lr_{lr:g}", arm="release_pg", seed=args.seeds[0],
                      run_dir=run_dir)  # fmt: skip
            job.config = config_for("release_pg", args.seeds[0], run_dir, sizes["sweep_steps"], lr)
            sweep[lr] = job
        # One wave: only the sweep's final accuracies are used, never its times, so its
        # runs may share the cores (3 runs in one wave instead of 2 + 1 saves ~1.5 min).
        waves.append(list(sweep.values()))
    # release_pg last: it needs the sweep's learning rate.
    for arm in sorted(arms, key=lambda a: a == "release_pg"):
        arm_jobs = []
        for seed in args.seeds:
            run_dir = out / "runs" / arm / f"seed_{seed}"
            job = Job(name=f"{arm}/seed_{seed}", arm=arm, seed=seed, run_dir=run_dir)
            if arm == "release_pg" and pg_lr is None:
                job.needs_pg_lr = True
            else:
                job.config = config_for(arm, seed, run_dir, sizes["steps"], pg_lr)
            arm_jobs.append(job)
        jobs += arm_jobs
        waves += [arm_jobs[i : i + args.jobs] for i in range(0, len(arm_jobs), args.jobs)]
    done_sweep: dict[float, dict] = {}

    def on_done(job: Job) -> None:
        nonlocal pg_lr
        if not job.name.startswith("sweep/"):
            return
        lr = next(lr for lr, j in sweep.items() if j is job)
        done_sweep[lr] = load_report(job)
        if len(done_sweep) == len(sweep):
            finals = {lr: r["evals"]["student_after"]["pass@1"] for lr, r in done_sweep.items()}
            pg_lr = max(sorted(finals), key=lambda lr: finals[lr])  # ties: the smaller lr
            print(f"[reproduce] release_pg sweep: {finals} -> lr {pg_lr:g}")
            for waiting in [j for j in jobs if j.needs_pg_lr]:
                waiting.config = config_for("release_pg", waiting.seed, waiting.run_dir,
                                            sizes["steps"], pg_lr)  # fmt: skip
                waiting.needs_pg_lr = False

    print(f"[reproduce] {len(jobs) + len(sweep)} runs in {len(waves)} waves of up to "
          f"{args.jobs} side by side, {sizes['steps']} steps each")  # fmt: skip
    run_all(waves, on_done=on_done)

    reports = {arm: [load_report(j) for j in jobs if j.arm == arm] for arm in arms}
    curves = {arm: mean_curve(runs) for arm, runs in reports.items()}
    n = sizes["eval_problems"]
    baseline = "plain" if "plain" in arms else arms[0]
    summary = payoff_summary(curves, baseline, n)
    per_arm = {}
    for arm, runs in reports.items():
        seeds = [totals(r["history"]) for r in runs]
        mean = {k: sum(s[k] for s in seeds) / len(seeds) for k in seeds[0]}
        per_arm[arm] = {"title": ARM_TITLES[arm], "mean_totals": mean, "seed_totals": seeds,
                        "curve": dataclasses.asdict(curves[arm]), **summary[arm]}  # fmt: skip
    base_totals = per_arm[baseline]["mean_totals"]
    for arm in arms:
        t = per_arm[arm]["mean_totals"]
        per_arm[arm]["ratios_vs_baseline"] = {
            key: t[key] / base_totals[key] if base_totals[key] else float("nan")
            for key in ("time_step_wall_s", "time_rollout_s", "time_score_s", "time_train_s",
                        "tokens_generated", "tokens_scored", "tokens_trained")
        }  # fmt: skip
    results = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },  # fmt: skip
        "sizes": sizes,
        "seeds": args.seeds,
        "jobs": args.jobs,
        "assets": {
            "teacher": {k: teacher[k] for k in ("accuracy", "steps", "num_parameters")},
            "student": {k: student[k] for k in ("accuracy", "steps", "num_parameters")},
            "eval_problems": n,
        },  # fmt: skip
        "release_pg_lr": pg_lr,
        "release_pg_sweep": {
            f"{lr:g}": r["evals"]["student_after"]["pass@1"] for lr, r in done_sweep.items()
        },  # fmt: skip
        "target_accuracy": summary["target_accuracy"],
        "baseline_se": summary["baseline_se"],
        "arms": per_arm,
        "regime": {arm: regime(runs, sizes["max_new_tokens"]) for arm, runs in reports.items()},
        "wall_seconds": {"assets": assets_s, "all": time.perf_counter() - started},
    }
    results["targets"] = targets(results, baseline)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown_table(results, baseline)
    (out / "results.md").write_text(table)
    print("\n" + table)
    if not args.no_plots:
        from megatron_opd.demo.payoff_plots import plot_all

        plot_all(results, reports, out)
        print(f"plots: {out}/accuracy_vs_time.png lengths_budget.png time_breakdown.png regime.png")
    print(f"results: {out / 'results.json'}  table: {out / 'results.md'}")


def targets(results: dict, baseline: str) -> dict:
    """The issue's two targets, met or not, with the measured numbers. Only meaningful when
    plain OPD improved the student by more than one SE (else there is nothing to reach)."""
    arms = results["arms"]
    out = {}
    if baseline in arms:
        curve = arms[baseline]["curve"]
        gain = curve["accuracy"][-1] - curve["accuracy"][0]
        if gain <= results["baseline_se"]:
            return {"not_applicable": {
                "met": False,
                "why": f"{baseline} improved the student by {gain:+.1%}, not more than one SE "
                f"({results['baseline_se']:.1%}): there is no accuracy gain to reach",
            }}  # fmt: skip
    if "truncate" in arms and baseline in arms:
        c = arms["truncate"]
        ratio = c["reach_ratio_vs_baseline_total"]
        out["c_reaches_a_final_in_40pct"] = {
            "met": ratio is not None and ratio <= 0.40,
            "ratio": ratio,
            "baseline_reaches_its_own_target_ratio": arms[baseline][
                "reach_ratio_vs_baseline_total"
            ],
        }
    if "released" in arms and baseline in arms:
        b = arms["released"]
        saving = 1.0 - b["time_ratio_total"]
        out["b_saves_37_68pct_at_equal_accuracy"] = {
            "met": saving >= 0.376 and b["equal_accuracy"],
            "saving": saving,
            "equal_accuracy": b["equal_accuracy"],
        }
    return out


def markdown_table(results: dict, baseline: str) -> str:
    n = results["assets"]["eval_problems"]
    lines = [
        f"Held-out greedy accuracy on {n} problems (SE = sqrt(p(1-p)/{n})), mean of seeds "
        f"{results['seeds']}; wall time = the training clock (rollout + scoring + training), "
        "mean of seeds; ratios against " + results["arms"][baseline]["title"] + ".",
        "",
        "| arm | acc. start -> final (SE) | seed spread | wall s | x (a) "
        "| rollout / score / train s | tokens gen. | scored | trained | stopped | trimmed "
        "| reaches (a)'s final -1 SE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in results["arms"].values():
        t, r = a["mean_totals"], a["ratios_vs_baseline"]
        curve = a["curve"]
        reach = a["reaches_target_seconds"]
        reach_text = (
            "never" if reach is None
            else f"step {a['reaches_target_at_step']}, {reach:.0f} s "
            f"({a['reach_ratio_vs_baseline_total']:.0%} of (a))"
        )  # fmt: skip
        lines.append(
            f"| {a['title']} | {curve['accuracy'][0]:.1%} -> {a['final_accuracy']:.1%} "
            f"({a['final_se']:.1%}) | ±{a['final_seed_spread']:.1%} "
            f"| {t['time_step_wall_s']:.0f} | {r['time_step_wall_s']:.2f} "
            f"| {t['time_rollout_s']:.0f} / {t['time_score_s']:.0f} / {t['time_train_s']:.0f} "
            f"| {t['tokens_generated']:.0f} ({r['tokens_generated']:.2f}) "
            f"| {t['tokens_scored']:.0f} | {t['tokens_trained']:.0f} | {t['samples_stopped']:.0f} "
            f"| {t['tokens_trimmed']:.0f} | {reach_text} |"
        )
    lines.append("")
    for name, target in results["targets"].items():
        if name == "not_applicable":
            lines.append(f"- targets: not applicable: {target['why']}")
            continue
        lines.append(f"- target {name}: {'MET' if target['met'] else 'missed'} ({target})")
    if results.get("release_pg_sweep"):
        lines.append(f"- release_pg learning-rate sweep (final accuracy, one seed): "
                     f"{results['release_pg_sweep']} -> {results['release_pg_lr']:g}")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
