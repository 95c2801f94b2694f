"""``megatron-opd eval``: Avg@k / pass@k of ``student.path`` on ``eval.datasets``."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_opd.config.opd import OPDConfig


def run_evaluation(config: OPDConfig) -> dict:
    """``megatron-opd eval``: evaluate ``student.path`` on ``eval.datasets``."""
    from megatron_opd.conversion import load_model_weights
    from megatron_opd.data.tokenizer import load_tokenizer
    from megatron_opd.distributed import destroy_distributed, init_distributed
    from megatron_opd.models import build_model
    from megatron_opd.models.hf_config import find_hf_config_dir
    from megatron_opd.training.evaluation import evaluate_model

    if not config.eval.datasets:
        raise SystemExit("config error: eval.datasets is empty; list jsonl/parquet files")
    groups = init_distributed(config.parallel, seed=config.training.seed)
    try:
        tokenizer = load_tokenizer(
            find_hf_config_dir(config.student.path),
            chat_template_kwargs=config.data.chat_template_kwargs(),
        )
        chunks, info = build_model(config.student, groups, role="teacher")  # frozen, eval
        load_model_weights(chunks, config.student, info, groups)
        summaries = evaluate_model(
            chunks[0], tokenizer, groups, config.eval, vocab_size=info.vocab_size,
            seed=config.training.seed,
        )  # fmt: skip
        if groups.rank == 0:
            for name, summary in summaries.items():
                print(json.dumps({"dataset": name, **summary}), flush=True)
            if config.logging.log_dir:
                out = Path(config.logging.log_dir) / "eval.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(summaries, indent=1))
        return summaries
    finally:
        destroy_distributed()
