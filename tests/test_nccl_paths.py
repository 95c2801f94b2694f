"""GPU-cluster bugs whose logic runs on CPU: NCCL receive buffers and teacher residency.

1. NCCL moves CUDA tensors only: every tensor a rank receives (``dist.recv`` /
   ``dist.broadcast`` as a non-source) must live on the process's device. The transport
   is replaced by a recorder and the platform's device by ``meta`` (a device other than
   the CPU), so a buffer allocated on the CPU is caught here as it would fail under NCCL.
2. With ``rollout.chunk_size > 0`` and ``teacher.offload_teacher``, the chunk listener runs
   the teacher during the rollout: it must be onloaded before the rollout, not only before
   the scoring phase. The offload functions are replaced by recorders (on CPU they are
   no-ops) and the listener records the teacher's residency at every call.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_opd.platform import Platform
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_run import make_tiny_run

DEVICE = torch.device("meta")


def _groups(pp_rank: int):
    return SimpleNamespace(
        platform=Platform(device=DEVICE, backend="nccl"),
        pp_size=2, pp_rank=pp_rank, pp_global_ranks=[0, 1], pp_group="pp",
        tp_size=1, tp_rank=0, tp_group="tp", rank=pp_rank,
    )  # fmt: skip


class _Transport:
    """Stands in for torch.distributed: hands out metadata, records receive buffers."""

    def __init__(self, metadata):
        self.metadata = list(metadata)
        self.received = []

    def recv_object_list(self, box, src, group):
        box[0] = self.metadata.pop(0) if self.metadata else None

    def broadcast_object_list(self, box, src, group):
        if box[0] is None:  # a receiving rank; the source keeps its own list
            box[0] = self.metadata.pop(0)

    def recv(self, tensor, src, group):
        self.received.append(tensor)

    def broadcast(self, tensor, src, group):
        self.received.append(tensor)


def test_export_receives_later_stages_into_device_buffers(monkeypatch):
    from megatron_opd.conversion import export

    transport = _Transport([("model.norm.weight", (8,), torch.bfloat16)])
    monkeypatch.setattr(export, "dist", transport)
    monkeypatch.setattr(export, "_hf_tensors_of_stage", lambda *a, **k: iter(()))
    sunk = []
    export._stream_to_rank0([], None, _groups(0), None, lambda n, t: sunk.append((n, t)))
    assert [t.device for t in transport.received] == [DEVICE]
    assert [(n, tuple(t.shape), t.dtype) for n, t in sunk] == [
        ("model.norm.weight", (8,), torch.bfloat16)
    ]


def test_weight_broadcast_receives_into_device_buffers(monkeypatch):
    from megatron_opd.conversion import export

    stage0 = [("model.embed_tokens.weight", (10, 4), torch.bfloat16)]
    transport = _Transport([stage0])
    monkeypatch.setattr(export, "dist", transport)
    monkeypatch.setattr(export, "stage_hf_metadata", lambda *a, **k: [])
    monkeypatch.setattr(export, "_hf_tensors_of_stage", lambda *a, **k: iter(()))
    got = list(export.broadcast_hf_weights([], None, _groups(1)))
    assert [(n, tuple(t.shape), t.device) for n, t in got] == [
        ("model.embed_tokens.weight", (10, 4), DEVICE)
    ]
    assert all(t.device == DEVICE for t in transport.received)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("offload_run"))


def _chunked_steps_with_offload(overrides):
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig
    from megatron_opd.distributed import init_distributed
    from megatron_opd.models import teacher as teacher_module
    from megatron_opd.rollout.chunk_scorer import ChunkScorer
    from megatron_opd.training import setup
    from megatron_opd.training.trainer import Trainer

    resident = {"teacher": True}
    calls = []
    teacher_module.onload = lambda chunks, device: resident.update(teacher=True)
    teacher_module.offload_to_cpu = lambda chunks: resident.update(teacher=False)
    setup.teacher_offload_applies = lambda config, groups: config.teacher.offload_teacher
    original_start = ChunkScorer.start

    def start(self, prompts):
        calls.append(resident["teacher"])
        return original_start(self, prompts)

    ChunkScorer.start = start
    config = build_config(OPDConfig, merge_overrides({}, overrides))
    groups = init_distributed(config.parallel, seed=config.training.seed)
    trainer = Trainer(config, groups, setup.build_components(config, groups))
    for _ in range(3):
        trainer.train_step()
    return calls


def test_offloaded_teacher_is_on_the_device_for_chunked_rollouts(tiny_run):
    overrides = [
        *tiny_run,
        "rollout.chunk_size=4",
        "teacher.offload_teacher=true",
        "training.num_steps=3",
        "logging.log_dir=null",
        "logging.progress_bar=false",
    ]
    (calls,) = run_distributed(_chunked_steps_with_offload, 1, overrides, timeout_s=240)
    assert len(calls) >= 3  # one rollout per step, each scored chunk by chunk
    assert all(calls), calls  # the teacher was resident at every chunked rollout
