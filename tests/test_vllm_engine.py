"""The vLLM rollout engine on CPU, against a fake ``vllm`` that follows vLLM's documented API.

References: vLLM's documented behaviour as the fake implements it (sleep-mode
bookkeeping, ``external_launcher`` environment, ``load_weights`` names and shapes from the
HF model definitions), the student's own HF safetensors file for the pushed weights, and
hand-worked cases for the request and result helpers. Layouts: one process, TP=2 and
PP=2 (two processes on gloo).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_opd.config.rollout import RolloutConfig, VLLMConfig
from megatron_opd.platform import Platform
from megatron_opd.rollout.vllm_requests import (
    request_seed,
    sampling_kwargs,
    stage_rows,
    unpack_completion,
)
from megatron_opd.testing import fake_vllm
from megatron_opd.testing.multiprocess import run_distributed
from megatron_opd.testing.tiny_run import make_tiny_run

PROMPTS = [[5, 17, 33, 2, 9], [11, 3, 6], [12, 20, 48, 9]]
N = 4

# ----------------------------------------------------------------------------- helpers


def test_request_seeds_differ_per_row_and_offset_and_repeat():
    seeds = {request_seed(7, row, start) for row in range(64) for start in (0, 8, 16)}
    assert len(seeds) == 64 * 3
    assert request_seed(7, 3, 8) == request_seed(7, 3, 8)
    assert all(0 <= s < 2**31 - 1 for s in seeds)


def test_sampling_kwargs_are_valid_sampling_params():
    config = RolloutConfig(engine="vllm", temperature=0.7, top_p=0.95, max_new_tokens=100)
    kw = sampling_kwargs(config, max_tokens=12, seed=5, eos_token_ids=[7, 2, 7], num_logprobs=4)
    params = fake_vllm.SamplingParams(**kw)  # unknown fields would raise TypeError
    assert (params.n, params.temperature, params.top_p, params.top_k) == (1, 0.7, 0.95, -1)
    assert params.stop_token_ids == [2, 7] and params.include_stop_str_in_output
    assert (params.max_tokens, params.seed, params.logprobs, params.detokenize) == (12, 5, 4, False)
    greedy = sampling_kwargs(RolloutConfig(temperature=0.0), max_tokens=3, seed=0, eos_token_ids=[])
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == 1 and greedy["logprobs"] == 0
    with pytest.raises(ValueError, match="max_tokens"):
        sampling_kwargs(config, max_tokens=0, seed=0, eos_token_ids=[])


def test_stage_rows_cut_contiguous_blocks():
    rows = list(range(10))
    blocks = [stage_rows(rows, s, 3) for s in range(3)]
    assert blocks == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [stage_rows(range(1), s, 2) for s in range(2)] == [[0], []]


def test_unpack_completion_ranks_top_k_and_keeps_the_sampled_log_prob():
    lp = fake_vllm.Logprob
    output = fake_vllm.CompletionOutput(
        index=0, text="", token_ids=[9, 4], cumulative_logprob=None,
        logprobs=[
            {3: lp(-0.5, 1), 8: lp(-1.0, 2), 9: lp(-4.0, 7)},  # sampled id 9 is outside top 2
            {4: lp(-0.2, 1), 1: lp(-2.0, 2)},
        ],
    )  # fmt: skip
    done = unpack_completion(output, num_logprobs=2, max_tokens=2)
    assert done.token_ids == [9, 4] and done.log_probs == [-4.0, -0.2]
    assert done.topk_ids.tolist() == [[3, 8], [4, 1]]
    assert not done.stopped
    # k = 0 (no listener): an empty [len, 0] top-k, the case that crashed with view(-1, 0).
    plain = fake_vllm.CompletionOutput(0, "", [9, 4], None, [{9: lp(-4.0, 7)}, {4: lp(-0.2, 1)}])
    done = unpack_completion(plain, num_logprobs=0, max_tokens=5)
    assert done.topk_ids.shape == (2, 0) and done.stopped
    empty = fake_vllm.CompletionOutput(0, "", [], None, [])
    assert unpack_completion(empty, num_logprobs=0, max_tokens=5).topk_ids.shape == (0, 0)


def test_process_env_puts_each_rank_on_its_own_gpu():
    from megatron_opd.distributed import LaunchEnv
    from megatron_opd.rollout.vllm_engine import vllm_process_env

    groups = SimpleNamespace(
        platform=Platform(device=torch.device("cuda", 3), backend="nccl"), rank=11, world_size=16
    )
    launch = LaunchEnv(rank=11, world_size=16, local_rank=3, master_addr="n7", master_port=29511)
    assert vllm_process_env(groups, launch) == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RANK": "11", "WORLD_SIZE": "16",
        "LOCAL_RANK": "3", "MASTER_ADDR": "n7", "MASTER_PORT": "29511",
    }  # fmt: skip


def test_vllm_config_errors_name_the_field():
    for kwargs, name in (
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"sleep_level": 3}, "sleep_level"),
        ({"max_model_len": -1}, "max_model_len"),
    ):
        with pytest.raises(ValueError, match=f"rollout.vllm.{name}"):
            VLLMConfig(**kwargs)


def test_engine_refuses_without_cuda_and_vllm():
    from megatron_opd.rollout.vllm_engine import VLLMRolloutEngine

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the refusal path is for CPU machines")
    with pytest.raises(ValueError, match="rollout.engine='vllm' needs a CUDA GPU"):
        VLLMRolloutEngine(
            None, RolloutConfig(engine="vllm"), hf_model_dir="x", hf_weights=list,
            eos_token_ids=[2], pad_id=0, max_model_len=64,
        )  # fmt: skip


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_run")
    return root, make_tiny_run(root)


class _Listener:
    """Records every chunk; stops row 1 after its first chunk."""

    student_top_k = 3

    def __init__(self):
        self.prompts, self.chunks = None, []

    def start(self, prompts):
        self.prompts = prompts

    def on_chunk(self, chunk):
        self.chunks.append(chunk)
        return chunk.sample_index == 1


def _engine_session(overrides, tp, pp, sleep_level):
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig
    from megatron_opd.conversion import load_model_weights
    from megatron_opd.conversion.export import broadcast_hf_weights
    from megatron_opd.distributed import init_distributed
    from megatron_opd.models import build_model
    from megatron_opd.models.hf_config import find_hf_config_dir
    from megatron_opd.rollout import vllm_engine

    fake = fake_vllm.install()
    vllm_engine.cuda_available = lambda: True
    vllm_engine.has_module = lambda name: name == "vllm"
    layout = [f"parallel.tensor_parallel_size={tp}", f"parallel.pipeline_parallel_size={pp}"]
    config = build_config(
        OPDConfig,
        merge_overrides({}, [*overrides, *layout, "rollout.engine=vllm",
                             f"rollout.vllm.sleep_level={sleep_level}",
                             "rollout.vllm.gpu_memory_utilization=0.3",
                             f"rollout.n_samples_per_prompt={N}", "rollout.chunk_size=4"]),
    )  # fmt: skip
    groups = init_distributed(config.parallel, seed=0)
    chunks, info = build_model(config.student, groups, role="student")
    load_model_weights(chunks, config.student, info, groups)
    engine = vllm_engine.VLLMRolloutEngine(
        groups, config.rollout,
        hf_model_dir=str(find_hf_config_dir(config.student.path)),
        hf_weights=lambda: broadcast_hf_weights(chunks, info, groups),
        eos_token_ids=[2], pad_id=0, max_model_len=40,
    )  # fmt: skip
    llm = fake.INSTANCES[0]
    after_init = list(fake.EVENTS)
    fake.EVENTS.clear()
    engine.sync_weights()
    after_sync = list(fake.EVENTS)
    fake.EVENTS.clear()
    first = engine.generate(PROMPTS, max_new_tokens=12, seed=99)
    after_generate = list(fake.EVENTS)
    fake.EVENTS.clear()
    again = engine.generate(PROMPTS, max_new_tokens=12, seed=99)  # no sync in between
    after_second = list(fake.EVENTS)
    listener = _Listener()
    chunked = engine.generate(PROMPTS, max_new_tokens=12, seed=5, chunk_listener=listener)
    return {
        "kwargs": llm.kwargs,
        "local_rank": llm.local_rank,
        "weights": llm.model.weights,
        "events": (after_init, after_sync, after_generate, after_second),
        "first": (first.tokens, first.prompt_lengths, first.response_lengths,
                  first.sampled_log_probs, first.prompt_index),
        "again": again.tokens,
        "chunked": (chunked.tokens, chunked.response_lengths),
        "chunks": [(c.sample_index.tolist(), c.start, c.tokens, c.lengths.tolist(),
                    c.finished.tolist(), c.student_topk_ids) for c in listener.chunks],
        "listener_rows": listener.prompts.sample_index.tolist(),
    }  # fmt: skip


@pytest.fixture(scope="module")
def sessions(tiny_run):
    _, overrides = tiny_run
    single = run_distributed(_engine_session, 1, overrides, 1, 1, 2, timeout_s=240)
    level1 = run_distributed(_engine_session, 1, overrides, 1, 1, 1, timeout_s=240)
    tp2 = run_distributed(_engine_session, 2, overrides, 2, 1, 2, timeout_s=240)
    pp2 = run_distributed(_engine_session, 2, overrides, 1, 2, 2, timeout_s=240)
    return {"single": single, "level1": level1, "tp2": tp2, "pp2": pp2}


def test_every_rank_creates_an_external_launcher_llm_with_the_config(sessions):
    for name, tp in (("single", 1), ("tp2", 2), ("pp2", 1)):
        for out in sessions[name]:
            kw = out["kwargs"]
            assert kw["distributed_executor_backend"] == "external_launcher"
            assert kw["tensor_parallel_size"] == tp
            assert (kw["gpu_memory_utilization"], kw["max_model_len"]) == (0.3, 40)
            assert kw["enable_sleep_mode"] and kw["load_format"] == "dummy"
            assert kw["logprobs_mode"] == "raw_logprobs"
            assert out["local_rank"] == 0  # CPU: the platform device has no index


def test_pushed_weights_equal_the_students_hf_checkpoint_on_every_rank(sessions, tiny_run):
    from safetensors.torch import load_file

    root, _ = tiny_run
    reference = load_file(root / "student" / "model.safetensors")
    for name in ("single", "tp2", "pp2"):
        for out in sessions[name]:
            assert sorted(out["weights"]) == sorted(reference)
            for key, tensor in reference.items():
                assert torch.equal(out["weights"][key], tensor.float()), (name, key)


def test_sleep_and_wake_follow_vllms_bookkeeping(sessions):
    after_init, after_sync, after_generate, after_second = sessions["single"][0]["events"]
    assert after_init == [("init",), ("sleep", 2)]
    assert after_sync[0] == ("wake_up", ("weights",))
    assert all(e[0] == "load_weights" for e in after_sync[1:])
    assert after_generate == [
        ("wake_up", ("kv_cache",)), ("reset_prefix_cache",), ("generate", len(PROMPTS) * N),
        ("sleep", 2),
    ]  # fmt: skip
    # Level 2 discarded the weights: the next rollout pushes them again before sampling.
    assert after_second[0] == ("wake_up", ("weights",))
    assert after_second[-3:] == [("reset_prefix_cache",), ("generate", len(PROMPTS) * N),
                                 ("sleep", 2)]  # fmt: skip
    # Level 1 keeps a CPU copy: no new push, both tags woken.
    level1 = sessions["level1"][0]["events"][3]
    assert [e[0] for e in level1] == ["wake_up", "wake_up", "generate", "sleep"]
    assert {e[1] for e in level1 if e[0] == "wake_up"} == {("weights",), ("kv_cache",)}


def test_samples_of_a_prompt_differ_and_repeat_with_the_seed(sessions):
    tokens, prompt_lengths, response_lengths, log_probs, prompt_index = sessions["single"][0][
        "first"
    ]
    assert prompt_index.tolist() == [i for i in range(len(PROMPTS)) for _ in range(N)]
    for i, prompt in enumerate(PROMPTS):
        rows = range(i * N, (i + 1) * N)
        assert all(tokens[r, : len(prompt)].tolist() == prompt for r in rows)
        responses = {
            tuple(tokens[r, len(prompt) : len(prompt) + response_lengths[r]].tolist()) for r in rows
        }
        assert len(responses) == N, responses  # n distinct samples, not n copies
    assert torch.equal(sessions["single"][0]["again"], tokens)  # same seed, same rollout
    assert (response_lengths <= 12).all() and (response_lengths > 0).all()
    valid = torch.zeros_like(log_probs, dtype=torch.bool)
    for r in range(len(tokens)):
        valid[r, prompt_lengths[r] : prompt_lengths[r] + response_lengths[r]] = True
    assert (log_probs[valid] < 0).all() and (log_probs[~valid] == 0).all()


def test_rollouts_are_the_same_under_tp2_and_pp2(sessions):
    reference = sessions["single"][0]
    for name in ("tp2", "pp2"):
        for out in sessions[name]:
            for got, expected in zip(out["first"], reference["first"]):
                assert torch.equal(got, expected), name
            for got, expected in zip(out["chunked"], reference["chunked"]):
                assert torch.equal(got, expected), name


def test_chunked_rounds_feed_the_listener_and_stop_rows(sessions):
    out = sessions["single"][0]
    tokens, response_lengths = out["chunked"]
    assert out["listener_rows"] == list(range(len(PROMPTS) * N))
    first_chunk = out["chunks"][0]
    assert first_chunk[0] == list(range(len(PROMPTS) * N)) and first_chunk[1] == 0
    assert first_chunk[5].shape == (len(PROMPTS) * N, 4, _Listener.student_top_k)
    assert all(1 not in chunk[0] for chunk in out["chunks"][1:])  # row 1 stopped
    assert response_lengths[1] <= 4
    # The chunks, put end to end, are each row's response; starts advance by chunk_size.
    pieces = {r: [] for r in range(len(PROMPTS) * N)}
    for rows, start, chunk_tokens, lengths, finished, _ in out["chunks"]:
        assert start % 4 == 0
        for j, row in enumerate(rows):
            pieces[row].extend(chunk_tokens[j, : lengths[j]].tolist())
            if finished[j]:
                assert (
                    lengths[j] < 4
                    or start + lengths[j] == 12
                    or chunk_tokens[j, lengths[j] - 1] == 2
                )
    prompt_lengths = [len(p) for p in PROMPTS for _ in range(N)]
    for row, piece in pieces.items():
        start = prompt_lengths[row]
        assert tokens[row, start : start + response_lengths[row]].tolist() == piece
