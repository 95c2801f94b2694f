"""The GPU check's plan: steps, time limits, output files, and the wheels to carry.

Standard library only: ``--download`` runs this on whatever Python the connected machine
has (``pip download`` is told the target: CPython 3.12, manylinux x86_64).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
"""pip matches each tag exactly; megatron-core ships manylinux_2_24/2_28 wheels."""

WHEELS = (
    "megatron-core==0.19.2",
    "math-verify==0.9.0",
    "latex2sympy2_extended==1.11.0",
    "antlr4-python3-runtime==4.13.2",
)
"""What the project needs beyond a CUDA PyTorch image (torch, numpy, transformers,
safetensors, sentencepiece, pyyaml, pyarrow, psutil, pytest ... are already there):
fetched with ``--no-deps``, so every dependency is named here."""

TIME_LIMIT_S = 470
"""The steps' limits add up to at most this (the whole check must end within 8 min)."""


@dataclass(frozen=True)
class Step:
    """One check, run in its own process."""

    name: str
    """Step name (``python -m megatron_opd.gpu_check run <name>``)."""
    output: str
    """File it writes into the output folder."""
    limit_s: int
    """Wall-clock limit; past it the step is killed and counted as FAIL."""
    what: str
    """One line for the plan listing."""


STEPS = (
    Step("environment", "environment.json", 30,
         "versions, GPU, Transformer Engine / vLLM / apex presence"),
    Step("cuda_tests", "cuda_tests.txt", 85, "the suite's CUDA tests (pytest -m gpu)"),
    Step("logits", "logits.json", 45,
         "bf16 logits of the local spec vs transformers (fp32 reference)"),
    Step("trainer_resume", "trainer_resume.json", 90,
         "trainer at TP=1 on NCCL: 3 steps, and 2 + save + resume + 1"),
    Step("chunked_stop", "chunked_stop.json", 45, "chunked online stop run (2 steps)"),
    Step("offload_chunking", "offload_chunking.json", 45,
         "teacher offload with chunked rollouts (2 steps)"),
    Step("vocab_ops", "vocab_ops.json", 45,
         "vocab-parallel top-k/log-probs/logsumexp on [8192, 151936] bf16 vs torch"),
    Step("generation", "generation.json", 75,
         "KV-cached generation tokens/s, batch 64, Qwen3-0.6B shape"),
)  # fmt: skip
STEP_NAMES = tuple(step.name for step in STEPS)
assert sum(step.limit_s for step in STEPS) <= TIME_LIMIT_S

SKIP_EXIT_CODE = 3
"""A step exits with this (after printing why) when it cannot apply on this machine."""


def download_command(wheel_dir: str, python: str = "python3") -> list[str]:
    """The ``pip download`` that fetches :data:`WHEELS` for the GPU machine into ``wheel_dir``."""
    command = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", TARGET_PYTHON, "--implementation", "cp"]  # fmt: skip
    for platform in TARGET_PLATFORMS:
        command += ["--platform", platform]
    return [*command, "--dest", wheel_dir, *WHEELS]


def install_command(wheel_dir: str, site_dir: str, python: str = "python3") -> list[str]:
    """The offline install of the carried wheels into ``site_dir`` (put on PYTHONPATH)."""
    return [python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
            "--no-compile", "--target", site_dir, f"{wheel_dir}/*.whl"]  # fmt: skip


def select_steps(names: str | None) -> tuple[Step, ...]:
    """Steps named in a comma list (all when None); ValueError for an unknown name."""
    if not names:
        return STEPS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in STEP_NAMES]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; choose from {', '.join(STEP_NAMES)}")
    return tuple(step for step in STEPS if step.name in wanted)


def plan_lines(steps: tuple[Step, ...], out_dir: str) -> list[str]:
    """What the offline run will do, one line per step (the ``--dry-run`` output)."""
    lines = []
    for step in steps:
        command = f"python3 -m megatron_opd.gpu_check run {step.name} --out {out_dir}"
        lines.append(f"{step.name:17s} <= {step.limit_s:3d}s  {out_dir}/{step.output}  "
                     f"[{step.what}]  $ {command}")  # fmt: skip
    total = sum(step.limit_s for step in steps)
    lines.append(f"total limit {total}s (<= {TIME_LIMIT_S}s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``plan`` / ``download-command`` / ``install-command`` for tools/gpu_check.sh."""
    parser = argparse.ArgumentParser(prog="python -m megatron_opd.gpu_check.plan")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan")
    plan.add_argument("--out", required=True)
    plan.add_argument("--steps", default=None)
    download = sub.add_parser("download-command")
    download.add_argument("wheel_dir")
    download.add_argument("--python", default="python3")
    install = sub.add_parser("install-command")
    install.add_argument("wheel_dir")
    install.add_argument("site_dir")
    install.add_argument("--python", default="python3")
    sub.add_parser("steps")
    sub.add_parser("limits")
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            print("\n".join(plan_lines(select_steps(args.steps), args.out)))
        elif args.command == "download-command":
            print(shlex.join(download_command(args.wheel_dir, args.python)))
        elif args.command == "install-command":
            # Left unquoted for the shell's glob: paths with spaces are not supported.
            print(" ".join(install_command(args.wheel_dir, args.site_dir, args.python)))
        elif args.command == "steps":
            print(" ".join(STEP_NAMES))
        else:
            print("\n".join(f"{s.name} {s.limit_s} {s.output}" for s in STEPS))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
