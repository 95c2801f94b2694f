"""``python -m megatron_opd.gpu_check run STEP --out DIR``: one step of the GPU check.

Writes the step's file into DIR and exits 0 (passed), 1 (failed: the file says why, or
the traceback is on stderr) or 3 (skipped: the reason is printed). ``--device cpu`` and
``--small`` run the same code at test sizes (the CPU tests use them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_opd.gpu_check.plan import SKIP_EXIT_CODE, STEP_NAMES, STEPS


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_step(name: str, out_dir: Path, *, device: str, small: bool) -> tuple[int, str]:
    """Run one step; returns ``(exit code, one-line reason)`` and writes its file."""
    import torch

    step = next(s for s in STEPS if s.name == name)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device == "cuda" and not torch.cuda.is_available():
        return SKIP_EXIT_CODE, "no CUDA device visible"
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", str(_free_port())),
    ):
        os.environ.setdefault(key, value)  # fmt: skip
    if name == "cuda_tests":
        return _cuda_tests(out_dir / step.output)
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as scratch:
        work = Path(scratch)
        result = _compute(name, work, device=device, small=small)
    (out_dir / step.output).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if result.get("skipped"):
        return SKIP_EXIT_CODE, result["skipped"]
    return (0, "") if result.get("passed") else (1, f"see {step.output}")


def _compute(name: str, work: Path, *, device: str, small: bool) -> dict:
    if name == "environment":
        from megatron_opd.gpu_check.environment import environment_report

        report = environment_report()
        report["passed"] = device == "cpu" or report["cuda_available"]
        return report
    if name == "logits":
        from megatron_opd.gpu_check.numerics import logits_check

        sizes = dict(hidden=64, layers=2, vocab=300, tokens=16) if small else {}
        return logits_check(work, device=device, **sizes)
    if name == "vocab_ops":
        from megatron_opd.gpu_check.numerics import vocab_ops_check

        sizes = dict(tokens=64, vocab=1000) if small else {}
        return vocab_ops_check(device=device, **sizes)
    if name == "generation":
        from megatron_opd.gpu_check.generation import generation_check

        sizes = {}
        if small:
            shape = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=128, max_position_embeddings=256)  # fmt: skip
            sizes = dict(batch=8, prompt_tokens=8, new_tokens=8, shape=shape, dtype="float32")
        return generation_check(work, device=device, **sizes)
    from megatron_opd.gpu_check import training

    if name == "trainer_resume":
        return training.trainer_resume_check(work)
    if name == "chunked_stop":
        return training.chunked_check(work, offload=False)
    if name == "offload_chunking":
        return training.chunked_check(work, offload=True)
    raise ValueError(f"unknown step {name!r}")


def _cuda_tests(output: Path) -> tuple[int, str]:
    """The suite's CUDA tests (marker ``gpu``), their output kept in ``output``."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "tests").is_dir():
        return SKIP_EXIT_CODE, f"no tests/ next to the package ({repo})"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "-rs", str(repo / "tests")]  # fmt: skip
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    output.write_text("$ " + " ".join(command) + "\n" + done.stdout + done.stderr)
    if done.returncode == 5:
        return SKIP_EXIT_CODE, "no CUDA test collected"
    return (0, "") if done.returncode == 0 else (1, f"pytest exit {done.returncode}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_opd.gpu_check")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one step")
    run.add_argument("step", choices=STEP_NAMES)
    run.add_argument("--out", required=True, type=Path)
    run.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    run.add_argument("--small", action="store_true", help="test sizes")
    args = parser.parse_args(argv)
    code, reason = run_step(args.step, args.out, device=args.device, small=args.small)
    if reason:
        print(reason)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
