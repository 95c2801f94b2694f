"""The frozen teacher: no gradients, eval mode, and its weights parked on CPU between uses.

On a GPU the teacher's weights can be moved to (pinned) host memory while the student
trains and brought back before scoring; on CPU both moves are no-ops.
"""

from __future__ import annotations

import torch


def freeze(model_chunks: list[torch.nn.Module]) -> None:
    """Put every chunk in eval mode and stop gradients to its parameters."""
    for chunk in model_chunks:
        chunk.eval()
        for param in chunk.parameters():
            param.requires_grad_(False)


def offload_to_cpu(model_chunks: list[torch.nn.Module]) -> None:
    """Move parameters and buffers to pinned host memory (no-op when they are on CPU)."""
    for chunk in model_chunks:
        for tensor in _tensors(chunk):
            if tensor.device.type == "cpu":
                continue
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
            host.copy_(tensor.data, non_blocking=True)
            tensor.data = host
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def onload(model_chunks: list[torch.nn.Module], device: torch.device) -> None:
    """Move parameters and buffers back to ``device`` (no-op on CPU)."""
    if device.type == "cpu":
        return
    for chunk in model_chunks:
        for tensor in _tensors(chunk):
            if tensor.device != device:
                tensor.data = tensor.data.to(device, non_blocking=True)
    torch.cuda.synchronize()


def _tensors(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()
