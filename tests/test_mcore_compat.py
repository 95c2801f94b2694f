"""The Megatron-Core version differences (megatron_opd/mcore_compat.py) on the installed version.

The logits reference is the plain (no KV cache) forward of the same tiny model; the
checkpoint-layout cases are directories laid out as each version writes them.
"""

from __future__ import annotations

import pytest
import torch
from test_rollout_models import build_tiny_gpt

from megatron_opd import mcore_compat
from megatron_opd.testing.multiprocess import run_distributed


def _prefill_logits():
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.distributed import init_distributed

    groups = init_distributed(ParallelConfig())
    model = build_tiny_gpt(groups, seed=3).eval()
    tokens = torch.tensor([[5, 17, 33, 2, 9], [101, 3, 64, 8, 1]])
    positions = torch.arange(5)[None].expand(2, -1)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)[None, None]
    with torch.no_grad():
        plain = model(tokens, positions, causal)
        outside = model(
            tokens, positions, causal, inference_context=StaticInferenceContext(2, 8),
            runtime_gather_output=True,
        )  # fmt: skip
    with torch.no_grad(), mcore_compat.inference_mode():
        defaults = StaticInferenceContext(2, 8)
        last_only = model(
            tokens, positions, causal, inference_context=defaults, runtime_gather_output=True
        )
        context = StaticInferenceContext(2, 8)
        mcore_compat.materialize_all_logits(context)
        every = model(
            tokens, positions, causal, inference_context=context, runtime_gather_output=True
        )
    return plain, outside, last_only, every


def test_materialize_all_logits_returns_every_position():
    ((plain, outside, last_only, every),) = run_distributed(_prefill_logits, 1, timeout_s=120)
    assert last_only.shape[1] == 1  # the context's default: the last position only
    # Outside inference_mode, 0.18+ returns every position; up to 0.17 eval mode suffices.
    expected_outside = 5 if mcore_compat.megatron_core_version() >= (0, 18) else 1
    assert outside.shape[1] == expected_outside
    assert every.shape == plain.shape == (2, 5, plain.shape[-1])
    torch.testing.assert_close(every, plain, atol=1e-5, rtol=1e-5)


def test_materialize_all_logits_sets_the_field_each_version_reads():
    class Config:  # 0.17+: InferenceConfig on the context
        materialize_only_last_token_logits = True

    class NewContext:
        config = Config()

    class OldContext:  # 0.16: the flag is the context's own attribute
        materialize_only_last_token_logits = True

    new, old = NewContext(), OldContext()
    mcore_compat.materialize_all_logits(new)
    mcore_compat.materialize_all_logits(old)
    assert new.config.materialize_only_last_token_logits is False
    assert old.materialize_only_last_token_logits is False


def test_checkpoint_layout_and_refusal_on_older_versions(tmp_path, monkeypatch):
    legacy, embedded = tmp_path / "legacy", tmp_path / "embedded"
    legacy.mkdir()
    embedded.mkdir()
    (legacy / "common.pt").write_bytes(b"")
    (embedded / "__0_0.distcp").write_bytes(b"")
    assert mcore_compat.checkpoint_layout(legacy) == "common.pt"
    assert mcore_compat.checkpoint_layout(embedded) == "embedded"

    monkeypatch.setattr(mcore_compat, "megatron_core_version", lambda: (0, 16))
    mcore_compat.check_checkpoint_readable(legacy)
    with pytest.raises(ValueError, match="megatron-core >= 0.19"):
        mcore_compat.check_checkpoint_readable(embedded)
    monkeypatch.setattr(mcore_compat, "megatron_core_version", lambda: (0, 19))
    mcore_compat.check_checkpoint_readable(legacy)
    mcore_compat.check_checkpoint_readable(embedded)


def test_installed_version_is_supported():
    assert (0, 16) <= mcore_compat.megatron_core_version() < (0, 20)
