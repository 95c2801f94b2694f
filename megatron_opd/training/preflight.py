"""Everything a run can get wrong that is visible before a process group exists.

A mistake found after an hour of model loading, or after the last step, costs a node-day
on a shared cluster. So ``megatron-opd train`` and ``eval`` run these checks first, on
every rank independently (they read the same files and reach the same verdict, with no
communication), and the CLI prints the first failure once, as one ``error: ...`` line,
and exits non-zero:

- the models: each path holds a config.json of a supported architecture and weights
  that match it (safetensors headers only, or a complete converted checkpoint);
- the vocabulary: student and teacher share it, the tokenizer fits inside it, and
  ``prune.top_k`` does not exceed it;
- the layout: the world size divides into TP x PP x CP, TP divides the attention and
  key/value heads of both models, PP their layers, and the data-parallel size divides
  ``data.prompts_per_step`` (and the samples per rank divide into mini-batches);
- the data: the prompt file exists, parses, has the configured keys, and every prompt
  fits ``data.max_prompt_length`` and, with the responses, the student's context;
- the evaluation sets exist and have ``eval.problem_key`` / ``eval.answer_key``;
- the outputs: ``checkpoint.save_dir`` and ``logging.log_dir`` can be written, and
  ``checkpoint.export_hf_dir`` either does not exist or may be replaced;
- the checkpoint a run resumes from is whole (every file readable, every shard as long as
  its index says) and not past ``training.num_steps``.

The tokenizer and the tokenized prompts are handed on to the run (:class:`PreparedRun`),
so nothing is read twice.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_opd.config.model import ModelConfig
from megatron_opd.config.opd import EvalConfig, OPDConfig


@dataclass(frozen=True, kw_only=True)
class _Layout:
    """The parallel sizes :func:`check_parallel_layout` reads (no process group needed)."""

    tp_size: int
    pp_size: int


@dataclass(kw_only=True)
class PreparedRun:
    """What the checks already read, handed to :func:`build_components`."""

    tokenizer: Any
    """The student's tokenizer."""
    prompts: list[Any]
    """The training prompts, templated and tokenized (``data.prompts.Prompt``)."""
    resume_from: Path | None
    """The checkpoint the run will resume from (verified), or None."""


def check_model(model: ModelConfig, role: str, *, tp_size: int, pp_size: int):
    """The model's ModelInfo; ValueError when its path or config.json is wrong or its
    shape does not split over this TP/PP."""
    from megatron_opd.models.builder import check_parallel_layout
    from megatron_opd.models.hf_config import read_model_info
    from megatron_opd.models.megatron_checkpoint import read_conversion_metadata

    if not model.path:
        raise ValueError(f"{role}.path is empty; set it to an HF model directory")
    if not Path(model.path).is_dir():
        raise ValueError(f"{role}.path={model.path} does not exist (or is not a directory)")
    try:
        info = read_model_info(
            model.path,
            make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
            tp_size=tp_size,
        )
        metadata = read_conversion_metadata(model.path)
        if metadata is not None and int(metadata["padded_vocab_size"]) % tp_size:
            raise ValueError(
                f"its padded vocabulary of {metadata['padded_vocab_size']} rows is not "
                f"divisible by parallel.tensor_parallel_size={tp_size}; convert it again with "
                "a make_vocab_size_divisible_by that is a multiple of the TP size"
            )
        check_parallel_layout(info, _Layout(tp_size=tp_size, pp_size=pp_size))
    except ValueError as err:
        raise ValueError(f"{role}.path={model.path}: {err}") from None
    return info


def check_weights(model: ModelConfig, info, role: str) -> None:
    """ValueError when an HF directory's safetensors do not match its config.json (names
    and shapes from the file headers; no tensor is read). A converted checkpoint is
    complete by then (:func:`check_model` read its COMPLETE marker)."""
    from megatron_opd.conversion.hf_io import SafetensorsReader
    from megatron_opd.conversion.hf_loader import validate_hf_checkpoint
    from megatron_opd.models.megatron_checkpoint import is_megatron_checkpoint

    if is_megatron_checkpoint(model.path):
        return
    try:
        with SafetensorsReader(model.path) as reader:
            validate_hf_checkpoint(reader, info)
    except ValueError as err:
        raise ValueError(f"{role}.path={model.path}: {err}") from None


