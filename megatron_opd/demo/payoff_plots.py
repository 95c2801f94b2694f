"""The payoff benchmark's plots (PNG): accuracy against wall time, lengths and budget over
steps, where the time went, and the task's regime (lengths, first drift, tokens after the
weight reached 0)."""

from __future__ import annotations

from pathlib import Path

COLORS = {
    "plain": "tab:gray", "released": "tab:orange", "truncate": "tab:blue", "stop_trim": "tab:green",
    "release_pg": "tab:purple", "plain_fkl": "tab:brown", "truncate_fkl": "tab:cyan",
}  # fmt: skip


def _mean_series(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps = [h["step"] for h in runs[0]["history"]]
    values = [sum(r["history"][i][key] for r in runs) / len(runs) for i in range(len(steps))]
    return steps, values


def plot_all(results: dict, reports: dict[str, list[dict]], out: Path) -> None:
    """Write the four PNGs into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_opd.demo.payoff import standard_error

    n = results["assets"]["eval_problems"]
    arms = results["arms"]

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for arm, a in arms.items():
        curve = a["curve"]
        errors = [standard_error(p, n) for p in curve["accuracy"]]
        ax.errorbar(curve["seconds"], curve["accuracy"], yerr=errors, marker="o", capsize=3,
                    label=a["title"], color=COLORS.get(arm))  # fmt: skip
    ax.axhline(results["target_accuracy"], color="k", ls=":", lw=1,
               label="(a)'s final accuracy - 1 SE")  # fmt: skip
    ax.set_xlabel("training wall time, s (rollout + scoring + training; evaluations excluded)")
    ax.set_ylabel(f"greedy held-out accuracy ({n} problems)")
    ax.set_title("accuracy against wall time (mean of seeds, error bars: 1 SE)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("response_length_mean", "mean response length (tokens)"),
              ("effective_length_mean", "mean effective length (tokens, w > 0)"),
              ("budget", "response budget (max new tokens of the step)"))  # fmt: skip
    for ax, (key, title) in zip(axes, panels):
        for arm, runs in reports.items():
            steps, values = _mean_series(runs, key)
            ax.plot(steps, values, label=arms[arm]["title"], color=COLORS.get(arm))
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lengths_budget.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 5))
    phases = (("time_rollout_s", "rollout (incl. chunked teacher)"),
              ("time_score_s", "scoring"), ("time_prune_s", "prune"),
              ("time_train_s", "training"))  # fmt: skip
    names = list(arms)
    bottom = [0.0] * len(names)
    for key, label in phases:
        values = [arms[a]["mean_totals"][key] for a in names]
        ax.bar(range(len(names)), values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(names)), [arms[a]["title"] for a in names], rotation=20,
                  ha="right", fontsize=8)  # fmt: skip
    ax.set_ylabel("seconds (mean of seeds)")
    ax.set_title("where the training time went")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "time_breakdown.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    from megatron_opd.training.rollout_stats import COLUMNS

    col = {name: i for i, name in enumerate(COLUMNS)}
    base = "plain" if "plain" in reports else next(iter(reports))
    steps = [s for r in reports[base] for s in r["samples"]["steps"]]
    first, last = min(s["step"] for s in steps), max(s["step"] for s in steps)
    for step, style in ((first, "tab:red"), (last, "tab:green")):
        rows = [row for s in steps if s["step"] == step for row in s["rows"]]
        axes[0].hist([r[col["response_length"]] for r in rows], bins=30, alpha=0.5,
                     color=style, label=f"step {step}")  # fmt: skip
        where = [r[col["first_drift"]] / max(r[col["response_length"]], 1)
                 for r in rows if r[col["first_drift"]] >= 0]  # fmt: skip
        axes[1].hist(where, bins=20, range=(0, 1), alpha=0.5, color=style, label=f"step {step}")
    axes[0].axvline(results["sizes"]["max_new_tokens"], color="k", ls=":", label="cap")
    axes[0].set_title(f"{arms[base]['title']}: response lengths")
    axes[0].legend()
    axes[1].set_title("first drift event, fraction of the response")
    axes[1].legend()
    for arm, runs in reports.items():
        steps_, values = _mean_series(runs, "tokens_after_weight_zero_fraction")
        axes[2].plot(steps_, values, label=arms[arm]["title"], color=COLORS.get(arm))
    axes[2].set_title("generated tokens after the weight reached 0 (w_drop 0.2)")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "regime.png", dpi=110)
    plt.close(fig)
