"""KV-cached rollouts vs recomputing the whole prefix per token, side by side (CPU, TP=1).

    python bench/rollout_bench.py [--batch 16 --prompt 32 --new 128 --hidden 64 --vocab 512]

Both paths run the same tiny GPTModel (local spec, fp32, one thread) on the same left-padded
batch with greedy decoding, so their tokens must agree; the script checks that and prints
the two wall times and their ratio (best of ``--repeats``).

Per-step vocabulary work beside it: every decode step the engine samples from ``[B, V]``
logits and, when the trainer asks (one update per step), records the student's top-K ids
and log-probs (:func:`~megatron_opd.rollout.sampling.sample_step`). Its floor is the local
torch passes that cannot be avoided: one ``torch.topk`` and one ``torch.logsumexp`` over
the rank's vocabulary (a sampler must also draw; shown as a second floor with
``torch.multinomial``). Timed on the bench's ``V`` and at ``--floor-vocab`` (151,936, Qwen)
with ``--floor-k`` (16), median of many calls, one thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _recompute_greedy(model, prompts, num_new, groups):
    """Baseline: every step runs the full left-padded sequence without a cache."""
    from megatron_opd.scoring import forward_through_stages

    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    seq = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        seq[i, width - len(p) :] = torch.tensor(p)
    pad = width - lengths
    out = []
    with torch.no_grad():
        for _ in range(num_new):
            s = seq.shape[1]
            cols = torch.arange(s)
            valid = cols[None] >= pad[:, None]
            mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None] | ~valid[:, None, None]
            pos = (cols[None] - pad[:, None]).clamp(min=0)
            logits = forward_through_stages(
                model, seq, pos, mask, groups, runtime_gather_output=True
            )
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return torch.stack(out, 1)


def _run(args):
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.config.rollout import RolloutConfig
    from megatron_opd.distributed import init_distributed
    from megatron_opd.rollout.megatron_engine import MegatronRolloutEngine

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    import test_rollout_models as tiny

    tiny.PADDED_VOCAB = args.vocab
    groups = init_distributed(ParallelConfig())
    model = tiny.build_tiny_gpt(
        groups, seed=1, hidden=args.hidden, position="rope", max_seq=args.prompt + args.new
    )
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(1, args.vocab, (args.prompt,), generator=generator).tolist()
        for _ in range(args.batch)
    ]
    engine = MegatronRolloutEngine(
        model, groups, RolloutConfig(temperature=0.0, n_samples_per_prompt=1), eos_token_ids=[]
    )
    times = {"kv_cache": [], "recompute": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        batch = engine.generate(prompts, max_new_tokens=args.new, seed=0)
        times["kv_cache"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference = _recompute_greedy(model, prompts, args.new, groups)
        times["recompute"].append(time.perf_counter() - start)
    cached = batch.tokens[:, args.prompt :]
    agree = float((cached == reference).float().mean())
    best = {k: min(v) for k, v in times.items()}
    return best, agree


def _step_logits(rows: int, vocab: int, shape: str) -> torch.Tensor:
    """``[rows, padded vocab]`` logits. ``flat``: N(0, 9) iid, the 16 most likely ids hold
    ~22 % of the mass (the sampler's worst case: most draws go past its 16-id head);
    ``zipf``: log-probabilities falling as -1.2 log(rank) plus N(0, 4) noise, ids
    shuffled, ~58 % in the top 16 (a trained LM is usually more peaked still)."""
    generator = torch.Generator().manual_seed(0)
    padded = -(-vocab // 128) * 128
    noise = torch.randn(rows, padded, generator=generator)
    if shape == "flat":
        return noise * 3
    ranks = torch.arange(1, padded + 1, dtype=torch.float32)
    return (noise * 2 - 1.2 * ranks.log())[:, torch.randperm(padded, generator=generator)]


def _vocab_step_floor(rows: int, vocab: int, k: int, calls: int, shape: str) -> dict[str, float]:
    """Median seconds of our per-step vocabulary work and of its floors on [rows, vocab]."""
    import statistics

    from megatron_opd.rollout.sampling import sample_step

    torch.set_num_threads(1)
    logits = _step_logits(rows, vocab, shape)
    generator = torch.Generator().manual_seed(1)

    def ours():
        sample_step(logits, temperature=1.0, top_p=1.0, generator=generator, vocab_size=vocab,
                    top_k=k)  # fmt: skip

    real = logits[:, :vocab]

    def floor():
        torch.topk(real, k, dim=-1)
        torch.logsumexp(real, dim=-1)

    def floor_and_draw():
        floor()
        torch.multinomial(real.softmax(dim=-1), 1, generator=generator)

    out = {}
    for name, fn in (("ours", ours), ("floor", floor), ("floor+draw", floor_and_draw)):
        fn()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("batch", 16), ("prompt", 32), ("new", 128), ("hidden", 64),
                          ("vocab", 512), ("repeats", 2), ("floor-vocab", 151_936),
                          ("floor-k", 16), ("floor-calls", 50)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    from megatron_opd.testing.multiprocess import close_all_pools, run_distributed

    try:
        ((best, agree),) = run_distributed(_run, 1, args, timeout_s=1200)
    finally:
        close_all_pools()
    steps = args.new
    print(
        f"B={args.batch} P={args.prompt} N={args.new} hidden={args.hidden} "
        f"V={args.vocab} (TP=1, CPU)\n"
        f"  KV cache : {best['kv_cache']:.2f} s ({best['kv_cache'] / steps * 1e3:.1f} ms/step)\n"
        f"  recompute: {best['recompute']:.2f} s ({best['recompute'] / steps * 1e3:.1f} ms/step)\n"
        f"  speed-up x{best['recompute'] / best['kv_cache']:.1f}; greedy tokens agree on "
        f"{agree:.1%} of positions"
    )
    print("per-step vocabulary work (sample + log-prob + top-K record) vs its floor, 1 thread:")
    for vocab, shape in ((args.vocab, "flat"), (args.floor_vocab, "flat"),
                         (args.floor_vocab, "zipf")):  # fmt: skip
        t = _vocab_step_floor(args.batch, vocab, args.floor_k, args.floor_calls, shape)
        print(
            f"  B={args.batch} V={vocab:,} K={args.floor_k} {shape:4s} logits: "
            f"ours {t['ours'] * 1e3:.3f} ms | floor "
            f"(topk + logsumexp) {t['floor'] * 1e3:.3f} ms -> {t['ours'] / t['floor']:.2f}x | "
            f"floor + multinomial draw {t['floor+draw'] * 1e3:.3f} ms -> "
            f"{t['ours'] / t['floor+draw']:.2f}x"
        )


if __name__ == "__main__":
    main()
