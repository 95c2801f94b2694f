"""The platform layer: device/backend choice, CPU compatibility patches, optional libs.

Run in a subprocess: the CPU patches are process-wide and must not leak into the pytest
process (other tests compute transformers references there).
"""

import json
import subprocess
import sys
import textwrap


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
