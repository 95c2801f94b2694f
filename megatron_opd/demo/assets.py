"""Everything a CPU distillation run needs, built from nothing: task, tokenizer, models.

:func:`make_demo_assets` writes, under ``out_dir``, for one built-in task
(:mod:`megatron_opd.data.tasks`: the demo's chain sums, or the long-horizon countdown of
``bench/reproduce.py``, :func:`long_task_settings`):

- ``tokenizer/``: a SentencePiece model trained on the task's text;
- ``prompts/train_prompts.jsonl`` and ``prompts/eval_prompts.jsonl``: disjoint splits
  of the task (problem, answer, worked solution);
- ``teacher/``: a tiny ``Qwen3ForCausalLM`` (default 4 layers, width 128) trained by SFT
  on worked solutions until it solves ``teacher_target_accuracy`` of the held-out split
  (greedy, math-verify, checked every 40 steps) or its step cap runs out;
- ``student/``: a smaller Qwen3 (default 2 layers, width 64) trained only until it first
  reaches ``student_min_accuracy``, so it knows the format and sometimes solves a
  problem, but is visibly worse than the teacher: the starting point of distillation.

Checkpoints are ``save_pretrained`` directories (safetensors) with ``tokenizer.model``
copied in, so each is self-contained (``load_tokenizer(dir)`` works on it). Each part
records a fingerprint of everything it was built from; a later call with the same
settings finds matching fingerprints and returns at once, a changed setting rebuilds
only the parts that depend on it. Training is counted in optimizer steps on one torch
thread, so a seed gives the same models on every machine (wall-clock caps remain only as
a guard). ``tiny=True`` gives a seconds-long variant for tests (small models, short
problems, counted in seconds; accuracy is whatever it reaches). With
``parallel_build`` the teacher and the student train at the same time in two
single-thread processes (on two cores that beats one two-thread process: the probe
``reference/long_task`` measured 5.6k tok/s with two threads vs 6.0-6.5k with one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from megatron_opd.data.tasks import get_task, write_jsonl
from megatron_opd.data.tokenizer import SENTENCEPIECE_FILE, load_tokenizer
from megatron_opd.demo.hf_sft import (
    SFTSchedule,
    TinyModelShape,
    build_qwen3,
    greedy_accuracy,
    train_sft,
)

ASSETS_VERSION = 2
"""Bump when the way assets are built changes, so old caches are rebuilt."""

FINGERPRINT_FILE = "demo_fingerprint.json"
REPORT_FILE = "sft_report.json"


@dataclass(kw_only=True)
class DemoAssetSettings:
    """What the demo assets are built from (all of it goes into the fingerprints)."""

    seed: int = 0
    """Seed of the task splits, tokenizer corpus, model init and batch order."""

    task: str = "chain"
    """Built-in task (:mod:`megatron_opd.data.tasks`): ``chain`` or ``countdown``."""

    min_size: int = 4
    """Smallest problem of the evaluation split and of distillation (chain: terms,
    countdown: steps)."""

    max_size: int = 8
    """Largest problem; models do not extrapolate beyond what SFT saw."""

    sft_min_size: int | None = None
    """Smallest problem in SFT batches (a curriculum: short problems teach the format and
    the stop rule cheaply); None: ``min_size``."""

    num_eval_problems: int = 200
    """Held-out problems (evaluation split)."""

    num_check_problems: int = 0
    """The first this many held-out problems are the SFT stopping check (0: all of them;
    long responses make a full check expensive)."""

    num_train_prompts: int = 2000
    """Problems written to ``train_prompts.jsonl`` for distillation."""

    tokenizer_vocab_size: int = 64
    """Requested SentencePiece size (the corpus may give fewer pieces)."""

    teacher: TinyModelShape = dataclasses.field(
        default_factory=lambda: TinyModelShape(
            num_layers=4,
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=384,
        )
    )
    """Teacher size."""

    student: TinyModelShape = dataclasses.field(
        default_factory=lambda: TinyModelShape(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=192,
        )
    )
    """Student size."""

    teacher_max_steps: int | None = 800
    """Teacher SFT length in optimizer steps (the LR schedule spans it); evaluations every
    ``teacher_eval_every_steps`` from ``teacher_min_eval_steps`` on. Counting steps (one
    torch thread) makes the assets the same on every machine; None: count seconds with
    the ``*_seconds`` fields below instead."""

    teacher_eval_every_steps: int = 40
    """Steps between teacher evaluations."""

    teacher_min_eval_steps: int = 360
    """No teacher evaluation before this step (it cannot solve anything earlier)."""

    student_max_steps: int | None = 600
    """Student SFT length cap in optimizer steps (None: seconds)."""

    student_eval_every_steps: int = 20
    """Steps between student evaluations (its accuracy moves within tens of steps)."""

    student_min_eval_steps: int = 140
    """No student evaluation before this step."""

    teacher_max_seconds: float = 420.0
    """Teacher SFT wall-time cap (training only; with step counts, a guard against a
    machine far slower than expected)."""

    teacher_target_accuracy: float = 0.9
    """Teacher SFT stops at the first evaluation with at least this held-out accuracy."""

    teacher_eval_every_seconds: float = 15.0
    """Training seconds between teacher evaluations."""

    teacher_min_eval_seconds: float = 60.0
    """No teacher evaluation before this much training."""

    student_max_seconds: float = 120.0
    """Student SFT wall-time cap."""

    student_min_accuracy: float = 0.1
    """Student SFT stops at the first evaluation with at least this accuracy."""

    student_eval_every_seconds: float = 3.0
    """Training seconds between student evaluations (its accuracy jumps within seconds)."""

    student_min_eval_seconds: float = 10.0
    """No student evaluation before this much training."""

    batch_size: int = 32
    """SFT problems per optimizer step. 32 reached the teacher target with ~40 % less
    compute than 64 (572 vs 478 steps at half the cost per step; seed 0)."""

    lr: float = 3e-3
    """Peak SFT learning rate."""

    num_threads: int = 2
    """torch CPU threads during the build. Two suit two idle cores; on a machine shared
    with other busy processes use 1: two OpenMP threads then ran ~10x slower per step
    than one (measured: 6.4 s vs 0.65 s per teacher step at load average ~3.7)."""

    warn_if_weak: bool = True
    """Warn when the teacher misses its target or is not better than the student (the
    usual cause is a CPU busy with other work: the time caps then buy fewer steps)."""

    budget_clock: Literal["wall", "cpu"] = "wall"
    """Clock of the time caps: wall time, or CPU time / threads (idle-machine wall time,
    for building on a shared machine)."""

    max_positions: int = 512
    """Context length of the models (prompt + response)."""

    parallel_build: bool = True
    """Train the teacher and the student at the same time in two single-thread processes
    (the student does not depend on the teacher; each is counted in its own steps with
    its own seed, so the models are the same either way)."""

    def __post_init__(self) -> None:
        get_task(self.task)
        low = self.min_size if self.sft_min_size is None else self.sft_min_size
        if not 1 <= low <= self.max_size or self.min_size > self.max_size:
            raise ValueError(
                f"need 1 <= sft_min_size, min_size <= max_size; got sft_min_size="
                f"{self.sft_min_size}, min_size={self.min_size}, max_size={self.max_size}"
            )
        if self.num_check_problems < 0 or self.num_check_problems > self.num_eval_problems:
            raise ValueError(
                f"num_check_problems must be in [0, num_eval_problems={self.num_eval_problems}],"
                f" got {self.num_check_problems}"
            )


def tiny_settings(seed: int = 0) -> DemoAssetSettings:
    """A seconds-long variant for tests: short problems, very small models, short caps,
    one evaluation per model (at the end)."""
    return DemoAssetSettings(
        seed=seed,
        min_size=2,
        max_size=3,
        num_eval_problems=16,
        num_train_prompts=64,
        teacher=TinyModelShape(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=128,
        ),
        student=TinyModelShape(
            num_layers=1,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
        ),
        teacher_max_steps=None,
        student_max_steps=None,
        teacher_max_seconds=8.0,
        teacher_target_accuracy=0.9,
        teacher_eval_every_seconds=8.0,
        teacher_min_eval_seconds=8.0,
        student_max_seconds=3.0,
        student_min_accuracy=0.1,
        student_eval_every_seconds=3.0,
        student_min_eval_seconds=3.0,
        batch_size=32,
        # One thread: at this size a second one gains little, and tests share the machine.
        num_threads=1,
        warn_if_weak=False,
        parallel_build=False,
    )


@dataclass(frozen=True, kw_only=True)
class DemoAssets:
    """Paths of the built assets and what the SFT runs reached."""

    tokenizer_dir: Path
    """Directory with ``tokenizer.model``."""

    train_prompts: Path
    """jsonl of training prompts (problem, answer, solution, num_terms)."""

    eval_prompts: Path
    """jsonl of held-out problems (disjoint from every training problem)."""

    teacher_dir: Path
    """HF checkpoint of the teacher (with the tokenizer)."""

    student_dir: Path
    """HF checkpoint of the student (with the tokenizer)."""

    teacher_report: dict
    """Teacher SFT: accuracy, train/eval seconds, steps, history."""

    student_report: dict
    """Student SFT: the same fields."""


def _fingerprint(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_current(directory: Path, fingerprint: str) -> bool:
    marker = directory / FINGERPRINT_FILE
    return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint


def _publish(tmp: Path, final: Path, fingerprint: str) -> None:
    """Mark ``tmp`` complete and move it to ``final`` (replacing a stale one)."""
    (tmp / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint}))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def _torch_threads(num_threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _warn_if_weak(teacher: dict, student: dict, s: DemoAssetSettings) -> None:
    fix = (
        "the time caps bought too few steps (a busy CPU?); raise teacher_max_seconds, "
        "build on idle cores, or set budget_clock='cpu'"
    )
    if teacher["accuracy"] < s.teacher_target_accuracy:
        warnings.warn(
            f"demo teacher reached {teacher['accuracy']:.1%} held-out accuracy in "
            f"{teacher['steps']} steps, below teacher_target_accuracy="
            f"{s.teacher_target_accuracy}; {fix}",
            RuntimeWarning,
            stacklevel=3,
        )
    if student["accuracy"] >= teacher["accuracy"]:
        warnings.warn(
            f"demo student ({student['accuracy']:.1%}) is not worse than the teacher "
            f"({teacher['accuracy']:.1%}), so distillation has nothing to teach; {fix}",
            RuntimeWarning,
            stacklevel=3,
        )


def long_task_settings(seed: int = 0, *, quick: bool = False) -> DemoAssetSettings:
    """The long-horizon countdown task of ``bench/reproduce.py``.

    Solutions of 16-40 steps are 118-286 tokens (median ~195). The teacher (2 layers,
    width 128) trains on 10-40 steps, checked greedily every 150 steps on 128 held-out
    problems until >= 90 %; the student (2 layers, width 64) stops at its first check
    with >= 10 %, far below the teacher. Both are counted in steps on one thread each,
    side by side. ``quick``: 3-8 step problems and smaller models, for the smoke test.
    """
    if quick:
        return DemoAssetSettings(
            seed=seed,
            task="countdown",
            min_size=3,
            max_size=8,
            num_eval_problems=64,
            num_train_prompts=256,
            tokenizer_vocab_size=48,
            teacher=TinyModelShape(
                num_layers=1,
                hidden_size=64,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=128,
            ),  # fmt: skip
            student=TinyModelShape(
                num_layers=1,
                hidden_size=32,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=64,
            ),  # fmt: skip
            teacher_max_steps=60,
            teacher_eval_every_steps=60,
            teacher_min_eval_steps=60,
            student_max_steps=20,
            student_eval_every_steps=20,
            student_min_eval_steps=20,
            batch_size=16,
            num_threads=1,
            warn_if_weak=False,
            max_positions=256,
            parallel_build=False,
        )
    return DemoAssetSettings(
        seed=seed,
        task="countdown",
        min_size=16,
        max_size=40,
        sft_min_size=10,
        num_eval_problems=600,
        num_check_problems=128,
        num_train_prompts=4000,
        tokenizer_vocab_size=48,
        teacher=TinyModelShape(
            num_layers=2,
            hidden_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=384,
        ),  # fmt: skip
        student=TinyModelShape(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=192,
        ),  # fmt: skip
        teacher_max_steps=2500,
        teacher_eval_every_steps=150,
        teacher_min_eval_steps=750,
        student_max_steps=2500,
        student_eval_every_steps=100,
        student_min_eval_steps=700,
        teacher_max_seconds=3000.0,
        student_max_seconds=1500.0,
        teacher_target_accuracy=0.9,
        student_min_accuracy=0.1,
        batch_size=16,
        num_threads=1,
        max_positions=512,
        parallel_build=True,
    )


@dataclass(frozen=True, kw_only=True)
class _ModelPart:
    """What one SFT build needs (picklable: it may run in a worker process)."""

    out_dir: Path
    role: str
    fingerprint: str
    shape: TinyModelShape
    schedule: SFTSchedule
    model_seed: int
    settings: DemoAssetSettings
    progress_position: int = 0


def _exit_with_parent(parent_pid: int) -> None:
    """In a worker process: exit as soon as the parent that started it is gone (a killed
    build must not leave an SFT run behind)."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _build_model_part_in_worker(part: _ModelPart, parent_pid: int) -> dict:
    _exit_with_parent(parent_pid)
    return _build_model_part(part)