def check_world(config: OPDConfig, world_size: int) -> int:
    """The data-parallel size; ValueError when the world does not divide into the layout."""
    parallel = config.parallel
    if world_size % parallel.model_parallel_size:
        raise ValueError(
            f"{world_size} processes do not divide into parallel.tensor_parallel_size * "
            f"pipeline_parallel_size * context_parallel_size = {parallel.model_parallel_size}; "
            "change parallel.* or the number of processes (tasks / --nproc-per-node)"
        )
    return world_size // parallel.model_parallel_size


def check_batch_split(config: OPDConfig, dp_size: int) -> None:
    """ValueError when a step's prompts or samples do not split over DP and mini-batches."""
    data, rollout, training = config.data, config.rollout, config.training
    if data.prompts_per_step % dp_size:
        raise ValueError(
            f"data.prompts_per_step ({data.prompts_per_step}) must be divisible by the "
            f"data-parallel size {dp_size} (processes / (TP * PP * CP))"
        )
    samples_per_rank = data.prompts_per_step // dp_size * rollout.n_samples_per_prompt
    if samples_per_rank % training.num_mini_batches:
        raise ValueError(
            f"training.num_mini_batches ({training.num_mini_batches}) must divide the "
            f"samples per data-parallel rank, data.prompts_per_step / DP * "
            f"rollout.n_samples_per_prompt = {data.prompts_per_step} / {dp_size} "
            f"* {rollout.n_samples_per_prompt} = {samples_per_rank}"
        )


def check_tokenizer(tokenizer, info, role: str) -> None:
    """ValueError when the tokenizer produces ids the model has no embedding row for."""
    if tokenizer.vocab_size > info.vocab_size:
        raise ValueError(
            f"the tokenizer in {info.hf_dir} has {tokenizer.vocab_size} ids but the {role}'s "
            f"config.json vocab_size is {info.vocab_size}; use the tokenizer the model was "
            "trained with"
        )


