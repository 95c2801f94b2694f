"""One distillation run of the demo, launched by ``megatron-opd demo`` under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        -m megatron_opd.demo.distill --config run.yaml --report report.json [--eval-before]

Builds the run, optionally evaluates the teacher and the untrained student, trains,
evaluates the student again, exports it (``checkpoint.export_hf_dir``) and (rank 0) writes
a JSON report: per-step history, evaluation summaries, wall time per phase and, with
``--samples``, every step's per-sample table (:mod:`megatron_opd.training.rollout_stats`).
Evaluations run outside the steps' clocks.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    """Entry point (one rank)."""
    parser = argparse.ArgumentParser(prog="python -m megatron_opd.demo.distill")
    parser.add_argument("--config", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--eval-before", action="store_true", help="evaluate the student first")
    parser.add_argument("--eval-teacher", action="store_true", help="evaluate the teacher first")
    parser.add_argument("--samples", action="store_true", help="keep per-sample step tables")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from megatron_opd.config.loader import load_config
    from megatron_opd.config.opd import OPDConfig
    from megatron_opd.distributed import destroy_distributed, init_distributed
    from megatron_opd.training.evaluation import evaluate_model
    from megatron_opd.training.setup import build_components
    from megatron_opd.training.trainer import Trainer

    config = load_config(OPDConfig, args.config, args.overrides)
    times: dict[str, float] = {}
    start = time.perf_counter()
    groups = init_distributed(config.parallel, seed=config.training.seed)
    try:
        components = build_components(config, groups)
        trainer = Trainer(config, groups, components)
        times["setup_s"] = time.perf_counter() - start

        def evaluate(model) -> dict:
            summaries = evaluate_model(
                model,
                components.tokenizer,
                groups,
                config.eval,
                vocab_size=components.vocab_size,
                seed=config.training.seed,
            )
            return next(iter(summaries.values()))

        tables: list[dict] = []
        if args.samples:
            trainer.step_callbacks.append(
                lambda t, _: tables.append({"step": t.step, "rows": t.last_sample_stats.tolist()})
            )
        evals: dict[str, dict] = {}
        t = time.perf_counter()
        if args.eval_teacher:
            evals["teacher"] = evaluate(components.teacher_chunks[0])
        if args.eval_before:
            evals["student_before"] = evaluate(trainer.student[0].module)
        times["eval_before_s"] = time.perf_counter() - t
        t = time.perf_counter()
        components.log.message("distilling ...")
        history = trainer.train()
        times["train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        evals["student_after"] = evaluate(trainer.student[0].module)
        times["eval_after_s"] = time.perf_counter() - t
        during = [
            {"step": e["step"], "pass@1": e[key], "eval_seconds": e.get("eval_seconds", 0.0)}
            for e in trainer.eval_history
            for key in e
            if key.endswith("/pass@1")
        ]
        trainer.export_hf()
        components.log.close()
        if groups.rank == 0:
            report = {"history": history, "evals": evals, "evals_during": during, "times": times}
            if args.samples:
                from megatron_opd.training.rollout_stats import COLUMNS

                report["samples"] = {"columns": list(COLUMNS), "steps": tables}
            Path(args.report).write_text(json.dumps(report, indent=1))
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
