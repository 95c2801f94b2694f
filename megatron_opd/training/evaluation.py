"""Avg@k / pass@k of a Megatron model on math sets (used by training and ``megatron-opd eval``).

Generation uses the Megatron-native rollout engine on the model being evaluated (so a
student is evaluated exactly as it samples in training); problems are split over the
data-parallel ranks and the responses gathered, then graded with math-verify on every
rank (so every rank returns the same summary).
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from megatron_opd.config.opd import EvalConfig
from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.distributed import ParallelGroups


def make_generate_fn(model, tokenizer, groups: ParallelGroups, eval_config: EvalConfig, *,
                     vocab_size: int, seed: int = 0, batch_size: int = 64):  # fmt: skip
    """A ``generate_fn(list[str]) -> list[str]`` for :func:`megatron_opd.eval.evaluate`."""
    from megatron_opd.rollout.megatron_engine import MegatronRolloutEngine

    sampling = RolloutConfig(
        temperature=eval_config.temperature,
        top_p=eval_config.top_p,
        n_samples_per_prompt=1,
        max_new_tokens=eval_config.max_new_tokens,
        seed=seed,
        generation_batch_size=batch_size,
    )
    engine = MegatronRolloutEngine(
        model, groups, sampling, eos_token_ids=[tokenizer.eos_id], pad_id=tokenizer.pad_id,
        vocab_size=vocab_size,
    )  # fmt: skip
    calls = [0]

    def generate_fn(problems: list[str]) -> list[str]:
        per_rank = -(-len(problems) // groups.dp_size)
        mine = problems[groups.dp_rank * per_rank : (groups.dp_rank + 1) * per_rank]
        texts: list[str] = []
        if mine:
            prompts = [tokenizer.encode_prompt(p) for p in mine]
            call_seed = seed + 1_000_003 * calls[0] + 7919 * groups.dp_rank
            batch = engine.generate(
                prompts, max_new_tokens=eval_config.max_new_tokens, seed=call_seed
            )
            for row in range(batch.batch_size):
                start = int(batch.prompt_lengths[row])
                end = start + int(batch.response_lengths[row])
                texts.append(tokenizer.decode(batch.tokens[row, start:end].tolist()))
        calls[0] += 1
        if groups.dp_size == 1:
            return texts
        gathered: list[list[str]] = [[] for _ in range(groups.dp_size)]
        dist.all_gather_object(gathered, texts, group=groups.dp_group)
        return [text for part in gathered for text in part]

    return generate_fn


def evaluate_model(
    model,
    tokenizer,
    groups: ParallelGroups,
    eval_config: EvalConfig,
    *,
    vocab_size: int,
    paths: list[str] | None = None,
    seed: int = 0,
) -> dict:
    """``{dataset name: summary}`` for every set in ``paths`` (default eval.datasets)."""
    from megatron_opd.eval import evaluate, load_math_set

    generate_fn = make_generate_fn(
        model, tokenizer, groups, eval_config, vocab_size=vocab_size, seed=seed
    )
    summaries = {}
    for path in paths if paths is not None else eval_config.datasets:
        math_set = load_math_set(
            path, problem_key=eval_config.problem_key, answer_key=eval_config.answer_key
        )
        if eval_config.max_problems:
            math_set = dataclasses.replace(
                math_set, problems=math_set.problems[: eval_config.max_problems]
            )
        result = evaluate(generate_fn, math_set, eval_config.k)
        summaries[math_set.name] = result.summary
    return summaries