def _build_model_part(part: _ModelPart) -> dict:
    """Train one model by SFT and publish it (or return the cached report)."""
    s = part.settings
    final = part.out_dir / part.role
    if _is_current(final, part.fingerprint):
        return json.loads((final / REPORT_FILE).read_text())
    task = get_task(s.task)
    tokenizer_dir = part.out_dir / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir)
    held_out = task.held_out(
        num_problems=s.num_eval_problems, seed=s.seed, min_size=s.min_size, max_size=s.max_size
    )
    check = held_out[: s.num_check_problems] if s.num_check_problems else held_out
    longest = max(len(tokenizer.encode(p.solution)) for p in held_out)
    max_new_tokens = longest + 16
    sft_low = s.min_size if s.sft_min_size is None else s.sft_min_size
    with _torch_threads(s.num_threads):
        model = build_qwen3(part.shape, tokenizer, seed=part.model_seed,
                            max_positions=s.max_positions)  # fmt: skip
        result = train_sft(
            model,
            tokenizer,
            task.training(
                seed=part.model_seed,
                min_size=sft_low,
                max_size=s.max_size,
                exclude=[p.problem for p in held_out],
            ),
            part.schedule,
            lambda: greedy_accuracy(model, tokenizer, check, max_new_tokens=max_new_tokens),
            size_range=(sft_low, s.max_size),
            seed=part.model_seed,
            progress_desc=f"SFT {part.role}",
            show_progress=part.progress_position >= 0,
            progress_position=max(part.progress_position, 0),
        )
    tmp = _fresh_tmp(final)
    model.save_pretrained(tmp)
    shutil.copy(tokenizer_dir / SENTENCEPIECE_FILE, tmp / SENTENCEPIECE_FILE)
    report = dataclasses.asdict(result)
    report["num_parameters"] = sum(p.numel() for p in model.parameters())
    report["max_new_tokens"] = max_new_tokens
    report["check_problems"] = len(check)
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    _publish(tmp, final, part.fingerprint)
    return report


