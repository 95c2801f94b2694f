"""Build everything a run needs: models, rollout engine, prompt stream, metrics logger.

The user's mistakes (paths, vocab mismatch, TP not dividing heads, data, unwritable
outputs) are found before this runs, by :mod:`megatron_opd.training.preflight`, whose
:class:`PreparedRun` (tokenizer, tokenized prompts) this module builds on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_opd.checkpoint import unwrap_model
from megatron_opd.config.opd import OPDConfig
from megatron_opd.distributed import ParallelGroups
from megatron_opd.training.metrics_logger import MetricsLogger
from megatron_opd.training.preflight import PreparedRun, preflight_training


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


def _wrap_half_precision(chunks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """bf16/fp16 GPTModels run inside Megatron's Float16Module (casts the first stage's
    inputs and the last stage's outputs to fp32), as Megatron-LM does."""
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    if not (config.bf16 or config.fp16):
        return chunks
    return [Float16Module(config, chunk) for chunk in chunks]


class StepPrompts:
    """Each step's global prompt batch, split over data-parallel ranks (resumable)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def next_prompts(self, *, dp_rank: int, dp_size: int) -> tuple[list[list[int]], list[str]]:
        """This DP rank's ``(prompt token ids, answers)`` of the next step."""
        batch = self.loader.next_batch()
        per_rank = len(batch) // dp_size
        mine = batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        return [list(p.token_ids) for p in mine], [p.answer or "" for p in mine]

    def state_dict(self) -> dict:
        """Position in the prompt stream."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position."""
        self.loader.load_state_dict(state)


def teacher_offload_applies(config: OPDConfig, groups: ParallelGroups) -> bool:
    """``teacher.offload_teacher`` on a GPU (on CPU the teacher already lives in host memory)."""
    return config.teacher.offload_teacher and groups.platform.is_cuda


def build_components(
    config: OPDConfig, groups: ParallelGroups, *, prepared: PreparedRun | None = None
) -> RunComponents:
    """Tokenizer, models, engine, data and logger of a run (on every rank).

    ``prepared``: the result of :func:`preflight_training` (run here when None).
    """
    from megatron_opd.conversion import load_model_weights
    from megatron_opd.data.prompts import PromptLoader
    from megatron_opd.models import build_model
    from megatron_opd.models.hf_config import find_hf_config_dir
    from megatron_opd.models.teacher import offload_to_cpu, onload
    from megatron_opd.rollout.chunk_scorer import ChunkScorer
    from megatron_opd.rollout.megatron_engine import MegatronRolloutEngine

    if prepared is None:
        prepared = preflight_training(config, world_size=groups.world_size)
    student_dir = find_hf_config_dir(config.student.path)
    teacher_dir = find_hf_config_dir(config.teacher.path)
    tokenizer = prepared.tokenizer

    student_chunks, student_info = build_model(config.student, groups, role="student")
    load_model_weights(student_chunks, config.student, student_info, groups)
    teacher_chunks, teacher_info = build_model(config.teacher, groups, role="teacher")
    load_model_weights(teacher_chunks, config.teacher, teacher_info, groups)
    student_chunks = _wrap_half_precision(student_chunks)
    teacher_chunks = _wrap_half_precision(teacher_chunks)
    if student_info.vocab_size != teacher_info.vocab_size:
        raise ValueError(
            f"student vocab_size {student_info.vocab_size} ({student_dir}/config.json) != "
            f"teacher vocab_size {teacher_info.vocab_size} ({teacher_dir}/config.json); "
            "on-policy distillation needs one shared vocabulary"
        )

    if config.rollout.engine == "vllm":
        from megatron_opd.conversion.export import broadcast_hf_weights
        from megatron_opd.rollout.vllm_engine import VLLMRolloutEngine

        inner = [unwrap_model(chunk) for chunk in student_chunks]
        weights_dtype = torch.bfloat16 if config.student.dtype == "bfloat16" else torch.float32
        engine = VLLMRolloutEngine(
            groups,
            config.rollout,
            hf_model_dir=str(student_dir),
            hf_weights=lambda: broadcast_hf_weights(
                inner, student_info, groups, dtype=weights_dtype
            ),
            eos_token_ids=[tokenizer.eos_id],
            pad_id=tokenizer.pad_id,
            dtype=config.student.dtype,
            max_model_len=config.rollout.vllm.max_model_len
            or config.data.max_prompt_length + config.rollout.max_new_tokens,
            max_logprobs=max(20, config.prune.top_k),
        )
    else:
        engine = MegatronRolloutEngine(
            student_chunks[0],
            groups,
            config.rollout,
            eos_token_ids=[tokenizer.eos_id],
            pad_id=tokenizer.pad_id,
            vocab_size=student_info.vocab_size,
        )
    dataset = StepPrompts(
        PromptLoader(
            prepared.prompts, prompts_per_step=config.data.prompts_per_step, seed=config.data.seed
        )
    )
    log = MetricsLogger(
        config.logging.log_dir,
        total_steps=config.training.num_steps,
        enabled=groups.rank == 0,
        tensorboard=config.logging.tensorboard,
        wandb_project=config.logging.wandb_project,
        show_progress=config.logging.progress_bar,
    )
    offload = teacher_offload_applies(config, groups)
    teacher_onload = (
        (lambda: onload(teacher_chunks, groups.platform.device)) if offload else (lambda: None)
    )

    def make_chunk_listener():
        # The chunk listener scores every chunk with the teacher during the rollout, long
        # before the scoring phase onloads it: an offloaded teacher must come back first.
        teacher_onload()
        return ChunkScorer(
            teacher_chunks[0],
            groups,
            config.prune,
            vocab_size=student_info.vocab_size,
            teacher_temperature=config.loss.teacher_temperature,
            lean_decode=config.rollout.lean_decode,
        )

    return RunComponents(
        tokenizer=tokenizer,
        student_chunks=student_chunks,
        student_info=student_info,
        teacher_chunks=teacher_chunks,
        vocab_size=student_info.vocab_size,
        engine=engine,
        dataset=dataset,
        log=log,
        make_chunk_listener=make_chunk_listener,
        score_micro_batch_size=config.training.max_micro_batch_rows,
        teacher_onload=teacher_onload,
        teacher_offload=(lambda: offload_to_cpu(teacher_chunks)) if offload else (lambda: None),
    )
