"""Prompt datasets (jsonl/parquet), error messages, and the resumable loader order."""

import json

import pytest

from megatron_opd.config.data import DataConfig
from megatron_opd.config.loader import build_config
from megatron_opd.config.opd import EvalConfig, OPDConfig
from megatron_opd.data.prompts import (
    PromptLoader,
    epoch_order,
    load_prompt_dataset,
    prompt_loader_from_config,
)


class CharTokenizer:
    """Independent stand-in: one id per character, BOS=1, plain template."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 300

    def encode(self, text):
        return [ord(c) for c in text]

    def format_prompt(self, problem):
        return problem + "\n"

    def encode_prompt(self, problem):
        return [1] + self.encode(self.format_prompt(problem))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_fields_and_errors(tmp_path):
    tok = CharTokenizer()
    path = _jsonl(
        tmp_path / "p.jsonl", [{"problem": "1+1", "answer": 2}, {"problem": "ab", "answer": "x"}]
    )
    prompts = load_prompt_dataset(path, tok, max_prompt_length=10)
    assert [p.problem for p in prompts] == ["1+1", "ab"]
    assert [p.answer for p in prompts] == ["2", "x"]
    assert prompts[0].token_ids == (1, ord("1"), ord("+"), ord("1"), ord("\n"))
    assert prompts[1].location.endswith("p.jsonl:2")
    # "prompt" is the fallback key; nested answers and chat prompts (DAPO layout)
    dapo = _jsonl(
        tmp_path / "dapo.jsonl",
        [
            {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                "reward_model": {"ground_truth": "34"},
            }
        ],
    )
    (p,) = load_prompt_dataset(
        dapo, tok, max_prompt_length=10, answer_key="reward_model.ground_truth"
    )
    assert (p.problem, p.answer) == ("q", "34")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_prompt_dataset(tmp_path / "empty.jsonl", tok, max_prompt_length=10)
    (tmp_path / "bad.jsonl").write_text('{"problem": "a", "answer": 1}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        load_prompt_dataset(tmp_path / "bad.jsonl", tok, max_prompt_length=10)
    _jsonl(tmp_path / "noans.jsonl", [{"problem": "a", "answer": 1}, {"problem": "b"}])
    with pytest.raises(ValueError, match=r"noans.jsonl:2: missing field 'answer'"):
        load_prompt_dataset(tmp_path / "noans.jsonl", tok, max_prompt_length=10)
    _jsonl(tmp_path / "nokey.jsonl", [{"question": "a"}])
    with pytest.raises(ValueError, match=r"nokey.jsonl:1: no 'problem' or 'prompt'.*prompt_key"):
        load_prompt_dataset(tmp_path / "nokey.jsonl", tok, max_prompt_length=10)
    _jsonl(tmp_path / "long.jsonl", [{"problem": "a"}, {"problem": "x" * 9}])
    # 9 chars + newline + BOS = 11 tokens > 10
    with pytest.raises(
        ValueError, match=r"long.jsonl:2: prompt has 11 tokens.*max_prompt_length=10"
    ):
        load_prompt_dataset(tmp_path / "long.jsonl", tok, max_prompt_length=10, answer_key=None)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="suffix '.csv'"):
        load_prompt_dataset(tmp_path / "x.csv", tok, max_prompt_length=10)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"question": ["u", "vw"], "answer": ["1", "2"]})
    pq.write_table(table, tmp_path / "set.parquet")
    prompts = load_prompt_dataset(
        tmp_path / "set.parquet", CharTokenizer(), max_prompt_length=8, prompt_key="question"
    )
    assert [(p.problem, p.answer) for p in prompts] == [("u", "1"), ("vw", "2")]
    assert prompts[1].location.endswith("set.parquet:row 1")


def test_loader_order_epochs_and_resume():
    items = [object() for _ in range(10)]
    loader = PromptLoader(items, prompts_per_step=4, seed=5)
    batches = [loader.next_batch() for _ in range(5)]
    # epoch 0 gives 2 full batches (8 of 10, the partial one is dropped), then epoch 1...
    order0, order1, order2 = (epoch_order(10, seed=5, epoch=e) for e in range(3))
    assert sorted(order0) == list(range(10)) and order0 != order1
    expected = [order0[0:4], order0[4:8], order1[0:4], order1[4:8], order2[0:4]]
    assert [[items.index(x) for x in b] for b in batches] == expected
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["index"] == 4
    # resume from a saved position in a fresh loader and continue identically
    saved = PromptLoader(items, prompts_per_step=4, seed=5)
    for _ in range(3):
        saved.next_batch()
    state = saved.state_dict()
    reference = [saved.next_batch() for _ in range(3)]
    fresh = PromptLoader(items, prompts_per_step=4, seed=5)
    fresh.load_state_dict(state)
    assert [fresh.next_batch() for _ in range(3)] == reference
    with pytest.raises(ValueError, match="data.seed"):
        PromptLoader(items, prompts_per_step=4, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="prompts_per_step"):
        PromptLoader(items[:3], prompts_per_step=4, seed=5)


def test_data_config_checks(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"prompt": c, "sol": i} for i, c in enumerate("abcde")])
    cfg = DataConfig(train_path=str(path), answer_key="sol", prompts_per_step=2, seed=3)
    loader = prompt_loader_from_config(cfg, CharTokenizer())
    order = epoch_order(5, seed=3, epoch=0)
    assert [p.problem for p in loader.next_batch()] == ["abcde"[i] for i in order[:2]]
    with pytest.raises(ValueError, match="data.train_path is empty"):
        prompt_loader_from_config(DataConfig(), CharTokenizer())
    cfg = build_config(DataConfig, {"train_path": "a.jsonl", "prompts_per_step": 2})
    assert cfg.prompts_per_step == 2 and cfg.prompt_key is None
    with pytest.raises(ValueError, match="data.max_prompt_length"):
        DataConfig(max_prompt_length=0)
    with pytest.raises(ValueError, match=r"eval.datasets\[1\] must end in .jsonl"):
        EvalConfig(datasets=["a.jsonl", "b.csv"])
    # data.eval_paths was read by nothing; a recipe that still sets it is told where sets go.
    with pytest.raises(ValueError, match=r"data.eval_paths is no longer .* use eval.datasets"):
        build_config(OPDConfig, {"data": {"eval_paths": ["a.jsonl"]}})
    with pytest.raises(ValueError, match="data.prompts_per_step"):
        DataConfig(prompts_per_step=0)