def make_demo_assets(
    out_dir: str | Path,
    *,
    tiny: bool = False,
    seed: int = 0,
    settings: DemoAssetSettings | None = None,
    show_progress: bool = True,
    **overrides,
) -> DemoAssets:
    """Build (or find cached) tokenizer, task splits, teacher and student under ``out_dir``.

    ``settings`` gives every knob; otherwise the defaults (or :func:`tiny_settings` when
    ``tiny``) with ``seed`` and any ``overrides`` of :class:`DemoAssetSettings` fields,
    e.g. ``teacher_max_seconds=120``.
    """
    if settings is None:
        base = tiny_settings(seed) if tiny else DemoAssetSettings(seed=seed)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(DemoAssetSettings)}
        if unknown:
            raise ValueError(
                f"make_demo_assets: unknown setting(s) {sorted(unknown)}; "
                "see DemoAssetSettings for the valid names"
            )
        settings = dataclasses.replace(base, **overrides)
    elif overrides:
        raise ValueError("make_demo_assets: pass either settings= or keyword overrides, not both")
    s = settings
    if not 0 < s.student_min_accuracy <= s.teacher_target_accuracy <= 1:
        raise ValueError(
            "need 0 < student_min_accuracy <= teacher_target_accuracy <= 1, got "
            f"{s.student_min_accuracy} and {s.teacher_target_accuracy}"
        )
    task = get_task(s.task)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = {"version": ASSETS_VERSION, "seed": s.seed}
    # The chain task's fingerprints keep their original keys, so its caches stay valid.
    task_key = {} if s.task == "chain" else {"task": s.task, "sft_min_size": s.sft_min_size,
                                              "positions": s.max_positions}  # fmt: skip

    with _torch_threads(s.num_threads):
        tokenizer_dir = out_dir / "tokenizer"
        tok_fp = _fingerprint({**common, "part": "tokenizer", "vocab": s.tokenizer_vocab_size,
                               "terms": (2, 12), **task_key})  # fmt: skip
        if not _is_current(tokenizer_dir, tok_fp):
            tmp = _fresh_tmp(tokenizer_dir)
            task.train_tokenizer(tmp, seed=s.seed, vocab_size=s.tokenizer_vocab_size)
            _publish(tmp, tokenizer_dir, tok_fp)

        sizes = {"min_terms": s.min_size, "max_terms": s.max_size}
        held_out = task.held_out(
            num_problems=s.num_eval_problems, seed=s.seed, min_size=s.min_size, max_size=s.max_size
        )
        splits_dir = out_dir / "prompts"
        counts = {"eval": s.num_eval_problems, "train": s.num_train_prompts}
        split_fp = _fingerprint({**common, "part": "splits", **sizes, **task_key, **counts})
        if not _is_current(splits_dir, split_fp):
            tmp = _fresh_tmp(splits_dir)
            # A seed offset keeps the distillation prompts a different stream from SFT's.
            stream = task.training(seed=s.seed + 1, min_size=s.min_size, max_size=s.max_size,
                                   exclude=[p.problem for p in held_out])  # fmt: skip
            write_jsonl(
                tmp / "train_prompts.jsonl", (next(stream) for _ in range(s.num_train_prompts))
            )
            write_jsonl(tmp / "eval_prompts.jsonl", held_out)
            _publish(tmp, splits_dir, split_fp)

    def part(role: str, shape: TinyModelShape, schedule: SFTSchedule, model_seed: int,
             position: int) -> _ModelPart:  # fmt: skip
        extra = {"check": s.num_check_problems} if s.num_check_problems else {}
        fp = _fingerprint({**common, "part": role, "tokenizer": tok_fp, "splits": split_fp,
                           "shape": dataclasses.asdict(shape),
                           "schedule": dataclasses.asdict(schedule), **sizes, **extra})  # fmt: skip
        return _ModelPart(out_dir=out_dir, role=role, fingerprint=fp, shape=shape,
                          schedule=schedule, model_seed=model_seed, settings=s,
                          progress_position=position if show_progress else -1)  # fmt: skip

    teacher_part = part(
        "teacher",
        s.teacher,
        SFTSchedule(
            max_seconds=s.teacher_max_seconds,
            target_accuracy=s.teacher_target_accuracy,
            eval_every_seconds=s.teacher_eval_every_seconds,
            min_eval_seconds=s.teacher_min_eval_seconds,
            batch_size=s.batch_size,
            lr=s.lr,
            clock=s.budget_clock,
            max_steps=s.teacher_max_steps,
            eval_every_steps=s.teacher_eval_every_steps,
            min_eval_steps=s.teacher_min_eval_steps,
        ),
        s.seed * 1000 + 11,
        0,
    )
    student_part = part(
        "student",
        s.student,
        SFTSchedule(
            max_seconds=s.student_max_seconds,
            target_accuracy=s.student_min_accuracy,
            eval_every_seconds=s.student_eval_every_seconds,
            min_eval_seconds=s.student_min_eval_seconds,
            batch_size=s.batch_size,
            lr=s.lr,
            clock=s.budget_clock,
            max_steps=s.student_max_steps,
            eval_every_steps=s.student_eval_every_steps,
            min_eval_steps=s.student_min_eval_steps,
        ),
        s.seed * 1000 + 22,
        1 if s.parallel_build else 0,
    )
    if s.parallel_build:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            import os

            student_future = pool.submit(_build_model_part_in_worker, student_part, os.getpid())
            teacher_report = _build_model_part(teacher_part)
            student_report = student_future.result()
    else:
        teacher_report = _build_model_part(teacher_part)
        student_report = _build_model_part(student_part)
    if s.warn_if_weak:
        _warn_if_weak(teacher_report, student_report, s)
    return DemoAssets(
        tokenizer_dir=tokenizer_dir,
        train_prompts=splits_dir / "train_prompts.jsonl",
        eval_prompts=splits_dir / "eval_prompts.jsonl",
        teacher_dir=out_dir / "teacher",
        student_dir=out_dir / "student",
        teacher_report=teacher_report,
        student_report=student_report,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m megatron_opd.demo.assets OUT_DIR [--tiny] [--seed N]``: build and report."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--tiny", action="store_true", help="seconds-long test variant")
    parser.add_argument(
        "--long-task", action="store_true", help="the countdown task of bench/reproduce.py"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a setting"
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = json.loads(value) if value[:1].isdigit() or value[:1] == "-" else value
    if args.long_task:
        settings = dataclasses.replace(long_task_settings(args.seed, quick=args.tiny), **overrides)
        assets = make_demo_assets(args.out_dir, settings=settings)
    else:
        assets = make_demo_assets(args.out_dir, tiny=args.tiny, seed=args.seed, **overrides)
    for role, report in (("teacher", assets.teacher_report), ("student", assets.student_report)):
        print(
            f"{role}: accuracy {report['accuracy']:.3f}, train {report['train_seconds']:.0f} s, "
            f"eval {report['eval_seconds']:.0f} s, wall {report['wall_seconds']:.0f} s, "
            f"{report['steps']} steps, "
            f"{report['num_parameters']} parameters"
        )


if __name__ == "__main__":
    main()
