"""How the student samples responses (the ROLLOUT stage of a step)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class VLLMConfig:
    """The vLLM engine (``rollout.engine=vllm``): one colocated vLLM per rank, sharing
    the rank's GPU with Megatron through sleep mode."""

    gpu_memory_utilization: float = 0.4
    """Fraction of the whole GPU's memory vLLM may take for its weights and KV cache
    while it is awake. vLLM checks at start-up that this much is free, i.e. after both
    Megatron models are built: lower it if vLLM reports too little free memory."""

    max_model_len: int = 0
    """Longest prompt + response vLLM accepts (sizes its KV-cache blocks per request);
    0 = ``data.max_prompt_length + rollout.max_new_tokens``."""

    sleep_level: Literal[1, 2] = 2
    """vLLM sleep mode between rollouts. 2 (vLLM's RLHF setting) discards the weights and
    the KV cache: the engine pushes the student's weights again before the next rollout
    anyway. 1 keeps a CPU copy of the weights (host memory = one student per rank)."""

    enforce_eager: bool = False
    """Run vLLM without CUDA graphs (slower decode, faster start, less memory)."""

    max_num_seqs: int = 0
    """Most sequences vLLM decodes at once (0 = vLLM's default)."""

    def __post_init__(self) -> None:
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(
                "rollout.vllm.gpu_memory_utilization must be in (0, 1], got "
                f"{self.gpu_memory_utilization}"
            )
        if self.sleep_level not in (1, 2):
            raise ValueError(f"rollout.vllm.sleep_level must be 1 or 2, got {self.sleep_level!r}")
        for name in ("max_model_len", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"rollout.vllm.{name} must be an integer >= 0, got {value!r}")


@dataclass(kw_only=True)
class RolloutConfig:
    """Sampling settings of the rollout engine.

    The number of new tokens of one rollout is not set here: the trainer passes the
    dynamic response budget's current value to every ``generate`` call, capped by
    ``max_new_tokens``.
    """

    engine: Literal["megatron", "vllm"] = "megatron"
    """``megatron``: KV-cached sampling with the student's own GPTModel (CPU and GPU).
    ``vllm``: a colocated vLLM on every rank with weights pushed from the student (GPU
    only; settings in ``rollout.vllm``)."""

    temperature: float = 1.0
    """Sampling temperature; 0 means greedy (argmax). The recorded sampled-token log-probs
    are always those of the temperature-1 student (the behaviour policy of the loss)."""

    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of most likely tokens whose
    probability reaches ``top_p`` (1.0 = the whole vocabulary); in (0, 1]."""

    n_samples_per_prompt: int = 4
    """Responses sampled per prompt (consecutive rows of the rollout batch)."""

    max_new_tokens: int = 12288
    """Hard cap on new tokens per response; a larger budget passed by the trainer is cut
    to this value."""

    chunk_size: int = 0
    """Chunked online-stop mode: every ``chunk_size`` new tokens the engine calls the
    chunk hook (teacher scoring + stopper), which may stop rows. 0 turns it off."""

    seed: int = 1234
    """Base seed of sampling; each call derives its own seed from it, the step and the
    data-parallel rank (:func:`rollout_seed`)."""

    generation_batch_size: int = 0
    """Rows generated together with one KV cache (a micro-batch of the rollout);
    0 = all rows of a call at once."""

    lean_decode: bool = True
    """``megatron`` engine, chunk scoring and the no-grad scoring forwards: run the
    forward as a lean plain-torch computation over the GPTModel's own parameters
    (:mod:`megatron_opd.rollout.lean_decoder`; tested equal to Megatron's forward) where
    the model allows it (one pipeline stage, local layer spec, no FP8); False, or any
    other model: Megatron's ``GPTModel.forward`` with a ``StaticInferenceContext``."""

    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vLLM engine (read only when ``engine`` is ``vllm``)."""

    def __post_init__(self) -> None:
        if self.engine not in ("megatron", "vllm"):
            raise ValueError(f"rollout.engine must be 'megatron' or 'vllm', got {self.engine!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"rollout.temperature must be a finite number >= 0 (0 = greedy), "
                f"got {self.temperature}"
            )
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        for name in ("n_samples_per_prompt", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"rollout.{name} must be an integer >= 1, got {value!r}")
        for name in ("chunk_size", "generation_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"rollout.{name} must be an integer >= 0 (0 = off), got {value!r}")

    @property
    def greedy(self) -> bool:
        """True when sampling is argmax (temperature 0)."""
        return self.temperature == 0.0


def rollout_seed(config: RolloutConfig, *, step: int, dp_rank: int) -> int:
    """The sampling seed of one rollout call.

    Equal on every TP and PP rank of a model replica (so they sample the same tokens),
    different across data-parallel ranks and steps (so replicas sample different
    responses). Kept below 2**63 for ``torch.Generator.manual_seed``.
    """
    return (config.seed * 1_000_003 + step * 10_007 + dp_rank) % (2**63 - 1)
