"""Sampling on the TP ranks' vocabulary shards against single-process references.

Each rank gets its shard of the same logits. References: an independent float64
two-stage inverse CDF with the same uniforms (shard by ``u[:, 0]``, then "16 most likely
first, then id order" within the shard by ``u[:, 1 + r]``) for the draws;
:func:`megatron_opd.rollout.sampling.sample_step` on the whole row for greedy ids, log-probs
and the recorded top-K; the exact softmax for the draw frequencies. TP = 2 and 3 on gloo,
with Megatron's padding columns, a shard holding only padding, ties, greedy decoding and
tail-heavy rows.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.rollout.sampling import sample_step
from megatron_opd.testing.multiprocess import run_distributed

# (name, real vocab, padded vocab, logit scale): tp=3 over padded 48 leaves rank 2 the
# ids 32..47, all padding for vocab 30; 1536 columns search their tail by blocks.
CASES = [("small", 40, 48, 0.8), ("padding_shard", 30, 48, 1.0), ("wide", 1500, 1536, 2.0)]
SETTINGS = [(0.0, 0), (0.0, 5), (1.0, 0), (0.7, 4), (1.0, 20)]
ROWS = 300


def _logits(name, vocab, padded, scale):
    generator = torch.Generator().manual_seed(len(name) * 1000 + vocab)
    x = torch.randn(ROWS, padded, generator=generator) * scale
    x[:, vocab:] = 50.0  # padding garbage, never read
    x[::7] = x[::7].round()  # ties
    return x


def _rank_run(tp: int):
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.distributed import init_distributed
    from megatron_opd.rollout.vocab_parallel_sampling import vocab_parallel_sample_step

    groups = init_distributed(ParallelConfig(tensor_parallel_size=tp))
    rank = groups.tp_rank
    out = {}
    for name, vocab, padded, scale in CASES:
        local = padded // tp
        shard = _logits(name, vocab, padded, scale)[:, rank * local : (rank + 1) * local]
        for temperature, top_k in SETTINGS:
            out[name, temperature, top_k] = vocab_parallel_sample_step(
                shard.clone(), temperature=temperature, vocab_size=vocab,
                generator=torch.Generator().manual_seed(9), tp_group=groups.tp_group,
                top_k=top_k,
            )  # fmt: skip
    # Frequencies: one row repeated, 16 ids in the head and 24 past it.
    base = torch.randn(48, generator=torch.Generator().manual_seed(4)) * 0.7
    row = base[rank * (48 // tp) : (rank + 1) * (48 // tp)]
    ids, _, _, _ = vocab_parallel_sample_step(
        row[None].expand(40_000, -1), temperature=1.0, vocab_size=40,
        generator=torch.Generator().manual_seed(2), tp_group=groups.tp_group,
    )  # fmt: skip
    out["frequencies"] = torch.bincount(ids, minlength=48).float() / ids.numel()
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["tp2", "tp3"])
def ranks(request):
    return run_distributed(_rank_run, request.param, request.param, timeout_s=240)


def test_every_rank_draws_the_same(ranks):
    for result in ranks[1:]:
        for key, values in result.items():
            if key == "frequencies":
                assert torch.equal(values, ranks[0][key])
                continue
            for mine, first in zip(values, ranks[0][key]):
                assert (mine is None and first is None) or torch.equal(mine, first), key


def _two_stage_reference(logits, vocab, tp, temperature, seed):
    """Float64 inverse CDFs with the uniforms vocab_parallel_sample_step draws."""
    rows, padded = logits.shape
    local = padded // tp
    u = torch.rand(rows, 1 + tp, generator=torch.Generator().manual_seed(seed)).double()
    x = logits[:, :vocab].double() / temperature
    probs = x.softmax(-1)
    ids = []
    for i in range(rows):
        shard_mass = torch.stack([probs[i, r * local : (r + 1) * local].sum() for r in range(tp)])
        r = int(torch.searchsorted(shard_mass.cumsum(0), u[i, :1], right=True).clamp(max=tp - 1))
        part = x[i, r * local : min((r + 1) * local, vocab)]
        head = part.sort(descending=True, stable=True).indices[:16]
        rest = torch.tensor([c for c in range(part.numel()) if c not in set(head.tolist())])
        order = torch.cat([head, rest]).long() if rest.numel() else head
        cdf = part.softmax(-1)[order].cumsum(0)
        j = int(torch.searchsorted(cdf, u[i, 1 + r : 2 + r], right=True).clamp(max=len(order) - 1))
        ids.append(r * local + int(order[j]))
    return torch.tensor(ids)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_draws_equal_a_two_stage_inverse_cdf(ranks, case):
    name, vocab, padded, scale = case
    tp = len(ranks)
    logits = _logits(name, vocab, padded, scale)
    for temperature, top_k in SETTINGS:
        got = ranks[0][name, temperature, top_k]
        ids, log_probs, topk_ids, topk_lp = sample_step(
            logits, temperature=temperature, top_p=1.0, vocab_size=vocab, top_k=top_k,
            generator=torch.Generator().manual_seed(9),
        )  # fmt: skip
        if temperature:
            ids = _two_stage_reference(logits, vocab, tp, temperature, seed=9)
            scaled = logits[:, :vocab] / temperature
            log_probs = scaled.log_softmax(-1).gather(1, ids.clamp(max=vocab - 1)[:, None])[:, 0]
        # Sums in another order: a float32 boundary may move by rounding.
        assert (got[0] != ids).sum() <= 1, (name, temperature, top_k)
        assert (got[0] < vocab).all()
        same = got[0] == ids
        torch.testing.assert_close(got[1][same], log_probs[same], atol=2e-5, rtol=0)
        if top_k:
            assert torch.equal(got[2], topk_ids)
            torch.testing.assert_close(got[3], topk_lp, atol=2e-5, rtol=0)
        else:
            assert got[2] is None and got[3] is None


def test_draw_frequencies_follow_the_softmax(ranks):
    base = torch.randn(48, generator=torch.Generator().manual_seed(4)) * 0.7
    expected = base[:40].softmax(-1)
    assert expected.topk(16).values.sum() < 0.7  # the tail path really runs
    freq = ranks[0]["frequencies"]
    assert freq[40:].sum() == 0
    torch.testing.assert_close(freq[:40], expected, atol=0.006, rtol=0)


def test_top_k_of_the_whole_vocabulary_is_refused():
    from megatron_opd.rollout.vocab_parallel_sampling import vocab_parallel_sample_step

    with pytest.raises(ValueError, match="top_k=40 must be below vocab_size=40"):
        vocab_parallel_sample_step(torch.zeros(2, 24), temperature=1.0, generator=None,
                                   vocab_size=40, tp_group=None, top_k=40)  # fmt: skip
