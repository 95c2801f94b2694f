"""The Megatron-Core version differences this project meets, handled in one place.

Supported: megatron-core 0.16.1 to 0.19.x (0.16 is the last release for Python 3.11;
0.17 and later need Python 3.12, which is what current GPU clusters install). Every
call whose spelling changed between those releases goes through a function here, so
no other module tests a version. The differences:

1. Inference contexts (0.17): ``BaseInferenceContext`` took the flag
   ``materialize_only_last_token_logits`` as an attribute of the context up to 0.16; from
   0.17 it lives on ``context.config`` (an ``InferenceConfig``), and ``GPTModel.forward``
   reads only ``context.config.materialize_only_last_token_logits``. Setting the old
   attribute on 0.17+ is silently ignored: the forward then returns the last position
   only (``[b, 1, V]``), which broke the chunked teacher scoring of the online stop.
   :func:`materialize_all_logits` sets whichever field the installed version reads.
   In 0.18 a second change joined it: ``GPTModel.forward`` treats a forward with an
   inference context as inference (last-token logits, inference-only kernels) only
   while the process-wide ``megatron.core.inference.utils.InferenceMode`` flag is set;
   up to 0.17 it checked ``not self.training``. Without the flag, 0.18+ returns every
   position whatever the context says: correct values, but a prefill then materialises
   ``[b, p, V]`` logits instead of ``[b, 1, V]``. :func:`inference_mode` sets the flag
   around such a forward (a no-op before 0.18).
2. Checkpoint layout (0.19): ``dist_checkpointing`` with the ``torch_dist`` backend wrote
   the common (non-sharded) state to a separate ``common.pt`` up to 0.18; 0.19 stores it
   as a ``common_state`` object inside the torch_dist files and still reads a
   ``common.pt`` when one exists. So a checkpoint written by 0.16-0.18 loads in 0.19,
   but one written by 0.19 cannot be loaded by 0.16-0.18 (they look for ``common.pt``).
   :func:`checkpoint_layout` names the layout of a checkpoint directory so a resume with
   an older Megatron-Core can refuse with a clear message instead of a deep traceback.
3. FP8 inference padding: ``megatron.core.fp8_utils.prepare_model_for_fp8_inference``
   (TE linear layers pad the sequence dimension to the FP8 GEMM alignment, 16 tokens,
   32 for MXFP8) exists in 0.16-0.19 under the same name; :func:`prepare_fp8_inference`
   is the one caller so a future move is a one-line change.

Anything else the project uses (GPTModel, TransformerConfig, ProcessGroupCollection,
the DDP/optimizer configs, StaticInferenceContext, forward_backward_func) has the same
signature in 0.16.1 and 0.19.2; the test suite runs under both (README, "Installing").
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

COMMON_STATE_FILE = "common.pt"
"""The separate common-state file of torch_dist checkpoints written by 0.16-0.18."""


@functools.cache
def megatron_core_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed megatron-core."""
    from importlib.metadata import version

    parts = version("megatron-core").split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def materialize_all_logits(context) -> None:
    """Make ``GPTModel.forward`` with ``context`` return logits for every input position
    (``[b, s, V]``), not only the last one (the default of ``StaticInferenceContext``)."""
    config = getattr(context, "config", None)
    if config is not None and hasattr(config, "materialize_only_last_token_logits"):
        config.materialize_only_last_token_logits = False  # 0.17+
    else:
        context.materialize_only_last_token_logits = False  # 0.16


@contextlib.contextmanager
def inference_mode():
    """Within the block, forwards with an inference context are inference forwards for
    Megatron-Core 0.18+ (``InferenceMode``); nothing to do before 0.18."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:  # 0.16 and 0.17 decide from ``model.training``
        yield
        return
    was_active = InferenceMode.is_active()
    InferenceMode.set_active()
    try:
        yield
    finally:
        if not was_active:
            InferenceMode.unset_active()


def checkpoint_layout(checkpoint_dir: str | Path) -> str:
    """``"common.pt"`` (written by 0.16-0.18) or ``"embedded"`` (0.19: the common state
    lives inside the torch_dist files) for a ``dist_checkpointing`` directory."""
    return "common.pt" if (Path(checkpoint_dir) / COMMON_STATE_FILE).is_file() else "embedded"


def check_checkpoint_readable(checkpoint_dir: str | Path) -> None:
    """ValueError when the installed Megatron-Core cannot read ``checkpoint_dir``: a
    0.19 checkpoint (common state embedded) under 0.16-0.18."""
    if checkpoint_layout(checkpoint_dir) == "embedded" and megatron_core_version() < (0, 19):
        major, minor = megatron_core_version()
        raise ValueError(
            f"checkpoint {checkpoint_dir} was written by megatron-core >= 0.19 (no "
            f"{COMMON_STATE_FILE}; the common state is inside the torch_dist files), which "
            f"megatron-core {major}.{minor} cannot read; load it with megatron-core 0.19 "
            "(Python 3.12), or export it to HF there (megatron-opd convert megatron-to-hf) "
            "and convert that back with this version"
        )


def prepare_fp8_inference(model):
    """Wrap ``model``'s Transformer Engine linear layers so FP8 GEMMs see token counts
    padded to the FP8 alignment (decode steps feed one token per row; scoring feeds
    rollouts of any length). In place; returns ``model``."""
    from megatron.core.fp8_utils import prepare_model_for_fp8_inference

    return prepare_model_for_fp8_inference(model)
