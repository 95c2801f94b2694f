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


def _reference_draw(scores, u):
    """Inverse CDF over "16 most likely first (value desc, id asc), then id order", one
    full-row cumsum (an independent, slow reference of sampling.draw)."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    head = order[:, :16]
    is_head = torch.zeros_like(scores, dtype=torch.bool).scatter(1, head, True)
    rest = torch.stack([torch.nonzero(~r)[:, 0] for r in is_head])
    full_order = torch.cat([head, rest], dim=1)
    probs = scores.log_softmax(-1).exp().gather(1, full_order)
    cdf = probs.double().cumsum(-1)
    pick = torch.searchsorted(cdf, u.double(), right=True).clamp(max=scores.shape[1] - 1)
    return full_order.gather(1, pick)[:, 0]


@pytest.mark.parametrize("width", [40, 500, 3000])
def test_sample_step_draws_match_an_independent_inverse_cdf(width):
    """The same uniforms through a plain full-row inverse CDF give the same ids (rows
    longer than the tail block search their tail by blocks: at most a rare boundary
    differs)."""
    from megatron_opd.rollout.sampling import sample_step

    generator = torch.Generator().manual_seed(width)
    scores = torch.randn(400, width, generator=generator) * (0.7 if width < 100 else 2.0)
    ids, lp, _, _ = sample_step(scores, temperature=1.0, top_p=1.0, vocab_size=None, top_k=8,
                                generator=torch.Generator().manual_seed(3))  # fmt: skip
    u = torch.rand(400, 1, generator=torch.Generator().manual_seed(3))
    expected = _reference_draw(scores, u)
    assert (ids != expected).sum() <= (0 if width <= 528 else 1)
    torch.testing.assert_close(lp, scores.log_softmax(-1).gather(1, ids[:, None])[:, 0])
    # Most rows really go past the 16-id head.
    assert (scores.softmax(-1).topk(16).values.sum(-1) < u[:, 0]).float().mean() > 0.2


def test_shifted_exp_is_torch_logsumexp_bit_for_bit():
    from megatron_opd.rollout.sampling import shifted_exp

    generator = torch.Generator().manual_seed(0)
    for width, scale in ((7, 1.0), (600, 4.0), (70_000, 0.3)):
        x = torch.randn(9, width, generator=generator) * scale
        x[1] = float("-inf")  # a row with no mass
        x[2, ::2] = float("-inf")
        got = shifted_exp(x, x.amax(-1, keepdim=True))
        assert torch.equal(got.lse, torch.logsumexp(x, -1, keepdim=True))
        torch.testing.assert_close(got.exp / got.sums, x.softmax(-1), equal_nan=True)


def test_tail_pick_block_search_equals_a_whole_row_scan():
    from megatron_opd.rollout.sampling import TAIL_BLOCK, tail_pick

    generator = torch.Generator().manual_seed(1)
    for width in (5, TAIL_BLOCK, TAIL_BLOCK + 1, 3 * TAIL_BLOCK + 17):
        probs = torch.rand(300, width, generator=generator) ** 4
        probs[:, width // 3 :: 5] = 0.0  # zero-probability ids are never picked
        total = probs.double().sum(-1, keepdim=True)
        rest = (torch.rand(300, 1, generator=generator) * total).float()
        rest[0] = 2 * total[0]  # past the total: the last id with mass
        cdf = probs.cumsum(-1)
        target = torch.minimum(rest, cdf[:, -1:] * (1 - 1e-6))
        expected = torch.searchsorted(cdf, target, right=True)[:, 0]
        picked, got_total = tail_pick(probs, rest)
        assert (picked != expected).sum() <= (0 if width <= TAIL_BLOCK else 1), width
        assert (probs.gather(1, picked[:, None]) > 0).all()
        torch.testing.assert_close(got_total, total.float())
