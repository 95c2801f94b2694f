"""Build everything a run needs, in an order that fails early with a clear message.

Order: tokenizers and the shared-vocabulary check (before any weight is read), models
(student trainable, teacher frozen) with their weights, the rollout engine, the dataset,
the metrics logger. Each user mistake (paths, vocab mismatch, TP not dividing heads)
surfaces as a ValueError naming the file or field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_opd.config.opd import OPDConfig
from megatron_opd.distributed import ParallelGroups
from megatron_opd.training.metrics_logger import MetricsLogger


@dataclass(kw_only=True)
class RunComponents:
    """What the Trainer drives (built by :func:`build_components`)."""

    tokenizer: Any
    """The student's tokenizer (identical vocabulary to the teacher's)."""
    student_chunks: list[torch.nn.Module]
    """This rank's student GPTModel chunk(s), weights loaded."""
    student_info: Any
    """ModelInfo of the student."""
    teacher_chunks: list[torch.nn.Module]
    """This rank's frozen teacher chunk(s)."""
    vocab_size: int
    """Real (unpadded) shared vocabulary size."""
    engine: Any
    """The rollout engine."""
    dataset: Any
    """The prompt stream (``next_prompts``, ``state_dict``)."""
    log: MetricsLogger
    """Metrics sinks (rank 0 writes)."""
    make_chunk_listener: Callable[[], Any]
    """New online-stop listener per rollout (chunked mode)."""
    score_micro_batch_size: int
    """Rows per scoring forward."""
    teacher_onload: Callable[[], None]
    """Bring an offloaded teacher back to the device."""
    teacher_offload: Callable[[], None]
    """Offload the teacher (no-op unless teacher.offload_teacher)."""

    @property
    def student_summary(self) -> dict[str, Any]:
        """Architecture facts a checkpoint must match to be resumed into this run."""
        info = self.student_info
        return {
            "family": info.family,
            "num_layers": info.num_layers,
            "hidden_size": info.hidden_size,
            "num_attention_heads": info.num_attention_heads,
            "num_query_groups": info.num_query_groups,
            "vocab_size": info.vocab_size,
        }


def build_components(config: OPDConfig, groups: ParallelGroups) -> RunComponents:
    """Tokenizer, models, engine, data and logger of a run (on every rank)."""
    from megatron_opd.conversion import load_model_weights
    from megatron_opd.data.dataset import PromptDataset
    from megatron_opd.data.tokenizer import load_tokenizer
    from megatron_opd.models import build_model
    from megatron_opd.models.hf_config import find_hf_config_dir
    from megatron_opd.models.teacher import offload_to_cpu, onload
    from megatron_opd.models.vocab import check_vocab_compatible
    from megatron_opd.rollout.chunk_scorer import ChunkScorer
    from megatron_opd.rollout.megatron_engine import MegatronRolloutEngine

    student_dir = find_hf_config_dir(config.student.path)
    teacher_dir = find_hf_config_dir(config.teacher.path)
    check_vocab_compatible(student_dir, teacher_dir)
    tokenizer = load_tokenizer(student_dir)

    student_chunks, student_info = build_model(config.student, groups, role="student")
    load_model_weights(student_chunks, config.student, student_info, groups)
    teacher_chunks, teacher_info = build_model(config.teacher, groups, role="teacher")
    load_model_weights(teacher_chunks, config.teacher, teacher_info, groups)
    if student_info.vocab_size != teacher_info.vocab_size:
        raise ValueError(
            f"student vocab_size {student_info.vocab_size} ({student_dir}/config.json) != "
            f"teacher vocab_size {teacher_info.vocab_size} ({teacher_dir}/config.json); "
            "on-policy distillation needs one shared vocabulary"
        )
    config.prune.check_vocab_size(student_info.vocab_size)
    max_context = student_info.max_position_embeddings

    if config.rollout.engine == "vllm":
        from megatron_opd.rollout.vllm_engine import VLLMRolloutEngine

        engine = VLLMRolloutEngine(student_chunks[0], groups, config.rollout, tokenizer=tokenizer)
    else:
        engine = MegatronRolloutEngine(
            student_chunks[0],
            groups,
            config.rollout,
            eos_token_ids=[tokenizer.eos_id],
            pad_id=tokenizer.pad_id,
            vocab_size=student_info.vocab_size,
        )
    dataset = PromptDataset(
        config.data,
        tokenizer,
        max_prompt_length=max(1, max_context - config.rollout.max_new_tokens)
        if config.data.max_prompt_length <= 0
        else config.data.max_prompt_length,
    )
    log = MetricsLogger(
        config.logging.log_dir,
        total_steps=config.training.num_steps,
        enabled=groups.rank == 0,
        tensorboard=config.logging.tensorboard,
        wandb_project=config.logging.wandb_project,
        show_progress=config.logging.progress_bar,
    )
    offload = config.teacher.offload_teacher and groups.platform.is_cuda

    return RunComponents(
        tokenizer=tokenizer,
        student_chunks=student_chunks,
        student_info=student_info,
        teacher_chunks=teacher_chunks,
        vocab_size=student_info.vocab_size,
        engine=engine,
        dataset=dataset,
        log=log,
        make_chunk_listener=lambda: ChunkScorer(
            teacher_chunks[0], groups, config.prune, vocab_size=student_info.vocab_size
        ),
        score_micro_batch_size=config.training.max_micro_batch_rows,
        teacher_onload=(lambda: onload(teacher_chunks, groups.platform.device))
        if offload
        else (lambda: None),
        teacher_offload=(lambda: offload_to_cpu(teacher_chunks)) if offload else (lambda: None),
    )
