"""Grading against math-verify directly, hand-worked pass@k, math sets, the evaluator."""

import json
import threading
from math import comb

import pytest
from math_verify import parse, verify

from megatron_opd.eval import (
    as_latex_gold,
    avg_at_k,
    evaluate,
    grade,
    load_math_set,
    mean_pass_at_k,
    pass_at_k,
)

CASES = [
    ("The answer is \\boxed{17}.", "17"),
    ("so \\boxed{16}", "17"),
    ("we get \\boxed{\\frac{1}{2}}", "0.5"),
    ("we get \\boxed{0.5}", "\\frac{1}{2}"),
    ("no answer here", "3"),
    ("$x = 2\\sqrt{2}$ hence \\boxed{2\\sqrt 2}", "2\\sqrt{2}"),
    ("\\boxed{3}", "$3$"),
]


def test_grade_matches_math_verify_on_and_off_main_thread():
    expected = [verify(parse(f"${a}$" if not a.startswith("$") else a), parse(r)) for r, a in CASES]
    assert expected == [True, False, True, True, False, True, True]
    assert [grade(r, a) for r, a in CASES] == expected
    off_main = []
    worker = threading.Thread(target=lambda: off_main.extend(grade(r, a) for r, a in CASES))
    worker.start()
    worker.join()
    assert off_main == expected
    assert as_latex_gold("17") == "$17$" and as_latex_gold("$17$") == "$17$"


def test_pass_at_k_hand_worked():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    for n, c, k in [(16, 3, 4), (16, 1, 16), (100, 7, 10)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    table = [[1, 0, 0, 1], [0, 0, 0, 0]]
    assert avg_at_k(table) == 0.25
    assert mean_pass_at_k(table, 2) == pytest.approx((1 - 1 / 6 + 0) / 2)
    with pytest.raises(ValueError, match="n_problems, k"):
        avg_at_k([1, 0])


def test_load_math_set_and_evaluate(tmp_path):
    rows = [
        {"problem": "1+1?", "answer": "2"},
        {"problem": "half?", "answer": "\\frac{1}{2}"},
        {"problem": "3*3?", "answer": 9},
    ]
    path = tmp_path / "aime_toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    math_set = load_math_set(path)
    assert math_set.name == "aime_toy" and [p.answer for p in math_set.problems] == [
        "2",
        "\\frac{1}{2}",
        "9",
    ]
    canned = {
        "1+1?": ["\\boxed{2}", "\\boxed{3}"],
        "half?": ["\\boxed{0.5}", "\\boxed{0.5}"],
        "3*3?": ["\\boxed{8}", "x"],
    }
    calls = []

    def generate_fn(prompts):
        calls.append(list(prompts))
        seen = {}
        out = []
        for p in prompts:
            out.append(canned[p][seen.get(p, 0)])
            seen[p] = seen.get(p, 0) + 1
        return out

    result = evaluate(generate_fn, math_set, k=2)
    assert calls == [["1+1?", "1+1?", "half?", "half?", "3*3?", "3*3?"]]
    assert [r.correct for r in result.results] == [[True, False], [True, True], [False, False]]
    s = result.summary
    assert (s["name"], s["num_problems"], s["k"]) == ("aime_toy", 3, 2)
    assert s["avg@2"] == pytest.approx(3 / 6)
    assert s["pass@1"] == pytest.approx(0.5) and s["pass@2"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one response per prompt"):
        evaluate(lambda prompts: ["x"], math_set, k=1)
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'problem'"):
        load_math_set(tmp_path / "bad.jsonl")
    assert load_math_set(tmp_path / "bad.jsonl", problem_key="question").problems[0].problem == "q"


def test_grade_timeout_off_main_thread(monkeypatch):
    import time

    from megatron_opd.eval import grading

    def slow_verify(response, answer, timeout):
        assert timeout is None  # signal-based timeouts are off outside the main thread
        time.sleep(1.0)
        return True

    monkeypatch.setattr(grading, "_verify", slow_verify)
    out = []
    start = time.perf_counter()
    worker = threading.Thread(target=lambda: out.append(grade("\\boxed{1}", "1", timeout_s=0.1)))
    worker.start()
    worker.join()
    assert out == [False] and time.perf_counter() - start < 0.9
