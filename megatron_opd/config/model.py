"""Which model to load and how to build it (student or teacher)."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
RECOMPUTE_MODES = ("selective", "full")


@dataclass(kw_only=True)
class ModelConfig:
    """A model to build: where its weights live and the numerics to run it with."""

    path: str = ""
    """An HF directory (config.json plus *.safetensors, single file or sharded with
    model.safetensors.index.json), or a Megatron checkpoint written by
    ``megatron-opd convert hf-to-megatron`` (holds ``hf_config/config.json``)."""

    dtype: str = "float32"
    """Parameter dtype: ``float32`` (CPU, tests) or ``bfloat16`` (GPU training)."""

    fp8: str | None = None
    """FP8 format for the Transformer Engine linear layers: None (off), ``e4m3`` or
    ``hybrid`` (e4m3 forward, e5m2 gradients). Needs CUDA and Transformer Engine."""

    fp8_recipe: str = "delayed"
    """TE FP8 scaling recipe: ``delayed``, ``tensorwise``, ``mxfp8`` (Blackwell) or
    ``blockwise``. Only read when ``fp8`` is set."""

    fp8_amax_history_len: int = 1024
    """Amax history length of the ``delayed`` recipe."""

    fp8_param: bool = False
    """Keep the parameters themselves in FP8 (saves memory; TE only)."""

    transformer_impl: str = "auto"
    """Layer implementation: ``auto`` (Transformer Engine when it imports, else local),
    ``local`` (plain torch, the CPU path) or ``transformer_engine`` (fail if absent)."""

    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary (embedding and output rows) to a multiple of this times the
    tensor-parallel size, as Megatron does; padded logits are masked downstream."""

    recompute: str | None = None
    """Activation recomputation: None, ``selective`` (attention core) or ``full``
    (every layer, uniform)."""

    offload_teacher: bool = False
    """Move the frozen teacher's weights to CPU memory between its uses (GPU only)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ValueError(f"model.fp8 must be null or one of {FP8_FORMATS}, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(
                f"model.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}"
            )
        if self.fp8 is not None and self.dtype != "bfloat16":
            raise ValueError(
                "model.fp8 needs model.dtype=bfloat16 (FP8 layers keep bf16 master weights)"
            )
        if not isinstance(self.fp8_amax_history_len, int) or self.fp8_amax_history_len < 1:
            raise ValueError("model.fp8_amax_history_len must be a positive integer")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(
                f"model.transformer_impl must be one of {TRANSFORMER_IMPLS}, "
                f"got {self.transformer_impl!r}"
            )
        if self.fp8 is not None and self.transformer_impl == "local":
            raise ValueError(
                "model.fp8 needs Transformer Engine layers; set model.transformer_impl to "
                "auto or transformer_engine, or model.fp8=null"
            )
        divisor = self.make_vocab_size_divisible_by
        if not isinstance(divisor, int) or divisor < 1:
            raise ValueError(
                f"model.make_vocab_size_divisible_by must be a positive integer, got {divisor!r}"
            )
        if self.recompute is not None and self.recompute not in RECOMPUTE_MODES:
            raise ValueError(
                f"model.recompute must be null or one of {RECOMPUTE_MODES}, got {self.recompute!r}"
            )
