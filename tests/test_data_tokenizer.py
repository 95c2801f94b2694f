"""Tokenizers (SentencePiece task model, local HF directory) and the chain task."""

import json
import random
import shutil

import pytest

from megatron_opd.data.chain_task import (
    EOS_ID,
    PAD_ID,
    held_out_problems,
    make_chain_problem,
    train_task_tokenizer,
    training_problems,
    write_jsonl,
)
from megatron_opd.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    check_same_vocabulary,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def task_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("task_tok")
    train_task_tokenizer(out, seed=0)
    return out


def test_chain_problem_hand_worked():
    # Draw with a fixed rng and recompute the sums by hand from the problem text.
    p = make_chain_problem(random.Random(7), min_terms=4, max_terms=4)
    terms = [int(part.split("=")[1]) for part in p.problem.removeprefix("Add: ").split()]
    assert len(terms) == 4 and all(1 <= t <= 9 for t in terms)
    a, b, c, d = terms
    expected = (
        f"b: {a}+{b}={a + b}. c: {a + b}+{c}={a + b + c}. "
        f"d: {a + b + c}+{d}={a + b + c + d}. The answer is \\boxed{{{a + b + c + d}}}."
    )
    assert p.solution == expected and p.answer == str(sum(terms)) and p.num_terms == 4
    assert make_chain_problem(random.Random(7), min_terms=4, max_terms=4) == p
    with pytest.raises(ValueError, match="min_terms"):
        make_chain_problem(random.Random(0), min_terms=5, max_terms=3)


def test_held_out_split_disjoint_and_deterministic(tmp_path):
    held = held_out_problems(num_problems=300, seed=3, min_terms=2, max_terms=3)
    assert held == held_out_problems(num_problems=300, seed=3, min_terms=2, max_terms=3)
    assert len({p.problem for p in held}) == 300
    # n=2..3 gives only 81 + 729 distinct problems, so collisions would be frequent.
    stream = training_problems(seed=3, min_terms=2, max_terms=3, exclude=[p.problem for p in held])
    train = [next(stream) for _ in range(2000)]
    assert not {p.problem for p in train} & {p.problem for p in held}
    path = write_jsonl(tmp_path / "eval.jsonl", held[:5])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["problem"] for r in rows] == [p.problem for p in held[:5]]
    assert set(rows[0]) == {"problem", "answer", "solution", "num_terms"}
    with pytest.raises(ValueError, match="distinct"):
        held_out_problems(num_problems=100, seed=0, min_terms=2, max_terms=2)


def test_sentencepiece_task_tokenizer(task_tokenizer_dir):
    import sentencepiece as spm

    tok = load_tokenizer(task_tokenizer_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    raw = spm.SentencePieceProcessor(model_file=str(task_tokenizer_dir / "tokenizer.model"))
    assert (raw.pad_id(), raw.bos_id(), raw.eos_id()) == (PAD_ID, 1, EOS_ID)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, raw.get_piece_size())
    rng = random.Random(11)
    for _ in range(50):
        p = make_chain_problem(rng, min_terms=2, max_terms=12)
        text = tok.format_prompt(p.problem) + p.solution
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids + [EOS_ID, PAD_ID]) == text  # specials drop out
        # digits are single pieces (sums are spelled digit by digit)
        assert all(not (len(s) > 1 and s.isdigit()) for s in tok.token_strings())
    assert tok.format_prompt("Add: a=1 b=2") == "Add: a=1 b=2\n"
    prompt = tok.encode_prompt("Add: a=1 b=2")
    assert prompt[0] == 1 and tok.decode(prompt) == "Add: a=1 b=2\n"
    assert raw.id_to_piece(prompt[-1]) == "<nl>"


def _write_hf_tokenizer(directory, *, chat_template=None, extra_word=None):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "user", "assistant", ":"]
    if extra_word:
        words[5] = extra_word
    raw = RawTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(directory)


def test_hf_tokenizer_chat_template_and_plain(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}assistant :"
    _write_hf_tokenizer(tmp_path / "chat", chat_template=template)
    _write_hf_tokenizer(tmp_path / "plain")
    chat = load_tokenizer(tmp_path / "chat")
    assert isinstance(chat, HFTokenizer)
    assert chat.format_prompt("hello world") == "user : hello world assistant :"
    assert chat.encode_prompt("hello world") == [6, 8, 4, 5, 7, 8]  # no BOS with a template
    assert (chat.eos_id, chat.pad_id, chat.vocab_size) == (2, 0, 9)
    plain = load_tokenizer(tmp_path / "plain")
    assert plain.format_prompt("hello") == "hello\n"
    assert plain.encode_prompt("hello") == [1, 4]
    assert plain.decode([1, 4, 5, 2]) == "hello world"


def test_qwen3_enable_thinking_reaches_the_chat_template(tmp_path):
    from megatron_opd.config.data import DataConfig

    # The switch Qwen3's template reads (its generation-prompt branch, abridged).
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}"
        "<think>\n\n</think>\n\n{% endif %}"
    )
    _write_hf_tokenizer(tmp_path / "qwen3", chat_template=template)
    default = load_tokenizer(tmp_path / "qwen3")
    assert default.format_prompt("hello").endswith("<|im_start|>assistant\n")
    off = DataConfig(enable_thinking=False).chat_template_kwargs()
    assert off == {"enable_thinking": False} and DataConfig().chat_template_kwargs() == {}
    no_think = load_tokenizer(tmp_path / "qwen3", chat_template_kwargs=off)
    assert no_think.format_prompt("hello").endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_check_same_vocabulary(tmp_path, task_tokenizer_dir):
    _write_hf_tokenizer(tmp_path / "a")
    _write_hf_tokenizer(tmp_path / "b")
    _write_hf_tokenizer(tmp_path / "c", extra_word="planet")
    assert check_same_vocabulary(tmp_path / "a", tmp_path / "b").vocab_size == 9
    with pytest.raises(ValueError, match="token id 5 differs"):
        check_same_vocabulary(tmp_path / "a", tmp_path / "c")
    with pytest.raises(ValueError, match="different tokenizer files"):
        check_same_vocabulary(tmp_path / "a", task_tokenizer_dir)
    other = tmp_path / "sp_other"
    train_task_tokenizer(other, seed=0, vocab_size=48)
    with pytest.raises(ValueError, match="vocab_size differs"):
        check_same_vocabulary(task_tokenizer_dir, other)
    copy = tmp_path / "sp_copy"
    shutil.copytree(task_tokenizer_dir, copy)
    check_same_vocabulary(task_tokenizer_dir, copy)
    with pytest.raises(ValueError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
