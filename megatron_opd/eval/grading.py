"""Grading a response against a gold answer with math-verify.

math-verify parses the gold answer and the response into sympy objects and compares
them. Its gold answers must be LaTeX in math mode, so a bare ``17`` or ``\\frac{1}{2}`` is
wrapped as ``$...$`` first. The response is parsed as a whole; math-verify prefers the
last ``\\boxed{}`` (its default extraction config), which is how our models answer.

math-verify's own timeouts use ``signal.alarm``, which only works on the main thread.
There we pass them through; elsewhere (a rollout or evaluation worker thread) we turn
them off and bound the call ourselves: it runs in a daemon thread and counts as wrong
if it has not finished in ``timeout_s`` (sympy can take very long on adversarial text).
"""

from __future__ import annotations

import threading

DEFAULT_TIMEOUT_S = 5.0


def as_latex_gold(answer: str) -> str:
    """Gold answer as math-verify needs it: LaTeX inside ``$...$`` (unless already so)."""
    answer = str(answer).strip()
    if answer.startswith("$") or answer.startswith("\\(") or answer.startswith("\\["):
        return answer
    return f"${answer}$"


def _verify(response: str, answer: str, timeout: int | None) -> bool:
    from math_verify import parse, verify

    gold = parse(as_latex_gold(answer), parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {answer!r}; fix the dataset")
    predicted = parse(response, parsing_timeout=timeout)
    if not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=timeout))


def grade(response: str, answer: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True when ``response`` states the same mathematical answer as ``answer``.

    ``answer`` is a gold answer (``"17"``, ``"\\frac{3}{4}"``, ``"$x^2$"``). A response
    without a parsable answer, or one that takes longer than ``timeout_s``, is wrong.
    """
    if threading.current_thread() is threading.main_thread():
        return _verify(response, answer, max(1, int(round(timeout_s))))
    result: list[bool | BaseException] = []

    def run() -> None:
        try:
            result.append(_verify(response, answer, None))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result.append(err)

    worker = threading.Thread(target=run, daemon=True, name="math-verify")
    worker.start()
    worker.join(timeout_s)
    if not result:
        return False
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]
