"""Vocab-parallel ops at TP=1, 2, 4 against single-process full-vocabulary references.

Every rank builds the same full padded logits from a seed and keeps its ``[..., V/TP]``
shard; the padding columns hold garbage (huge values and NaN) that must be ignored. The
ranks return outputs and their gradient shards; the test process rebuilds the full logits
and compares with ``torch.sort(stable=True)`` / ``torch.logsumexp`` / ``log_softmax`` on the
real vocabulary, with autograd through that reference for the gradients. One
``run_distributed`` call per world size computes every case.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed

VOCAB = 37  # real vocabulary: does not divide 48, the padded one
VOCAB_SHORT = 30  # at TP=4, rank 3's shard [36, 48) is all padding
PADDED = 48  # Megatron-style padding to a multiple of 4 * TP (tiny divisor for tests)
TEMPERATURE = 0.7
SHAPE = (5, 3)  # [s, b] leading dims
NUM_IDS = 3
DTYPES = [  # name, dtype, real vocabulary, k, ties, -inf masked ids
    ("fp32", torch.float32, VOCAB, 5, False, False),
    ("bf16", torch.bfloat16, VOCAB_SHORT, 6, True, False),
    ("masked", torch.float32, VOCAB, 5, False, True),
]


def _full_logits(
    seed: int, lead: tuple[int, ...], vocab: int, dtype=torch.float32, ties=False, masked=False
):
    """``[*lead, PADDED]`` logits; columns ``>= vocab`` hold garbage.

    ``ties``: a coarse grid (many exact ties, also across shards). ``masked``: ~30 % of the
    real ids are ``-inf`` (never the ids of :func:`_ids`).
    """
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(*lead, PADDED, generator=gen) * 3
    if ties:
        full = torch.round(full * 2) / 2
    if masked:
        mask = torch.rand(*lead, vocab, generator=gen) < 0.3
        mask.scatter_(-1, _ids(3, lead, vocab), False)
        full[..., :vocab].masked_fill_(mask, float("-inf"))
    full[..., vocab:] = 1e4
    if PADDED - vocab > 1:
        full[..., vocab + 1] = float("nan")
    return full.to(dtype)


def _ids(seed: int, lead: tuple[int, ...], vocab: int, n: int = NUM_IDS):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (*lead, n), generator=gen)
    ids[..., 0] = vocab - 1  # the last real id lives on the last non-empty shard
    return ids


def _weights(seed: int, shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _shard(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    width = full.shape[-1] // tp
    return full[..., rank * width : (rank + 1) * width].contiguous()


def _grad_of(op, logits, weight, *args, **kwargs):
    """``(op(logits, *args, **kwargs), d sum(out * weight) / d logits)``."""
    logits = logits.detach().clone().requires_grad_(True)
    out = op(logits, *args, **kwargs)
    (out.float() * weight).sum().backward()
    return out.detach(), logits.grad


def _expect_error(fn):
    try:
        fn()
    except ValueError as err:
        return f"ValueError: {err}"
    except Exception as err:  # noqa: BLE001 - reported as a failure by the test
        return f"{type(err).__name__}: {err}"
    return "no error"


def _rank_cases(tp: int, group_is_none: bool = False):
    """Runs on every rank: every case at this TP size; returns outputs and grad shards."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.distributed import init_distributed
    from megatron_opd.ops import (
        topk_overlap,
        vocab_parallel_entropy,
        vocab_parallel_gather,
        vocab_parallel_log_probs,
        vocab_parallel_logsumexp,
        vocab_parallel_topk,
        vocab_parallel_topk_log_probs,
    )

    groups = init_distributed(ParallelConfig(tensor_parallel_size=tp))
    group = None if group_is_none else groups.tp_group
    rank = groups.tp_rank
    out = {}

    def shard(full):
        return _shard(full, rank, tp)

    for dtype_name, dtype, vocab, k, ties, masked in DTYPES:
        opts = dict(temperature=TEMPERATURE, vocab_size=vocab, chunk_size=4)
        student = shard(_full_logits(1, SHAPE, vocab, dtype, ties, masked))
        teacher = shard(_full_logits(2, SHAPE, vocab, dtype, ties, masked))
        ids = _ids(3, SHAPE, vocab)
        case = out[dtype_name] = {}
        case["topk"] = vocab_parallel_topk(student, k, group, **opts)
        case["topk_t1"] = vocab_parallel_topk(student, k, group, vocab_size=vocab)
        case["topk_log_probs"] = vocab_parallel_topk_log_probs(student, k, group, **opts)
        case["overlap"] = topk_overlap(student, teacher, k, group, **opts)
        case["logsumexp"] = _grad_of(
            vocab_parallel_logsumexp, student, _weights(4, SHAPE), group, **opts
        )
        case["log_probs"] = _grad_of(
            vocab_parallel_log_probs, student, _weights(5, ids.shape), ids, group, **opts
        )
        case["gather"] = _grad_of(
            vocab_parallel_gather,
            student,
            _weights(6, ids.shape),
            ids,
            group,
            temperature=TEMPERATURE,
        )
        case["entropy"] = _grad_of(
            vocab_parallel_entropy, student, _weights(7, SHAPE), group, **opts
        )

    empty = shard(_full_logits(1, (0, 3), VOCAB))
    empty_ids = torch.zeros(0, 3, 2, dtype=torch.long)
    out["empty"] = {
        "topk": vocab_parallel_topk(empty, 4, group, vocab_size=VOCAB),
        "topk_log_probs": vocab_parallel_topk_log_probs(empty, 4, group, vocab_size=VOCAB),
        "log_probs": _grad_of(
            lambda x: vocab_parallel_log_probs(x, empty_ids, group, vocab_size=VOCAB),
            empty,
            torch.zeros(0, 3, 2),
        ),
        "entropy": vocab_parallel_entropy(empty, group, vocab_size=VOCAB),
        "overlap": topk_overlap(empty, empty, 4, group, vocab_size=VOCAB),
    }

    if tp == 2 and not group_is_none:
        # Megatron's own op: no padding, one target per token; it overwrites its input.
        full = torch.randn(*SHAPE, PADDED, generator=torch.Generator().manual_seed(8))
        target = _ids(9, SHAPE, PADDED, n=1)
        logits = shard(full).requires_grad_(True)
        loss = vocab_parallel_cross_entropy(logits.clone(), target[..., 0])
        loss.sum().backward()
        ours = _grad_of(
            lambda x: -vocab_parallel_log_probs(x, target, group)[..., 0],
            shard(full),
            torch.ones(SHAPE),
        )
        out["megatron"] = {"loss": loss.detach(), "grad": logits.grad, "ours": ours}

    out["errors"] = _bad_input_messages(tp, rank, group)
    return out


