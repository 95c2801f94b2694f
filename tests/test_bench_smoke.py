"""bench/rollout_bench.py and bench/ops_bench.py run end to end at toy sizes (smoke tests).

The timings they print are the benchmarks' business; the suite checks that both scripts
still run, check their own results (greedy KV-cache tokens agree with recomputation; our
top-K equals the naive one) and print every comparison the docs quote: the floor, the
floor with the block-pruned top-K, the TP=2 sharded step and the target verdicts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_rollout_bench_runs_and_prints_every_comparison():
    out = _run(
        "rollout_bench.py", "--batch", "4", "--new", "8", "--prompt", "8", "--repeats", "1",
        "--floor-vocab", "20000", "--floor-batches", "4", "--floor-calls", "3",
    )  # fmt: skip
    assert "greedy tokens agree on 100.0% of positions" in out
    assert out.count("floor with block-pruned top-K") == 3  # V=512 and V=20,000 flat / Zipf
    assert out.count("with block-pruned top-K") == 3 + 2  # and the two TP=2 lines
    assert "sharded step" in out and "gather + whole-row step" in out
    assert "target: sharded step <= 1.3x the floor" in out


def test_ops_bench_runs_checks_and_prints_both_floors():
    out = _run("ops_bench.py", "--vocab", "20000", "--tokens", "96", "--repeats", "1")
    for op in ("topk", "topk+logp"):
        assert f"{op:<10} check  values equal" in out
        assert f"{op:<10} floor  with our block-pruned top-K" in out
        # The counter shows the block-pruned read firing on random logits.
        line = next(x for x in out.splitlines() if x.startswith(f"{op:<10} top-K  rows"))
        assert "rows read by blocks (topk_by_blocks) 0 " not in line
    assert out.count("target <= 1.3x") == 2
