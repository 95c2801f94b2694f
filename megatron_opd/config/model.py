"""Which model to load and how to build it (student or teacher).

FP8 follows Megatron-LM's flags: ``fp8`` = ``--fp8-format``, ``fp8_recipe`` =
``--fp8-recipe``, ``fp8_param`` = ``--fp8-param-gather`` (FP8 parameters built by
Transformer Engine's ``fp8_model_init``, all-gathered in FP8 by Megatron DDP's
``fp8_param_gather``, re-quantized from the distributed optimizer's FP32 master shards,
so it needs ``parallel.use_distributed_optimizer``), ``first_last_layers_bf16`` /
``num_layers_at_{start,end}_in_bf16`` = ``--first-last-layers-bf16`` and friends.
:data:`FP8_PRESETS` holds one documented setting per recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")

FP8_PRESETS: dict[str, dict[str, object]] = {
    # Per-tensor scales from a 1024-step amax history (Megatron-LM's long-standing H100
    # setting). TE cannot keep the first/last layers in bf16 with it; parameters stay bf16.
    "delayed": {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 1024,
                "fp8_param": False, "first_last_layers_bf16": False},
    # Per-tensor scales computed from each tensor as it is cast (current scaling; H100).
    # FP8 parameters and FP8 all-gather; the first and last layer stay bf16.
    "tensorwise": {"fp8": "hybrid", "fp8_recipe": "tensorwise", "fp8_param": True,
                   "first_last_layers_bf16": True},
    # 1x128 / 128x128 block scales (DeepSeek-V3 style, E4M3 everywhere; H100 and newer).
    "blockwise": {"fp8": "e4m3", "fp8_recipe": "blockwise", "fp8_param": True,
                  "first_last_layers_bf16": True},
    # Microscaling: E8M0 scales per 32 values, E4M3 data. Blackwell (sm_100) only: refused
    # on H100/H200 at start-up.
    "mxfp8": {"fp8": "e4m3", "fp8_recipe": "mxfp8", "fp8_param": True,
              "first_last_layers_bf16": True},
}  # fmt: skip
"""One documented FP8 setting per recipe for the student (``slurm/train_opd_fp8.sbatch``
applies ``FP8_RECIPE``'s); the teacher stays bf16 unless its own ``fp8`` is set."""
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
    """TE FP8 scaling recipe: ``delayed``, ``tensorwise``, ``blockwise`` (H100 and newer)
    or ``mxfp8`` (Blackwell only; refused on Hopper). Only read when ``fp8`` is set."""

    fp8_amax_history_len: int = 1024
    """Amax history length of the ``delayed`` recipe."""

    fp8_param: bool = False
    """Megatron-LM's ``--fp8-param-gather``: the linear layers' parameters themselves are
    FP8 (Transformer Engine), all-gathered in FP8 by Megatron DDP, and re-quantized after
    every step from the distributed optimizer's FP32 master copy, so the student needs
    ``parallel.use_distributed_optimizer`` (also at DP=1). Not for the teacher."""

    first_last_layers_bf16: bool = False
    """Run the first ``num_layers_at_start_in_bf16`` and the last
    ``num_layers_at_end_in_bf16`` transformer layers in bf16 in an FP8 model (not with
    the ``delayed`` recipe, which Transformer Engine cannot switch per layer)."""

    num_layers_at_start_in_bf16: int = 1
    """Leading layers kept in bf16 when ``first_last_layers_bf16``."""

    num_layers_at_end_in_bf16: int = 1
    """Trailing layers kept in bf16 when ``first_last_layers_bf16``."""

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
        if self.fp8 is None and (self.fp8_param or self.first_last_layers_bf16):
            raise ValueError(
                "model.fp8_param and model.first_last_layers_bf16 need model.fp8 (e4m3 or "
                "hybrid); set model.fp8 or turn them off"
            )
        if self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise ValueError(
                "model.first_last_layers_bf16 does not work with model.fp8_recipe=delayed "
                "(Transformer Engine's delayed scaling cannot leave FP8 per layer); use "
                "fp8_recipe=tensorwise or blockwise, or first_last_layers_bf16=false"
            )
        for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"model.{name} must be an integer >= 0, got {value!r}")
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
