"""Where the code runs: CUDA with NCCL, or CPU with gloo.

This is the only module that branches on the device. Everything else asks it for
``Platform.device`` / ``Platform.backend`` and never looks at ``torch.cuda`` itself.

On a CPU-only torch build (or a CUDA build on a machine without a GPU), Megatron-Core
0.16-0.19 runs correctly on gloo once a handful of CUDA calls are routed to their CPU
equivalents. :func:`apply_cpu_compat` installs exactly
those patches, each documented with the Megatron call it serves. They are idempotent and
are never applied when CUDA is available, so a GPU run sees an untouched torch.

Optional GPU libraries are detected here too: Transformer Engine (raises RuntimeError,
not ImportError, when its CUDA libraries are missing), NVIDIA apex (the PyPI package named
``apex`` is an unrelated web toolkit, so we check for apex's CUDA extension modules) and
vLLM.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.utils._device

_CPU_COMPAT_APPLIED = False


@dataclass(frozen=True, kw_only=True)
class Platform:
    """The device and collective backend of this process."""

    device: torch.device
    """``cuda:<local_rank>`` or ``cpu``."""

    backend: str
    """``nccl`` on CUDA, ``gloo`` on CPU."""

    @property
    def is_cuda(self) -> bool:
        """True when running on a GPU."""
        return self.device.type == "cuda"


def detect_platform(local_rank: int = 0, force_cpu: bool = False) -> Platform:
    """Pick cuda+nccl when a GPU is visible (and not ``force_cpu``), else cpu+gloo.

    On CPU the Megatron compatibility layer is applied before returning.
    """
    if torch.cuda.is_available() and not force_cpu and not _CPU_COMPAT_APPLIED:
        torch.cuda.set_device(local_rank)
        return Platform(device=torch.device("cuda", local_rank), backend="nccl")
    apply_cpu_compat()
    return Platform(device=torch.device("cpu"), backend="gloo")


def cuda_available() -> bool:
    """True when real CUDA is usable (the CPU compatibility layer is not active)."""
    return torch.cuda.is_available() and not _CPU_COMPAT_APPLIED


def apply_cpu_compat() -> None:
    """Install the minimal patches Megatron-Core 0.16-0.19 needs on a CPU torch build.

    Idempotent. Call before seeding Megatron's RNG tracker or building a model.
    """
    global _CPU_COMPAT_APPLIED
    if _CPU_COMPAT_APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "apply_cpu_compat() was called on a machine with CUDA; it would break real CUDA "
            "calls. Run with platform force_cpu only on CPU-only torch builds."
        )
    _CPU_COMPAT_APPLIED = True
    _route_cuda_rng_to_cpu()
    _route_cuda_device_to_cpu()
    _report_cpu_tensors_as_cuda_types()
    _route_cuda_streams_to_noops()
    _define_missing_te_symbols()


def _route_cuda_rng_to_cpu() -> None:
    # tensor_parallel.model_parallel_cuda_manual_seed() and the CudaRNGStatesTracker fork
    # the "CUDA" generator for dropout inside TP regions; on CPU the CPU generator plays it.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed() calls torch.cuda.manual_seed_all: seed the CPU generator directly
    # here, never through torch.manual_seed, or the two would recurse.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.synchronize = lambda device=None: None
    import megatron.core.tensor_parallel.random as megatron_random

    # The tracker reads/writes through these private helpers; unpatched, the setter is a
    # silent no-op on CPU and the forked dropout states would never be restored.
    megatron_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    # The "CUDA" generator *is* the CPU one here, so every fork would warn; silence that.
    logging.getLogger(megatron_random.__name__).setLevel(logging.ERROR)


def _fix_device(device):
    if isinstance(device, bool):
        return device
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _route_cuda_device_to_cpu() -> None:
    # ~175 Megatron call sites allocate with device=torch.cuda.current_device() (attention's
    # GlobalMemoryBuffer first); the pipeline schedules (torch.zeros(..., device="cuda")),
    # the optimizers, grad clipping and dist_checkpointing's exchange hard-code "cuda" or
    # call .cuda(). Route every such device to the CPU.
    torch.cuda.current_device = lambda: "cpu"

    def with_cpu_device(factory):
        @functools.wraps(factory)
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _fix_device(kwargs["device"])
            return factory(*args, **kwargs)

        return wrapped

    # ``with torch.device("meta"):`` (transformers builds every model under it) injects the
    # device only for functions in a set that torch builds, and caches, on first use from
    # the torch.* attributes of that moment. Built after the wrappers below, it would hold
    # the wrappers while the mode sees the original functions they call, so the context
    # would silently stop working: transformers then materialised its non-persistent
    # buffers (RoPE inv_freq) from torch.empty_like, i.e. garbage. Build it first.
    device_constructors = getattr(torch.utils._device, "_device_constructors", None)
    if device_constructors is not None:
        device_constructors()
    for name in (
        "zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like",
        "empty_like", "full_like", "randn", "rand", "randint", "as_tensor", "linspace",
    ):  # fmt: skip
        setattr(torch, name, with_cpu_device(getattr(torch, name)))

    tensor_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device, int)):
            args = (_fix_device(args[0]), *args[1:])
        if "device" in kwargs:
            kwargs["device"] = _fix_device(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self


def _report_cpu_tensors_as_cuda_types() -> None:
    # megatron.core.optimizer (clip_grads, DistributedOptimizer, Float16Optimizer) asserts
    # ``param.type() == 'torch.cuda.FloatTensor'``; only the no-argument form is changed.
    tensor_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = tensor_type(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch.") :]
            return name
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


class _HostStream:
    """The CPU's only "stream": work is synchronous, so every wait and record is a no-op."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass


