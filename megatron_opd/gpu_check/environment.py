"""Step ``environment``: what this machine is, and which optional GPU libraries work."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = ("torch", "megatron-core", "transformers", "numpy", "safetensors", "math-verify")
OPTIONAL = {
    "transformer_engine": "Transformer Engine (TE layer spec, FP8)",
    "vllm": "vLLM (rollout.engine=vllm)",
    "apex": "NVIDIA apex (fused kernels)",
}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report() -> dict:
    """Versions, the GPU, and a ``skips`` map: optional library -> why it is unusable."""
    import torch

    from megatron_opd.platform import has_module, has_nvidia_apex, has_transformer_engine

    cuda = torch.cuda.is_available()
    report = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda_available": cuda,
        "torch_cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = {
            "name": props.name,
            "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    usable = {
        "transformer_engine": has_transformer_engine(),
        "vllm": cuda and has_module("vllm"),
        "apex": has_nvidia_apex(),
    }
    report["optional"] = usable
    report["skips"] = {
        name: f"{OPTIONAL[name]}: not importable here" for name, ok in usable.items() if not ok
    }
    return report
