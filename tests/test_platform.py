"""The platform layer: device/backend choice, CPU compatibility patches, optional libs.

Run in a subprocess: the CPU patches are process-wide and must not leak into the pytest
process (other tests compute transformers references there).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_platform_and_idempotent_patches():
    result = _run(
        """
        import json, torch
        from megatron_opd import platform
        p = platform.detect_platform()
        platform.apply_cpu_compat()  # second call is a no-op
        from megatron.core import tensor_parallel
        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.add("test-rng", 7)
        a = torch.zeros(2, device="cuda")  # schedules and optimizers hard-code "cuda"
        with tracker.fork("test-rng"):
            forked = torch.rand(3)
        outside = torch.rand(3)
        # megatron-core 0.17+ DDP waits on the current stream before each grad reduction.
        torch.cuda.current_stream().wait_event(None)
        print(json.dumps({
            "backend": p.backend, "device": str(p.device), "is_cuda": p.is_cuda,
            "zeros_device": str(a.device), "type": torch.zeros(1).type(),
            "te": platform.has_transformer_engine(), "apex": platform.has_nvidia_apex(),
            "forked_differs": not torch.equal(forked, outside),
        }))
        """
    )
    assert result == {
        "backend": "gloo", "device": "cpu", "is_cuda": False, "zeros_device": "cpu",
        "type": "torch.cuda.FloatTensor", "te": False, "apex": False, "forked_differs": True,
    }  # fmt: skip


def test_cli_help_and_unknown_command():
    help_run = subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "--help"], capture_output=True, text=True
    )
    assert help_run.returncode == 0 and "megatron-opd train" in help_run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "fly"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    convert = subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "convert", "verify", "--help"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert convert.returncode == 0 and "--" in convert.stdout


def test_patches_keep_device_contexts_and_transformers_loading_intact(tmp_path):
    """``with torch.device("meta")`` still applies after the patches, so a transformers model
    loaded after them (meta init, then materialised) equals one loaded in a clean process."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=64)  # fmt: skip
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    ids = [[5, 9, 3, 17, 2, 40, 11]]
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits[0, -1, :5].tolist()
    result = _run(
        f"""
        import json, torch
        from megatron_opd import platform
        platform.apply_cpu_compat()
        with torch.device("meta"):
            inside = [torch.empty(2).device.type, torch.arange(3).device.type]
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.float32)
        with torch.no_grad():
            logits = model.eval()(torch.tensor({ids})).logits[0, -1, :5].tolist()
        print(json.dumps({{"inside": inside, "logits": logits}}))
        """
    )
    assert result["inside"] == ["meta", "meta"]
    assert result["logits"] == [pytest.approx(v, abs=1e-5) for v in expected]


def test_attention_variables_the_user_exports_survive_model_builds(tmp_path):
    """slurm/env.sh (or the user) chooses Transformer Engine's attention kernels with
    NVTE_*_ATTN; building the student and the teacher must leave those values in place
    (GPTModel rewrites them from its attention_backend and asserts on disagreement)."""
    from megatron_opd.models.tiny import make_tiny_hf_model

    model_dir = make_tiny_hf_model(tmp_path / "qwen3", "qwen3", seed=1)
    code = f"""
        import json, os
        from megatron_opd.config.model import ModelConfig
        from megatron_opd.config.parallel import ParallelConfig
        from megatron_opd.distributed import destroy_distributed, init_distributed
        from megatron_opd.models import build_model
        groups = init_distributed(ParallelConfig())
        model = ModelConfig(path={str(model_dir)!r}, transformer_impl="local")
        build_model(model, groups, role="student")
        build_model(model, groups, role="teacher")
        destroy_distributed()
        print(json.dumps({{k: os.environ.get(k) for k in
                          ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")}}))
        """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(NVTE_FLASH_ATTN="1", NVTE_FUSED_ATTN="0")  # as slurm/env.sh lets a user do
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    values = json.loads(out.stdout.strip().splitlines()[-1])
    assert values["NVTE_FLASH_ATTN"] == "1" and values["NVTE_FUSED_ATTN"] == "0"
