"""Sampling helpers and RolloutConfig checks (single process, no Megatron; the vLLM
engine's own tests are in test_vllm_engine.py)."""

import math

import pytest
import torch

from megatron_opd.config.rollout import RolloutConfig, rollout_seed
from megatron_opd.rollout.sampling import mask_vocab_padding, sample_next_tokens, top_p_filter


def _logits(probs):
    return torch.tensor([[math.log(p) for p in probs]])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = _logits([0.15, 0.5, 0.05, 0.3])  # order by probability: 1, 3, 0, 2
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(0.5) == [1]  # 0.5 alone reaches 0.5
    assert kept(0.51) == [1, 3]
    assert kept(0.8) == [1, 3]
    assert kept(0.81) == [0, 1, 3]
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]  # the most likely id always survives


def test_sampling_frequencies_follow_the_renormalised_nucleus():
    logits = _logits([0.15, 0.5, 0.05, 0.3]).expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    ids = sample_next_tokens(logits, temperature=1.0, top_p=0.8, generator=generator)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.015, rtol=0)
    # Temperature 2 flattens: p ~ sqrt(p) renormalised.
    ids = sample_next_tokens(logits, temperature=2.0, top_p=1.0, generator=generator)
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    expected = torch.tensor([0.15, 0.5, 0.05, 0.3]).sqrt()
    torch.testing.assert_close(freq, expected / expected.sum(), atol=0.015, rtol=0)


def test_greedy_and_vocab_padding():
    logits = torch.tensor([[0.0, 3.0, 1.0, 9.0], [2.0, 0.0, 1.0, 9.0]])
    masked = mask_vocab_padding(logits, 3)  # id 3 is Megatron padding
    assert sample_next_tokens(masked, temperature=0.0, top_p=1.0, generator=None).tolist() == [
        1,
        0,
    ]
    generator = torch.Generator().manual_seed(1)
    ids = sample_next_tokens(masked.expand(2, 4), temperature=1.0, top_p=1.0, generator=generator)
    assert (ids < 3).all()


def test_rollout_config_errors_name_the_field():
    for kwargs, field in (
        ({"temperature": -1.0}, "rollout.temperature"),
        ({"top_p": 0.0}, "rollout.top_p"),
        ({"top_p": 1.5}, "rollout.top_p"),
        ({"n_samples_per_prompt": 0}, "rollout.n_samples_per_prompt"),
        ({"max_new_tokens": 0}, "rollout.max_new_tokens"),
        ({"chunk_size": -1}, "rollout.chunk_size"),
        ({"generation_batch_size": -2}, "rollout.generation_batch_size"),
        ({"engine": "sglang"}, "rollout.engine"),
    ):
        with pytest.raises(ValueError, match=field):
            RolloutConfig(**kwargs)
    assert RolloutConfig(temperature=0.0).greedy


def test_rollout_seed_differs_across_steps_and_data_parallel_ranks():
    config = RolloutConfig()
    seeds = {rollout_seed(config, step=s, dp_rank=r) for s in range(50) for r in range(8)}
    assert len(seeds) == 400


def test_draw_follows_softmax_through_head_and_tail():
    """The head-first inverse-CDF draw against the exact softmax: 40 ids (so 24 lie past
    the 16-id head) with ~45 % of the mass in that tail, and padding columns at -inf."""
    from megatron_opd.rollout.sampling import HEAD, sample_step

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=generator) * 0.7
    logits = torch.cat([base, torch.full((8,), float("-inf"))])[None].expand(40000, 48)
    expected = base.softmax(-1)
    assert expected.topk(HEAD).values.sum() < 0.7  # the tail path really runs
    ids = sample_next_tokens(logits, temperature=1.0, top_p=1.0, generator=generator)
    freq = torch.bincount(ids, minlength=48).float() / ids.numel()
    assert freq[40:].sum() == 0
    torch.testing.assert_close(freq[:40], expected, atol=0.006, rtol=0)
    # sample_step draws the same ids from the same generator state, whatever top-K it
    # records (the head is always the 16 most likely).
    rows = torch.randn(64, 48, generator=generator) * 2
    rows[:, 40:] = float("-inf")
    reference = sample_next_tokens(rows, temperature=1.3, top_p=1.0,
                                   generator=torch.Generator().manual_seed(5))  # fmt: skip
    for k in (0, 4, 16, 32, 40):
        ids, lp, _, _ = sample_step(rows, temperature=1.3, top_p=1.0, vocab_size=40, top_k=k,
                                    generator=torch.Generator().manual_seed(5))  # fmt: skip
        assert ids.tolist() == reference.tolist(), k
        expected_lp = (rows[:, :40] / 1.3).log_softmax(-1).gather(1, ids[:, None])[:, 0]
        torch.testing.assert_close(lp, expected_lp)


def test_draw_never_picks_a_zero_probability_id_at_the_edges():
    from megatron_opd.rollout.sampling import draw

    # All the mass on one id of the head, or on one id of the tail: u near 1 cannot spill
    # onto a 0-probability id.
    for hot in (3, 30):
        scores = torch.full((5000, 40), float("-inf"))
        scores[:, hot] = 0.0
        assert (draw(scores, torch.Generator().manual_seed(1)) == hot).all()
