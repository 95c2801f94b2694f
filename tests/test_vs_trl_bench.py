"""bench/vs_trl.py builds the same work for both trainers (smoke test; TRL not needed).

The benchmark's claim is "the same work": one tokenizer that gives TRL's text prompts and
our problems the same ids, prompts of one length, and megatron-opd configurations for
every arm that load. Running the arms themselves is the benchmark's job, not the suite's.
"""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vs_trl.py"


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_work_is_the_same_for_both_trainers_and_every_arm_config_loads(vs_trl, tmp_path):
    from transformers import AutoTokenizer

    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig
    from megatron_opd.data.tokenizer import load_tokenizer

    work = vs_trl.build_work(tmp_path, vocab=96, num_prompts=6, seed=0)
    problems = [json.loads(line)["problem"] for line in open(tmp_path / "prompts.jsonl")]
    ours = load_tokenizer(tmp_path / "student")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "teacher"))
    ids = [theirs(text)["input_ids"] for text in work["prompt_texts"]]
    assert ids == [ours.encode_prompt(p) for p in problems]
    assert {len(x) for x in ids} == {work["prompt_len"]}
    assert ids[0][0] == ours.bos_id and ours.eos_id not in sum(ids, [])
    spec = {**work, "rows": 4, "new": 8, "steps": 2, "threads": 1, "vocab": 96, "seed": 0}
    for arm in ("ours", "ours_exact_kl", "ours_prune"):
        config = build_config(OPDConfig, merge_overrides({}, vs_trl._ours_overrides(spec, arm)))
        assert config.data.prompts_per_step == 4 and config.rollout.n_samples_per_prompt == 1
    exact = build_config(
        OPDConfig, merge_overrides({}, vs_trl._ours_overrides(spec, "ours_exact_kl"))
    )
    assert exact.prune.top_k == 96 and exact.loss.kind == "topk_reverse_kl"
    prune = build_config(OPDConfig, merge_overrides({}, vs_trl._ours_overrides(spec, "ours_prune")))
    # The online stop runs but cannot fire within the response: equal generated tokens.
    assert prune.prune.mode == "truncate" and prune.rollout.chunk_size > 0
    assert prune.prune.w_drop * spec["new"] < 1.0