def _bad_input_messages(tp: int, rank: int, group):
    from megatron_opd.ops import (
        topk_overlap,
        vocab_parallel_entropy,
        vocab_parallel_gather,
        vocab_parallel_log_probs,
        vocab_parallel_logsumexp,
        vocab_parallel_topk,
        vocab_parallel_topk_log_probs,
    )

    good = _shard(_full_logits(1, SHAPE, VOCAB), rank, tp)
    ids = _ids(3, SHAPE, VOCAB)
    nan_one_rank = good.clone()
    if rank == tp - 1:
        nan_one_rank[2, 1, 0] = float("nan")  # id (tp-1)*V_local < VOCAB: a real id
    plus_inf = good.clone()
    plus_inf[0, 0, 0] = float("inf")
    all_masked = good.clone()
    all_masked[1, 2, :] = float("-inf")  # token 5: every id masked on every rank
    few_left = good.clone()
    few_left[0, 1, 1:] = float("-inf")  # token 1: TP ids left (one per rank) < k = TP + 1
    cases = {
        "k_too_large": lambda: vocab_parallel_topk(good, VOCAB + 1, group, vocab_size=VOCAB),
        "k_zero": lambda: vocab_parallel_topk_log_probs(good, 0, group),
        "vocab_too_large": lambda: vocab_parallel_logsumexp(good, group, vocab_size=PADDED + 1),
        "ids_out_of_range": lambda: vocab_parallel_log_probs(
            good, ids + VOCAB, group, vocab_size=VOCAB
        ),
        "ids_wrong_shape": lambda: vocab_parallel_gather(good, ids[0], group),
        "ids_float": lambda: vocab_parallel_log_probs(good, ids.float(), group),
        "teacher_vocab": lambda: topk_overlap(good, good[..., :-1], 2, group),
        "nan_one_rank_topk": lambda: vocab_parallel_topk(
            nan_one_rank, 3, group, vocab_size=VOCAB, chunk_size=2
        ),
        "nan_one_rank_log_probs": lambda: vocab_parallel_log_probs(
            nan_one_rank, ids, group, vocab_size=VOCAB
        ),
        "nan_one_rank_entropy": lambda: vocab_parallel_entropy(
            nan_one_rank, group, vocab_size=VOCAB
        ),
        "plus_inf_topk_log_probs": lambda: vocab_parallel_topk_log_probs(
            plus_inf, 3, group, vocab_size=VOCAB
        ),
        "all_masked_log_probs": lambda: vocab_parallel_logsumexp(
            all_masked, group, vocab_size=VOCAB
        ),
        "all_masked_entropy": lambda: vocab_parallel_entropy(all_masked, group, vocab_size=VOCAB),
        "too_few_unmasked_topk": lambda: vocab_parallel_topk(
            few_left, tp + 1, group, vocab_size=VOCAB
        ),
        "temperature": lambda: vocab_parallel_topk(good, 3, group, temperature=0.0),
        "integer_logits": lambda: vocab_parallel_topk(good.long(), 3, group),
        "scalar_logits": lambda: vocab_parallel_logsumexp(good[0, 0, 0], group),
        "chunk_size": lambda: vocab_parallel_topk(good, 3, group, chunk_size=0),
    }
    if tp > 1:
        uneven = good if rank else good[..., :-1]
        cases["shard_widths_differ"] = lambda: vocab_parallel_topk(uneven, 3, group)
        tokens = good if rank else good[:-1]
        cases["token_counts_differ"] = lambda: vocab_parallel_logsumexp(tokens, group)
        other_ids = ids if rank else (ids + 1) % VOCAB
        cases["ids_differ"] = lambda: vocab_parallel_gather(good, other_ids, group)
    return {name: _expect_error(fn) for name, fn in cases.items()}


