"""The long-horizon countdown task: format, lengths, splits, tokenizer, registry."""

import random
import statistics

import pytest

from megatron_opd.data.countdown_task import (
    held_out_problems,
    make_countdown_problem,
    train_task_tokenizer,
    training_problems,
)
from megatron_opd.data.tasks import TASKS, get_task
from megatron_opd.data.tokenizer import load_tokenizer


def test_problem_hand_worked():
    rng = random.Random(0)
    p = make_countdown_problem(rng, min_steps=3, max_steps=3)
    k, first = p.problem.removeprefix("Count by ").split(": ")
    counter, start = first.split(":")
    k, start = int(k), int(start)
    assert counter == "03" and p.num_steps == 3 and p.size == 3
    expected = f"02:{start + k} 01:{start + 2 * k} 00:{start + 3 * k} \\boxed{{{start + 3 * k}}}"
    assert p.solution == expected and p.answer == str(start + 3 * k)
    assert make_countdown_problem(random.Random(0), min_steps=3, max_steps=3) == p


def test_bad_sizes_name_the_fix():
    with pytest.raises(ValueError, match="min_steps"):
        make_countdown_problem(random.Random(0), min_steps=5, max_steps=3)
    with pytest.raises(ValueError, match="3 digits"):
        make_countdown_problem(random.Random(0), min_steps=1, max_steps=99)
    with pytest.raises(ValueError, match="unknown task 'sums'"):
        get_task("sums")


def test_splits_are_disjoint_and_deterministic():
    held = held_out_problems(num_problems=200, seed=1, min_steps=16, max_steps=40)
    assert held == held_out_problems(num_problems=200, seed=1, min_steps=16, max_steps=40)
    assert len({p.problem for p in held}) == 200
    texts = {p.problem for p in held}
    stream = training_problems(seed=1, min_steps=16, max_steps=40, exclude=texts)
    assert not any(next(stream).problem in texts for _ in range(2000))


def test_long_solutions_and_tokenizer_round_trip(tmp_path):
    train_task_tokenizer(tmp_path, seed=0)
    tok = load_tokenizer(tmp_path)
    held = held_out_problems(num_problems=300, seed=0, min_steps=16, max_steps=40)
    lengths = [len(tok.encode(p.solution)) + 1 for p in held]  # + EOS
    # The regime the benchmark needs: several times the chain sums' 35-83 tokens.
    assert statistics.median(lengths) >= 120 and max(lengths) >= 250
    assert all(tok.decode(tok.encode(p.solution)) == p.solution for p in held)
    # Every line is 7 tokens: 2 counter digits, ':', 3 value digits, a space.
    p = held[0]
    line = p.solution.split(" ")[0] + " "
    assert len(tok.encode(line)) == 7


def test_registry_builds_both_tasks():
    assert set(TASKS) == {"chain", "countdown"}
    chain = get_task("chain").held_out(num_problems=5, seed=0, min_size=4, max_size=8)
    assert all(4 <= p.size <= 8 for p in chain)
    count = get_task("countdown").held_out(num_problems=5, seed=0, min_size=16, max_size=40)
    assert all(16 <= p.size <= 40 for p in count)