def _route_cuda_streams_to_noops() -> None:
    # megatron-core 0.17+ DDP (param_and_grad_buffer.start_grad_sync) takes
    # torch.cuda.current_stream() to wait for CUDA-graph gradient events before every
    # gradient reduction; on CPU there is one synchronous stream.
    stream = _HostStream()
    torch.cuda.current_stream = lambda device=None: stream


def _define_missing_te_symbols() -> None:
    # megatron-core 0.16.1 references te_general_gemm in moe_utils even when the TE import
    # failed (NameError in the router); None selects its torch.mm fallback.
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


_ATTENTION_ENV_KEYS = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
# What the user exported (slurm/env.sh, the shell) before Megatron wrote anything: read at
# import, which precedes every model build.
_USER_ATTENTION_ENV = {key: os.environ[key] for key in _ATTENTION_ENV_KEYS if key in os.environ}


def reset_attention_backend_env() -> None:
    """Before a GPTModel build: clear the NVTE_*_ATTN variables. GPTModel writes them
    from its ``attention_backend`` and asserts that any value already there agrees, so a
    user's ``NVTE_FUSED_ATTN=0`` or a previous model's values would fail the build."""
    for key in _ATTENTION_ENV_KEYS:
        os.environ.pop(key, None)


def restore_user_attention_env() -> None:
    """After a GPTModel build: put back the NVTE_*_ATTN values the user exported.
    Transformer Engine reads them when it first picks an attention kernel (at the first
    forward), so the user's choice, e.g. ``NVTE_FUSED_ATTN=0``, holds."""
    os.environ.update(_USER_ATTENTION_ENV)


@functools.cache
def has_transformer_engine() -> bool:
    """True when Transformer Engine imports (it raises RuntimeError without CUDA libs)."""
    if not cuda_available():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - TE raises RuntimeError/OSError when cuDNN is absent
        return False
    return True


@functools.cache
def has_nvidia_apex() -> bool:
    """True when NVIDIA apex's CUDA extensions are importable (not the PyPI ``apex``)."""
    for module in ("fused_layer_norm_cuda", "amp_C"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001
            return False
    return True


@functools.cache
def has_module(name: str) -> bool:
    """True when ``name`` imports (used for vllm)."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001
        return False
    return True