# ---------------------------------------------------------------------------------------
# references (single process, full vocabulary)

_RESULTS: dict[tuple[int, bool], list[dict]] = {}


def _results(tp: int, group_is_none: bool = False):
    key = (tp, group_is_none)
    if key not in _RESULTS:
        _RESULTS[key] = run_distributed(_rank_cases, tp, tp, group_is_none, timeout_s=240)
    return _RESULTS[key]


WORLDS = [(1, True), (1, False), (2, False), (4, False)]
WORLD_IDS = ["tp1-none", "tp1", "tp2", "tp4"]
DTYPE_IDS = [d[0] for d in DTYPES]


def _real(seed, vocab, dtype, ties, masked, temperature=TEMPERATURE, lead=SHAPE):
    """Real-vocabulary logits / T in float64 (what every op is defined over), with masked
    ids at -1e4 (probability exactly 0 in float64, finite for the autograd reference), and
    the full padded logits."""
    full = _full_logits(seed, lead, vocab, dtype, ties, masked)
    real = full[..., :vocab].double()
    return torch.where(torch.isinf(real), -1e4, real) / temperature, full


def _same_on_all_ranks(results, path):
    def get(result):
        for key in path:
            result = result[key]
        return result

    first = get(results[0])
    for other in results[1:]:
        a, b = (first, get(other)) if isinstance(first, tuple) else ((first,), (get(other),))
        for x, y in zip(a, b):
            assert torch.equal(x, y), f"{path} differs across ranks"
    return first