def check_writable_dir(path: str, setting: str) -> None:
    """ValueError unless ``path`` is (or can be created as) a directory we can write.

    Probes with a real temporary file in the deepest existing directory (permission bits
    say nothing for root or on network filesystems) and leaves nothing behind.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{setting}={path} is a file, not a directory; choose a directory")
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{setting}={path} cannot be created: {probe} is a file, not a directory")
    try:
        handle, name = tempfile.mkstemp(prefix=".megatron-opd-write-test-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as err:
        raise ValueError(
            f"{setting}={path} is not writable ({err.strerror or err} in {probe}); choose a "
            "directory this job can write"
        ) from None


def check_eval_sets(eval_config: EvalConfig) -> None:
    """ValueError when an evaluation set is missing, malformed or lacks its keys."""
    from megatron_opd.eval import load_math_set

    for path in eval_config.datasets:
        try:
            load_math_set(
                path, problem_key=eval_config.problem_key, answer_key=eval_config.answer_key
            )
        except ValueError as err:
            raise ValueError(f"eval.datasets: {err}") from None


def check_resume(config: OPDConfig, student_info) -> Path | None:
    """The checkpoint a run will resume from, verified whole; None for a fresh start."""
    from megatron_opd.checkpoint import (
        check_steps_left,
        checkpoint_to_resume,
        verify_checkpoint_files,
    )

    ckpt = config.checkpoint
    if ckpt.load_dir is not None and not Path(ckpt.load_dir).is_dir():
        raise ValueError(f"checkpoint.load_dir={ckpt.load_dir} does not exist")
    found = checkpoint_to_resume(ckpt)
    if found is None:
        return None
    state = verify_checkpoint_files(found)
    check_steps_left(state["step"], config.training.num_steps, found)
    saved = state.get("model") or {}
    expected = {
        "family": student_info.family,
        "num_layers": student_info.num_layers,
        "hidden_size": student_info.hidden_size,
        "vocab_size": student_info.vocab_size,
    }
    diffs = [f"{k}: checkpoint {saved[k]!r} vs student {v!r}" for k, v in expected.items()
             if k in saved and saved[k] != v]  # fmt: skip
    if diffs:
        raise ValueError(
            f"checkpoint {found} was written for another student ({'; '.join(diffs)}); "
            "point checkpoint.save_dir / load_dir at this run's checkpoints"
        )
    return found


def preflight_training(config: OPDConfig, *, world_size: int) -> PreparedRun:
    """Run every check of ``megatron-opd train`` (see the module docstring); ValueError
    on the first failure, else what was read on the way."""
    from megatron_opd.data.prompts import prompt_loader_from_config
    from megatron_opd.data.tokenizer import load_tokenizer
    from megatron_opd.models.vocab import check_vocab_compatible

    parallel = config.parallel
    dp_size = check_world(config, world_size)
    check_batch_split(config, dp_size)
    layout = dict(tp_size=parallel.tensor_parallel_size, pp_size=parallel.pipeline_parallel_size)
    student = check_model(config.student, "student", **layout)
    teacher = check_model(config.teacher, "teacher", **layout)
    check_vocab_compatible(student.hf_dir, teacher.hf_dir)
    check_weights(config.student, student, "student")
    check_weights(config.teacher, teacher, "teacher")
    config.prune.check_vocab_size(student.vocab_size)
    tokenizer = load_tokenizer(
        student.hf_dir, chat_template_kwargs=config.data.chat_template_kwargs()
    )
    check_tokenizer(tokenizer, student, "student")

    data = config.data
    if not data.train_path:
        raise ValueError("data.train_path is empty; set it to a .jsonl or .parquet prompt file")
    context = student.max_position_embeddings
    if data.max_prompt_length + config.rollout.max_new_tokens > context:
        raise ValueError(
            f"data.max_prompt_length ({data.max_prompt_length}) + rollout.max_new_tokens "
            f"({config.rollout.max_new_tokens}) exceeds the student's context of {context} "
            f"tokens ({student.hf_dir}/config.json max_position_embeddings); lower one of them"
        )
    try:
        prompts = prompt_loader_from_config(data, tokenizer).prompts
    except ValueError as err:
        raise ValueError(f"data.train_path: {err}") from None
    check_eval_sets(config.eval)

    ckpt = config.checkpoint
    if ckpt.save_dir is not None:
        check_writable_dir(ckpt.save_dir, "checkpoint.save_dir")
    if config.logging.log_dir is not None:
        check_writable_dir(config.logging.log_dir, "logging.log_dir")
    if ckpt.export_hf_dir:
        if Path(ckpt.export_hf_dir).exists() and not ckpt.export_hf_overwrite:
            raise ValueError(
                f"checkpoint.export_hf_dir={ckpt.export_hf_dir} already exists; remove it, "
                "choose another directory, or set checkpoint.export_hf_overwrite=true"
            )
        check_writable_dir(str(Path(ckpt.export_hf_dir).parent), "checkpoint.export_hf_dir")
    resume_from = check_resume(config, student)
    return PreparedRun(tokenizer=tokenizer, prompts=prompts, resume_from=resume_from)


def preflight_evaluation(config: OPDConfig, *, world_size: int) -> None:
    """Every check of ``megatron-opd eval`` that needs no process group."""
    from megatron_opd.data.tokenizer import load_tokenizer

    if not config.eval.datasets:
        raise ValueError("eval.datasets is empty; list the .jsonl/.parquet sets to evaluate")
    check_world(config, world_size)
    parallel = config.parallel
    student = check_model(
        config.student,
        "student",
        tp_size=parallel.tensor_parallel_size,
        pp_size=parallel.pipeline_parallel_size,
    )
    check_weights(config.student, student, "student")
    check_tokenizer(load_tokenizer(student.hf_dir), student, "student")
    check_eval_sets(config.eval)
    if config.logging.log_dir is not None:
        check_writable_dir(config.logging.log_dir, "logging.log_dir")
