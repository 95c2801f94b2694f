"""Megatron-native rollout engine, batch scoring and chunked online stop on gloo (CPU).

References are independent of the code under test: a TP=1 PP=1 model with the same
weights (tests/test_rollout_models.py), run one unpadded row at a time with a full
recomputation per token (no KV cache, no padding mask, no row dropping) and plain
full-vocabulary torch ops. Layouts: TP=1 (one process), TP=2 and PP=2 (two processes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_rollout_models import VOCAB_SIZE, build_tiny_gpt, full_logits

from megatron_opd.rollout.sampling import sample_next_tokens
from megatron_opd.testing.multiprocess import run_distributed

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [101, 3, 64], [12, 200, 48, 91, 6], [77]]
NUM_NEW = 10
STUDENT_SEED, TEACHER_NOISE_SEED = 11, 12
TOP_K = 8
TAU, W_DROP = 0.75, 0.34
SCORE_FIELDS = (
    "student_topk_ids", "student_topk_log_probs", "student_sampled_log_probs",
    "student_log_probs_at_teacher_ids", "teacher_topk_ids", "teacher_topk_log_probs",
    "teacher_log_probs_at_student_ids", "teacher_sampled_log_probs", "overlap_ratio",
)  # fmt: skip
SAMPLED = dict(temperature=1.0, top_p=0.9, n=2, seed=7, generation_batch_size=3)
SAMPLED_FULL = {**SAMPLED, "top_p": 1.0}  # at TP = 2: drawn on the vocabulary shards


def _models(groups):
    # RoPE: at one pipeline stage (tp1, tp2) the engine and the chunk scorer run the lean
    # decoder; pp2 runs Megatron's own KV-cached forward.
    student = build_tiny_gpt(groups, seed=STUDENT_SEED, position="rope")
    teacher = build_tiny_gpt(
        groups, seed=STUDENT_SEED, noise_seed=TEACHER_NOISE_SEED, noise_scale=0.12,
        position="rope",
    )  # fmt: skip
    return student, teacher


def _scoring_batch():
    """A fixed ragged batch (not from the engine) for the scoring comparison."""
    from megatron_opd.rollout.batch import RolloutBatch

    generator = torch.Generator().manual_seed(3)
    prompt_lengths = torch.tensor([4, 1, 6, 3, 2])
    response_lengths = torch.tensor([6, 9, 2, 5, 1])
    seq = int((prompt_lengths + response_lengths).max())
    tokens = torch.zeros(5, seq, dtype=torch.long)
    for i in range(5):
        n = int(prompt_lengths[i] + response_lengths[i])
        tokens[i, :n] = torch.randint(1, VOCAB_SIZE, (n,), generator=generator)
    return RolloutBatch(
        tokens=tokens, prompt_lengths=prompt_lengths, response_lengths=response_lengths
    )


# --------------------------------------------------------------------------- reference


def _reference_generate(model, *, eos, temperature, top_p, n, seed, generation_batch_size):
    rows = [list(p) for p in PROMPTS for _ in range(n)]
    block = generation_batch_size or len(rows)
    generator = torch.Generator().manual_seed(seed)
    responses, log_probs = [[] for _ in rows], [[] for _ in rows]
    for begin in range(0, len(rows), block):
        active = list(range(begin, min(begin + block, len(rows))))
        for step in range(NUM_NEW):
            logits = torch.stack([full_logits(model, rows[i] + responses[i])[-1] for i in active])
            logits[:, VOCAB_SIZE:] = float("-inf")
            ids = sample_next_tokens(
                logits, temperature=temperature, top_p=top_p, generator=generator
            )
            lp = logits.log_softmax(-1).gather(1, ids[:, None])[:, 0]
            for row, token, value in zip(active, ids.tolist(), lp.tolist()):
                responses[row].append(token)
                log_probs[row].append(value)
            active = [
                row for row, token in zip(active, ids.tolist())
                if token not in eos and step + 1 < NUM_NEW
            ]  # fmt: skip
            if not active:
                break
    return responses, log_probs


def _reference_scores(student, teacher, batch):
    out = {"student_ids": [], "student_lp": [], "teacher_ids": [], "teacher_lp": [],
           "teacher_at_student": [], "teacher_sampled": [], "student_sampled": [],
           "student_full": [], "teacher_full": []}  # fmt: skip
    for i in range(batch.batch_size):
        p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
        seq = batch.tokens[i, : p + r].tolist()
        s_lp = full_logits(student, seq)[:, :VOCAB_SIZE].log_softmax(-1)[p - 1 : p + r - 1]
        t_lp = full_logits(teacher, seq)[:, :VOCAB_SIZE].log_softmax(-1)[p - 1 : p + r - 1]
        targets = torch.tensor(seq[p:])[:, None]
        s_top, s_ids = s_lp.topk(TOP_K, dim=-1)
        t_top, t_ids = t_lp.topk(TOP_K, dim=-1)
        out["student_ids"].append(s_ids)
        out["student_lp"].append(s_top)
        out["teacher_ids"].append(t_ids)
        out["teacher_lp"].append(t_top)
        out["teacher_at_student"].append(t_lp.gather(1, s_ids))
        out["teacher_sampled"].append(t_lp.gather(1, targets)[:, 0])
        out["student_sampled"].append(s_lp.gather(1, targets)[:, 0])
        out["student_full"].append(s_lp)
        out["teacher_full"].append(t_lp)
    return out


# --------------------------------------------------------------------------- engine runs


def _engine(groups, student, eos, **kw):
    from megatron_opd.config.rollout import RolloutConfig
    from megatron_opd.rollout.megatron_engine import MegatronRolloutEngine

    config = RolloutConfig(
        temperature=kw.get("temperature", 0.0),
        top_p=kw.get("top_p", 1.0),
        n_samples_per_prompt=kw.get("n", 1),
        max_new_tokens=64,
        chunk_size=kw.get("chunk_size", 0),
        generation_batch_size=kw.get("generation_batch_size", 0),
    )
    return MegatronRolloutEngine(
        student, groups, config, eos_token_ids=eos, pad_id=0, vocab_size=VOCAB_SIZE
    )


def _rows(batch):
    """Responses and (last-stage) log-probs per row, in response coordinates."""
    out = []
    for i in range(batch.batch_size):
        p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
        lp = None if batch.sampled_log_probs is None else batch.sampled_log_probs[i, p : p + r]
        out.append((batch.tokens[i, p : p + r].tolist(), lp))
    return out


def _engine_cases(groups, student, teacher, eos):
    from megatron_opd.config.prune import PruneConfig
    from megatron_opd.prune.compat import drift_events
    from megatron_opd.prune.weights import reliability_weights
    from megatron_opd.rollout.chunk_scorer import ChunkScorer
    from megatron_opd.rollout.kv_decoder import MegatronKVDecoder
    from megatron_opd.rollout.lean_decoder import LeanDecoder
    from megatron_opd.scoring import score_rollouts

    res = {"last": groups.is_last_stage, "tp_rank": groups.tp_rank}
    batch_sizes, decoders, sharded = [], [], []
    originals = {cls: cls.forward for cls in (LeanDecoder, MegatronKVDecoder)}

    def recording(cls):
        def forward(self, tokens, *args, **kwargs):
            batch_sizes.append(tokens.shape[0])
            decoders.append(cls.__name__)
            sharded.append(kwargs.get("vocab_parallel", False))
            return originals[cls](self, tokens, *args, **kwargs)

        return forward

    for cls in originals:
        cls.forward = recording(cls)
    try:
        greedy_engine = _engine(groups, student, eos)
        greedy = greedy_engine.generate(PROMPTS, max_new_tokens=NUM_NEW, seed=1)
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
    res["decoders"] = sorted(set(decoders))
    res["vocab_parallel"] = sorted(set(sharded))
    res["decode_steps_on_shards"] = greedy_engine.decode_steps_on_shards
    res["greedy"] = _rows(greedy)
    res["greedy_tokens"] = greedy.tokens
    res["greedy_prompt_lengths"] = greedy.prompt_lengths.tolist()
    res["batch_sizes"] = batch_sizes
    tiny = _engine(groups, student, eos, temperature=1.0, top_p=1e-6)
    res["tiny_top_p"] = _rows(tiny.generate(PROMPTS, max_new_tokens=NUM_NEW, seed=5))
    sampled = _engine(groups, student, eos, **SAMPLED)
    batch = sampled.generate(PROMPTS, max_new_tokens=NUM_NEW, seed=SAMPLED["seed"])
    res["sampled"] = _rows(batch)
    res["prompt_index"] = batch.prompt_index.tolist()
    full = _engine(groups, student, eos, **SAMPLED_FULL)
    batch = full.generate(PROMPTS, max_new_tokens=NUM_NEW, seed=SAMPLED["seed"])
    res["sampled_full"] = _rows(batch)
    if groups.pp_size == 1:  # the drawn tokens' log-probs, recomputed without a cache
        res["sampled_full_recomputed"] = [
            full_logits(student, PROMPTS[i] + tokens)[len(PROMPTS[i]) - 1 : -1, :VOCAB_SIZE]
            .log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
            for i, (tokens, _) in zip(batch.prompt_index.tolist(), res["sampled_full"])
        ]  # fmt: skip

    # The lean no-grad forward at one stage (tp1, tp2); pp2 falls back to Megatron's.
    scored = score_rollouts(
        _scoring_batch(), student=student, teacher=teacher, groups=groups, top_k=TOP_K,
        micro_batch_size=2, vocab_size=VOCAB_SIZE, lean_forward=True,
    )  # fmt: skip
    if groups.is_last_stage:
        res["scores"] = {
            name: getattr(scored, name)
            for name in (
                "student_topk_ids",
                "student_topk_log_probs",
                "student_sampled_log_probs",
                "teacher_topk_ids",
                "teacher_topk_log_probs",
                "teacher_log_probs_at_student_ids",
                "teacher_sampled_log_probs",
                "overlap_ratio",
            )  # fmt: skip
        }

    # K = the whole vocabulary (exact full-vocabulary losses): every id in id order.
    full_vocab = score_rollouts(
        _scoring_batch(), student=student, teacher=teacher, groups=groups, top_k=VOCAB_SIZE,
        micro_batch_size=2, vocab_size=VOCAB_SIZE,
    )  # fmt: skip
    if groups.is_last_stage:
        res["full_vocab_scores"] = {name: getattr(full_vocab, name) for name in SCORE_FIELDS}

    # The rollout records the student's scoring fields; a student-less scoring pass then
    # fills the teacher's. Both must equal a full scoring pass of the same batch.
    recorder = _engine(groups, student, eos, temperature=1.0, n=2)
    recorded = recorder.generate(PROMPTS, max_new_tokens=NUM_NEW, seed=4, student_top_k=TOP_K)
    scored = score_rollouts(
        copy.deepcopy(recorded), student=student, teacher=teacher, groups=groups, top_k=TOP_K,
        micro_batch_size=3, vocab_size=VOCAB_SIZE,
    )  # fmt: skip
    score_rollouts(
        recorded, student=None, teacher=teacher, groups=groups, top_k=TOP_K,
        micro_batch_size=3, vocab_size=VOCAB_SIZE,
    )  # fmt: skip
    if groups.is_last_stage:
        res["recorded_scores"] = {
            name: (getattr(recorded, name), getattr(scored, name))
            for name in SCORE_FIELDS
            if name != "student_log_probs_at_teacher_ids"
        }
        res["recorded_at_teacher_ids"] = recorded.student_log_probs_at_teacher_ids

    from megatron_opd.scoring import broadcast_from_last_stage

    sent = [torch.tensor([3, 1, 4]), torch.arange(6.0).view(2, 3), torch.tensor([True, False])]
    got = broadcast_from_last_stage(sent if groups.is_last_stage else [None] * 3, groups)
    res["broadcast"] = [(t.dtype, t.tolist()) for t in got]

    prune = PruneConfig(metric="overlap", threshold=TAU, top_k=TOP_K, w_drop=W_DROP, w_base=0.0)
    scorer = ChunkScorer(teacher, groups, prune, vocab_size=VOCAB_SIZE)
    engine = _engine(groups, student, eos, temperature=1.0, n=2, chunk_size=3,
                     generation_batch_size=5)  # fmt: skip
    chunked = engine.generate(PROMPTS, max_new_tokens=NUM_NEW, seed=9, chunk_listener=scorer)
    scorer.fill_batch(chunked)
    # Fused teacher scoring: the chunk scorer's teacher scores + a student-only pass equal a
    # full scoring pass with the teacher.
    fused = scorer.fill_scores(copy.deepcopy(chunked))
    score_rollouts(
        fused, student=student, teacher=None, groups=groups, top_k=TOP_K, micro_batch_size=2,
        vocab_size=VOCAB_SIZE,
    )  # fmt: skip
    res["chunk_lengths"] = chunked.response_lengths.tolist()
    res["chunk_rows"] = [tokens for tokens, _ in _rows(chunked)]
    if groups.is_last_stage:
        online = (chunked.weights.clone(), chunked.overlap_ratio.clone(), chunked.effective_lengths)
        res["stop_reason"] = scorer.stopper.stop_reason.tolist()
    score_rollouts(
        chunked, student=student, teacher=teacher, groups=groups, top_k=TOP_K,
        micro_batch_size=3, vocab_size=VOCAB_SIZE,
    )  # fmt: skip
    if groups.is_last_stage:
        mask = chunked.response_mask()
        bad, _ = drift_events(
            metric="overlap", threshold=TAU, valid_mask=mask,
            student_topk_ids=chunked.student_topk_ids, teacher_topk_ids=chunked.teacher_topk_ids,
        )  # fmt: skip
        full = reliability_weights(bad, mask, W_DROP, 0.0)
        res["fused_scores"] = {
            name: (getattr(fused, name), getattr(chunked, name)) for name in SCORE_FIELDS
        }
        res["chunk_weights"] = {
            "online": online,
            "full": (full.weights, chunked.overlap_ratio, full.effective_length),
        }

    # Deferred chunks: with w_drop 0.25 no row can stop within its first 3 tokens (4
    # events), so the first chunk waits for the second; the answers must not change.
    deferring = PruneConfig(metric="overlap", threshold=TAU, top_k=TOP_K, w_drop=0.25,
                            w_base=0.0)  # fmt: skip
    outcomes = []
    for defer in (True, False):
        scorer = ChunkScorer(teacher, groups, deferring, vocab_size=VOCAB_SIZE)
        if not defer:
            scorer._may_defer = lambda chunk: False
        out = engine.generate(PROMPTS, max_new_tokens=NUM_NEW, seed=9, chunk_listener=scorer)
        scorer.fill_batch(out)
        scorer.fill_scores(out)
        fields = {name: getattr(out, name) for name in ("weights", *SCORE_FIELDS[4:8])}
        outcomes.append((out.response_lengths.tolist(), scorer.stopped_early.tolist(),
                         scorer.chunks_scored, scorer.chunks_deferred,
                         fields if groups.is_last_stage else None))  # fmt: skip
    res["deferred"] = outcomes

    # The release's w_base = 0.5: released mode never stops; truncate mode ends each
    # response at its stop point (online), and the full-sequence rule cuts the same tokens.
    for mode in ("released", "truncate"):
        prune = PruneConfig(metric="overlap", threshold=TAU, top_k=TOP_K, w_drop=W_DROP,
                            w_base=0.5, mode=mode)  # fmt: skip
        scorer = ChunkScorer(teacher, groups, prune, vocab_size=VOCAB_SIZE)
        out = engine.generate(PROMPTS, max_new_tokens=NUM_NEW, seed=9, chunk_listener=scorer)
        scorer.fill_batch(out)
        res[f"{mode}_lengths"] = out.response_lengths.tolist()
        res[f"{mode}_stopped_early"] = scorer.stopped_early.tolist()
        if groups.is_last_stage:
            online_lw = out.loss_weights.clone()
            score_rollouts(
                out, student=student, teacher=teacher, groups=groups, top_k=TOP_K,
                micro_batch_size=3, vocab_size=VOCAB_SIZE,
            )  # fmt: skip
            mask = out.response_mask()
            bad, _ = drift_events(
                metric="overlap", threshold=TAU, valid_mask=mask,
                student_topk_ids=out.student_topk_ids, teacher_topk_ids=out.teacher_topk_ids,
            )  # fmt: skip
            full = reliability_weights(bad, mask, rule=prune.weight_rule())
            res[f"{mode}_loss_weights"] = (online_lw, full.loss_weights, full.stop_position,
                                           out.prompt_lengths.clone())  # fmt: skip
        else:
            score_rollouts(
                out, student=student, teacher=teacher, groups=groups, top_k=TOP_K,
                micro_batch_size=3, vocab_size=VOCAB_SIZE,
            )  # fmt: skip
    return res


def _single_process_run():
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.distributed import init_distributed

    groups = init_distributed(ParallelConfig())
    student, teacher = _models(groups)
    plain, _ = _reference_generate(
        student, eos=[], temperature=0.0, top_p=1.0, n=1, seed=0, generation_batch_size=0
    )
    eos = [plain[0][2], plain[2][5]]
    ref = {
        "eos": eos,
        "greedy": _reference_generate(
            student, eos=eos, temperature=0.0, top_p=1.0, n=1, seed=0, generation_batch_size=0
        ),
        "sampled": _reference_generate(
            student,
            eos=eos,
            temperature=SAMPLED["temperature"],
            top_p=SAMPLED["top_p"],
            n=SAMPLED["n"],
            seed=SAMPLED["seed"],
            generation_batch_size=SAMPLED["generation_batch_size"],
        ),  # fmt: skip
        "sampled_full": _reference_generate(student, eos=eos, **SAMPLED_FULL),
        "scores": _reference_scores(student, teacher, _scoring_batch()),
    }
    return ref, _engine_cases(groups, student, teacher, eos)


def _distributed_run(tp, pp, eos):
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.distributed import init_distributed

    groups = init_distributed(ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp))
    student, teacher = _models(groups)
    return _engine_cases(groups, student, teacher, eos)


@pytest.fixture(scope="module")
def runs():
    ((ref, tp1),) = run_distributed(_single_process_run, 1, timeout_s=240)
    tp2 = run_distributed(_distributed_run, 2, 2, 1, ref["eos"], timeout_s=240)
    pp2 = run_distributed(_distributed_run, 2, 1, 2, ref["eos"], timeout_s=240)
    return ref, {"tp1": [tp1], "tp2": tp2, "pp2": pp2}


LAYOUTS = ["tp1", "tp2", "pp2"]


def _check_rows(rows, ref_responses, ref_log_probs, last_stage):
    assert [r[0] for r in rows] == ref_responses
    if last_stage:
        for (_, lp), expected in zip(rows, ref_log_probs):
            torch.testing.assert_close(lp, torch.tensor(expected), atol=2e-5, rtol=0)
    else:
        assert all(lp is None for _, lp in rows)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kv_cache_generation_equals_recompute(runs, layout):
    ref, results = runs
    for res in results[layout]:
        _check_rows(res["greedy"], *ref["greedy"], res["last"])
        _check_rows(res["sampled"], *ref["sampled"], res["last"])
        if layout == "tp2":
            # Drawn on the vocabulary shards (two-stage: other draws than one process's,
            # tested in test_vocab_parallel_sampling.py); the log-probs are the model's.
            rows = zip(res["sampled_full"], res["sampled_full_recomputed"])
            for (tokens, lp), recomputed in rows:
                assert all(t < VOCAB_SIZE for t in tokens)
                torch.testing.assert_close(lp, recomputed, atol=2e-5, rtol=0)
        else:
            _check_rows(res["sampled_full"], *ref["sampled_full"], res["last"])
        assert res["prompt_index"] == [0, 0, 1, 1, 2, 2, 3, 3]
    # The same tokens on every rank of the replica (TP ranks and PP stages).
    for key in ("sampled", "sampled_full"):
        assert all(r[key][i][0] == results[layout][0][key][i][0]
                   for r in results[layout] for i in range(8))  # fmt: skip


def test_eos_stops_rows_and_finished_rows_leave_the_batch(runs):
    ref, results = runs
    eos = ref["eos"]
    greedy = results["tp1"][0]["greedy"]
    lengths = [len(tokens) for tokens, _ in greedy]
    assert min(lengths) < NUM_NEW, "the chosen EOS ids must end some rows early"
    for tokens, _ in greedy:
        assert all(t not in eos for t in tokens[:-1])
        assert len(tokens) == NUM_NEW or tokens[-1] in eos
    # One pipeline stage decodes on the lean path, two on Megatron's forward.
    assert results["tp1"][0]["decoders"] == ["LeanDecoder"]
    assert all(res["decoders"] == ["LeanDecoder"] for res in results["tp2"])
    assert all(res["decoders"] == ["MegatronKVDecoder"] for res in results["pp2"])
    # At TP = 2 on the lean path the greedy rollout samples on the vocabulary shards.
    assert all(res["vocab_parallel"] == [True] for res in results["tp2"])
    assert results["tp1"][0]["vocab_parallel"] == [False]
    # ... and counts them (the step metric decode_steps_on_shards): one per decode step.
    assert all(res["decode_steps_on_shards"] == max(lengths) for res in results["tp2"])
    assert results["tp1"][0]["decode_steps_on_shards"] == 0
    # Prefill with all 4 rows, then one decode step per token with only the running rows.
    sizes = results["tp1"][0]["batch_sizes"]
    running = [sum(1 for n in lengths if n > step) for step in range(max(lengths))]
    assert sizes == running
    # Right-padded layout: prompt at column 0, response right after it, pad 0 behind.
    tokens = results["tp1"][0]["greedy_tokens"]
    for i, (prompt, (response, _)) in enumerate(zip(PROMPTS, greedy)):
        n = len(prompt) + len(response)
        assert tokens[i, :n].tolist() == prompt + response
        assert (tokens[i, n:] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_top_p_is_greedy(runs, layout):
    ref, results = runs
    for res in results[layout]:
        assert [r[0] for r in res["tiny_top_p"]] == ref["greedy"][0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scoring_equals_full_vocabulary_reference(runs, layout):
    ref, results = runs
    expected = ref["scores"]
    batch = _scoring_batch()
    pairs = {
        "student_topk_ids": "student_ids", "student_topk_log_probs": "student_lp",
        "teacher_topk_ids": "teacher_ids", "teacher_topk_log_probs": "teacher_lp",
        "teacher_log_probs_at_student_ids": "teacher_at_student",
        "teacher_sampled_log_probs": "teacher_sampled",
        "student_sampled_log_probs": "student_sampled",
    }  # fmt: skip
    last = [res for res in results[layout] if res["last"]]
    assert last and all("scores" not in res for res in results[layout] if not res["last"])
    for res in last:
        scores = res["scores"]
        for i in range(batch.batch_size):
            p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
            for name, ref_name in pairs.items():
                got, want = scores[name][i, p : p + r], expected[ref_name][i]
                if got.dtype == torch.long:
                    assert torch.equal(got, want), (name, i)
                else:
                    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
            pairs_i = zip(expected["student_ids"][i], expected["teacher_ids"][i])
            overlap = [len(set(a.tolist()) & set(b.tolist())) / TOP_K for a, b in pairs_i]
            torch.testing.assert_close(scores["overlap_ratio"][i, p : p + r], torch.tensor(overlap))
            # Nothing outside the response.
            outside = torch.ones(batch.seq_length, dtype=torch.bool)
            outside[p : p + r] = False
            assert (scores["teacher_topk_log_probs"][i][outside] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_vocabulary_scoring_takes_every_id_in_order(runs, layout):
    ref, results = runs
    expected = ref["scores"]
    batch = _scoring_batch()
    every = torch.arange(VOCAB_SIZE)
    for res in (r for r in results[layout] if r["last"]):
        scores = res["full_vocab_scores"]
        for i in range(batch.batch_size):
            p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
            cols = slice(p, p + r)
            for side in ("student", "teacher"):
                assert torch.equal(scores[f"{side}_topk_ids"][i, cols], every.expand(r, -1))
                want = expected[f"{side}_full"][i]
                torch.testing.assert_close(scores[f"{side}_topk_log_probs"][i, cols], want,
                                           atol=2e-5, rtol=0)  # fmt: skip
                torch.testing.assert_close(
                    scores[f"{side}_sampled_log_probs"][i, cols], expected[f"{side}_sampled"][i],
                    atol=2e-5, rtol=0,
                )  # fmt: skip
            torch.testing.assert_close(scores["teacher_log_probs_at_student_ids"][i, cols],
                                       expected["teacher_full"][i], atol=2e-5, rtol=0)  # fmt: skip
            torch.testing.assert_close(scores["student_log_probs_at_teacher_ids"][i, cols],
                                       expected["student_full"][i], atol=2e-5, rtol=0)  # fmt: skip
            assert (scores["overlap_ratio"][i, cols] == 1).all()
            assert (scores["overlap_ratio"][i, p + r :] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_student_scores_recorded_by_the_rollout_equal_a_scoring_pass(runs, layout):
    _, results = runs
    for res in (r for r in results[layout] if r["last"]):
        for name, (recorded, scored) in res["recorded_scores"].items():
            if recorded.dtype in (torch.long, torch.bool):
                assert torch.equal(recorded, scored), name
            else:
                torch.testing.assert_close(recorded, scored, atol=2e-5, rtol=0, msg=name)
        assert res["recorded_at_teacher_ids"] is None  # no student pass: not computed


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_online_stop_equals_full_scoring(runs, layout):
    _, results = runs
    lengths = results[layout][0]["chunk_lengths"]
    assert all(r["chunk_lengths"] == lengths for r in results[layout])
    for res in results[layout]:
        if not res["last"]:
            continue
        online, full = res["chunk_weights"]["online"], res["chunk_weights"]["full"]
        torch.testing.assert_close(online[0], full[0])  # weights [b, s]
        torch.testing.assert_close(online[1], full[1])  # overlap ratio [b, s]
        assert torch.equal(online[2], full[2])  # effective lengths
        # The stopper stopped some rows before the budget, at a chunk end (keeping the
        # chunk's tokens), some rows ended at EOS inside a chunk and were still scored to
        # their end, and one row at least ran on: the comparison is not vacuous.
        eos = runs[0]["eos"]
        ended_at_eos = [row[-1] in eos for row in res["chunk_rows"]]
        stopped = [
            n for n, why, at_eos in zip(lengths, res["stop_reason"], ended_at_eos)
            if why != 0 and not at_eos
        ]  # fmt: skip
        assert all(n % 3 == 0 or n == NUM_NEW for n in stopped)
        assert any(n < NUM_NEW for n in stopped)
        assert any(at_eos and n % 3 != 0 for n, at_eos in zip(lengths, ended_at_eos))
        assert any(why == 0 for why in res["stop_reason"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deferred_chunks_change_no_answer(runs, layout):
    """A chunk after which no row can stop is read with the next one: fewer teacher
    forwards, the same stops, lengths, weights and teacher scores as reading each chunk."""
    for res in runs[1][layout]:
        deferred, every_chunk = res["deferred"]
        assert deferred[:2] == every_chunk[:2]  # lengths, stopped early
        assert any(every_chunk[1]) and any(n < NUM_NEW for n in every_chunk[0])
        assert every_chunk[3] == 0
        if layout == "pp2":  # the stopper lives on the last stage: no deferral
            assert deferred[2:4] == every_chunk[2:4]
        else:
            assert deferred[3] > 0 and deferred[2] + deferred[3] == every_chunk[2]
        if res["last"]:
            for name, value in deferred[4].items():
                torch.testing.assert_close(value, every_chunk[4][name], atol=2e-5, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fused_teacher_scoring_equals_a_teacher_pass(runs, layout):
    _, results = runs
    for res in results[layout]:
        if not res["last"]:
            continue
        for name, (fused, separate) in res["fused_scores"].items():
            if fused.dtype == torch.long:
                assert torch.equal(fused, separate), name
            else:
                torch.testing.assert_close(fused, separate, atol=2e-5, rtol=0, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truncate_mode_stops_and_cuts_with_w_base(runs, layout):
    _, results = runs
    for res in results[layout]:
        assert res["truncate_stopped_early"] == results[layout][0]["truncate_stopped_early"]
        # Released mode with w_base = 0.5: nothing ever stops, every token is trained.
        assert not any(res["released_stopped_early"])
        if not res["last"]:
            continue
        online, full, stop, prompt = res["released_loss_weights"]
        torch.testing.assert_close(online, full)
        assert (stop == -1).all()
        online, full, stop, prompt = res["truncate_loss_weights"]
        torch.testing.assert_close(online, full)
        lengths = res["truncate_lengths"]
        stopped = res["truncate_stopped_early"]
        assert any(stopped), "the online stop never fired at w_base = 0.5"
        for i, was_stopped in enumerate(stopped):
            if was_stopped:
                # Stopped at a chunk end, at or after its stop point; nothing after the
                # stop point carries loss weight, the stop token keeps w + w_base >= 0.5.
                assert stop[i] >= 0 and lengths[i] % 3 == 0
                assert (full[i, stop[i] + 1 :] == 0).all() and full[i, stop[i]] >= 0.5
                assert stop[i] - prompt[i] >= lengths[i] - 3
        # Released keeps every sample's full length; truncate generates fewer tokens. (Not
        # per sample: once a row leaves the batch, the rows after it draw other uniforms.)
        assert sum(lengths) < sum(res["released_lengths"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_broadcast_from_last_stage(runs, layout):
    _, results = runs
    expected = [(torch.int64, [3, 1, 4]), (torch.float32, [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]),
                (torch.bool, [True, False])]  # fmt: skip
    assert all(res["broadcast"] == expected for res in results[layout])