def _grads(results, path):
    return torch.cat([r[path[0]][path[1]][1] for r in results], dim=-1)


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("world", WORLDS, ids=WORLD_IDS)
@pytest.mark.parametrize("case", DTYPES, ids=DTYPE_IDS)
def test_topk_values_ids_and_log_probs(world, case):
    results = _results(*world)
    name, dtype, vocab, k, ties, masked = case
    scaled, full = _real(1, vocab, dtype, ties, masked)
    # Stable descending sort of the whole vocabulary: ties go to the lower id.
    ref = torch.sort(full[..., :vocab].float() / TEMPERATURE, dim=-1, descending=True, stable=True)
    values, ids = _same_on_all_ranks(results, (name, "topk"))
    assert torch.equal(ids, ref.indices[..., :k])
    assert torch.equal(values, ref.values[..., :k])
    if ties:
        assert (ref.values[..., k - 1] == ref.values[..., k]).any(), "no tie at the boundary"
    ref1 = torch.sort(full[..., :vocab].float(), dim=-1, descending=True, stable=True)
    values1, ids1 = _same_on_all_ranks(results, (name, "topk_t1"))
    assert torch.equal(ids1, ref1.indices[..., :k]) and torch.equal(values1, ref1.values[..., :k])
    log_probs, ids2, lse = _same_on_all_ranks(results, (name, "topk_log_probs"))
    assert torch.equal(ids2, ref.indices[..., :k])
    ref_log_probs = torch.log_softmax(scaled, dim=-1)
    torch.testing.assert_close(
        log_probs.double(), ref_log_probs.gather(-1, ids2), **_tol(torch.float32)
    )
    torch.testing.assert_close(lse.double(), torch.logsumexp(scaled, -1), **_tol(torch.float32))
    # overlap against a set intersection on the reference ids
    teacher = _full_logits(2, SHAPE, vocab, dtype, ties, masked)[..., :vocab].float()
    teacher = teacher / TEMPERATURE
    teacher_ids = torch.sort(teacher, dim=-1, descending=True, stable=True).indices[..., :k]
    ratio, in_teacher = _same_on_all_ranks(results, (name, "overlap"))
    for pos in range(SHAPE[0] * SHAPE[1]):
        s_ids = ref.indices[..., :k].reshape(-1, k)[pos].tolist()
        t_ids = set(teacher_ids.reshape(-1, k)[pos].tolist())
        assert in_teacher.reshape(-1, k)[pos].tolist() == [i in t_ids for i in s_ids]
        assert ratio.reshape(-1)[pos].item() == pytest.approx(len(t_ids & set(s_ids)) / k)
    assert 0 < ratio.mean() < 1, "the case should have partial overlap"


@pytest.mark.parametrize("world", WORLDS, ids=WORLD_IDS)
@pytest.mark.parametrize("case", DTYPES, ids=DTYPE_IDS)
def test_differentiable_ops_values_and_gradients(world, case):
    results = _results(*world)
    name, dtype, vocab, _, ties, masked = case
    _, full = _real(1, vocab, dtype, ties, masked)
    ids = _ids(3, SHAPE, vocab)
    references = {
        "logsumexp": (lambda s: torch.logsumexp(s, -1), _weights(4, SHAPE)),
        "log_probs": (lambda s: torch.log_softmax(s, -1).gather(-1, ids), _weights(5, ids.shape)),
        "gather": (lambda s: s.gather(-1, ids), _weights(6, ids.shape)),
        "entropy": (
            lambda s: -(torch.softmax(s, -1) * torch.log_softmax(s, -1)).sum(-1),
            _weights(7, SHAPE),
        ),
    }
    finite = torch.where(torch.isinf(full), -1e4, full.double())
    for op, (reference, weight) in references.items():
        leaf = finite.clone().requires_grad_(True)
        ref_out = reference(leaf[..., :vocab] / TEMPERATURE)
        (ref_out * weight).sum().backward()
        out = _same_on_all_ranks(results, (name, op, 0))
        torch.testing.assert_close(out.double(), ref_out.detach(), **_tol(torch.float32))
        grad = _grads(results, (name, op))
        assert grad.dtype == dtype
        assert torch.all(grad[..., vocab:] == 0), f"{op}: gradient reached padding"
        torch.testing.assert_close(grad.double(), leaf.grad, **_tol(dtype), msg=op)


@pytest.mark.parametrize("world", WORLDS, ids=WORLD_IDS)
def test_zero_tokens(world):
    results = _results(*world)
    empty = results[0]["empty"]
    assert empty["topk"][0].shape == (0, 3, 4) and empty["topk"][1].shape == (0, 3, 4)
    assert [t.shape for t in empty["topk_log_probs"]] == [(0, 3, 4), (0, 3, 4), (0, 3)]
    out, grad = empty["log_probs"]
    assert out.shape == (0, 3, 2) and grad.shape == (0, 3, PADDED // world[0])
    assert empty["entropy"].shape == (0, 3)
    assert [t.shape for t in empty["overlap"]] == [(0, 3), (0, 3, 4)]


def test_log_probs_equal_minus_megatron_cross_entropy_tp2():
    results = _results(2, False)
    loss = _same_on_all_ranks(results, ("megatron", "loss"))
    ours = _same_on_all_ranks(results, ("megatron", "ours", 0))
    torch.testing.assert_close(ours, loss, atol=1e-5, rtol=1e-5)
    megatron_grad = torch.cat([r["megatron"]["grad"] for r in results], dim=-1)
    our_grad = torch.cat([r["megatron"]["ours"][1] for r in results], dim=-1)
    torch.testing.assert_close(our_grad, megatron_grad, atol=1e-6, rtol=1e-5)


EXPECTED_ERRORS = {
    "k_too_large": "k=38 must be an int in [1, vocab_size=37]",
    "k_zero": "k=0 must be an int in [1, vocab_size=",
    "vocab_too_large": "vocab_size=49 is larger than the padded vocabulary 48",
    "ids_out_of_range": "global_ids holds ids in [",
    "ids_wrong_shape": "global_ids has shape (3, 3) but logits has",
    "ids_float": "global_ids must be an integer tensor",
    "teacher_vocab": "student_logits (5, 3, ",
    "nan_one_rank_topk": "logits holds NaN or +inf in the real vocabulary",
    "nan_one_rank_log_probs": "first at flattened token 7",
    "nan_one_rank_entropy": "logits holds NaN or +inf",
    "plus_inf_topk_log_probs": "first at flattened token 0",
    "all_masked_log_probs": "at 1 token(s), the first at flattened token 5",
    "all_masked_entropy": "at 1 token(s), the first at flattened token 5",
    "too_few_unmasked_topk": "at 1 token(s), the first at flattened token 1",
    "temperature": "temperature must be a finite number > 0",
    "integer_logits": "logits must be a floating-point tensor",
    "scalar_logits": "logits must be a floating-point tensor [..., V_local]",
    "chunk_size": "chunk_size must be a positive int",
    "shard_widths_differ": "pad the vocabulary to a multiple of make_vocab_size_divisible_by",
    "token_counts_differ": "tokens (product of logits' leading dims) differs across",
    "ids_differ": "global_ids checksum differs across tensor-parallel ranks",
}


@pytest.mark.parametrize("world", WORLDS, ids=WORLD_IDS)
def test_bad_input_raises_value_error_on_every_rank(world):
    results = _results(*world)
    per_rank = [r["errors"] for r in results]
    expected_names = set(EXPECTED_ERRORS) - (
        set() if world[0] > 1 else {"shard_widths_differ", "token_counts_differ", "ids_differ"}
    )
    assert set(per_rank[0]) == expected_names
    for name in expected_names:
        messages = [errors[name] for errors in per_rank]
        assert len(set(messages)) == 1, f"{name}: ranks disagree: {messages}"
        assert messages[0].startswith("ValueError: "), f"{name}: {messages[0]}"
        assert EXPECTED_ERRORS[name] in messages[0], f"{name}: {messages[0]}"


def _check_single_rank(device: str) -> None:
    """tp_group=None in this process: every op against the full-vocabulary reference."""
    from megatron_opd.ops import (
        vocab_parallel_entropy,
        vocab_parallel_log_probs,
        vocab_parallel_topk_log_probs,
    )

    for dtype in (torch.float32, torch.bfloat16):
        full = _full_logits(1, SHAPE, VOCAB, dtype, ties=dtype == torch.bfloat16).to(device)
        ids = _ids(3, SHAPE, VOCAB).to(device)
        scaled = full[..., :VOCAB].double() / TEMPERATURE
        opts = dict(temperature=TEMPERATURE, vocab_size=VOCAB, chunk_size=4)
        log_probs, top_ids, lse = vocab_parallel_topk_log_probs(full, 5, None, **opts)
        real = full[..., :VOCAB].float() / TEMPERATURE
        ref = torch.sort(real, dim=-1, descending=True, stable=True)
        assert torch.equal(top_ids, ref.indices[..., :5])
        ref_log_probs = torch.log_softmax(scaled, -1)
        torch.testing.assert_close(
            log_probs.double(), ref_log_probs.gather(-1, top_ids), **_tol(torch.float32)
        )
        torch.testing.assert_close(lse.double(), torch.logsumexp(scaled, -1), **_tol(torch.float32))
        leaf = full.detach().clone().requires_grad_(True)
        (vocab_parallel_log_probs(leaf, ids, None, **opts).sum()).backward()
        ref_leaf = full.double().requires_grad_(True)
        torch.log_softmax(ref_leaf[..., :VOCAB] / TEMPERATURE, -1).gather(-1, ids).sum().backward()
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **_tol(dtype))
        entropy = vocab_parallel_entropy(full, None, **opts)
        ref_entropy = -(torch.softmax(scaled, -1) * torch.log_softmax(scaled, -1)).sum(-1)
        torch.testing.assert_close(entropy.double(), ref_entropy, **_tol(torch.float32))


def test_single_rank_in_process_cpu():
    _check_single_rank("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_single_rank_in_process_cuda():
    _check_single_rank("cuda")
