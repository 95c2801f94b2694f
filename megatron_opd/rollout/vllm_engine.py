"""vLLM rollouts (GPU only): the RolloutEngine protocol on vLLM's offline ``LLM`` API.

Placement (the colocated pattern of verl's and TRL's vLLM rollouts): **every rank**
creates one ``vllm.LLM`` with ``distributed_executor_backend="external_launcher"`` and
``tensor_parallel_size`` = Megatron's TP size. vLLM then runs its worker inside this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which that executor requires), on this
rank's own GPU (``LOCAL_RANK`` = the Megatron device index), and builds its TP groups
from the already initialised default process group: consecutive ranks, i.e. exactly
Megatron's TP groups (checked at start-up). Creating the LLM is therefore a collective
over all ranks; no rank can skip it. The TP ranks of one vLLM instance must be fed
identical requests: they are (same prompts, same per-request seeds).

With Megatron PP > 1 every stage's TP group holds a whole vLLM instance (vLLM's own
pipeline groups would not match Megatron's rank order once DP > 1); the call's rows are
split into one contiguous block per stage and the results all-gathered over the
pipeline group, so every rank returns the same RolloutBatch.

Memory: vLLM shares the GPU with Megatron through sleep mode. The engine keeps vLLM's
sleeping tags in step with vLLM's own bookkeeping (``Executor.sleep`` is a no-op while
any tag still sleeps, ``wake_up`` of a tag that is awake is refused):

- start-up: ``sleep(level)``: nothing of vLLM stays on the GPU;
- :meth:`sync_weights`: ``wake_up(tags=["weights"])``, then every HF tensor is loaded in
  place through the model's ``load_weights`` (``collective_rpc`` with a function, in
  process: no pickling, no CUDA tensors across processes); the KV cache stays asleep;
- :meth:`generate`: wakes what still sleeps (``kv_cache``, and ``weights`` after a level
  1 sleep without a sync), resets the prefix cache when the weights changed, samples,
  then ``sleep(level)`` again. After a level-2 sleep the weights are gone; a rollout
  that follows without a sync (an update was skipped) pushes them first.

Weights: ``hf_weights()`` is :func:`~megatron_opd.conversion.export.broadcast_hf_weights`:
every full HF tensor reaches every rank one at a time (TP all-gather, PP broadcast).

Log-probs: ``logprobs_mode="raw_logprobs"`` (log-softmax of the raw logits: temperature
1, before top-p), the behaviour-policy definition of the Megatron engine. Chunked
online stop: vLLM cannot call back in the middle of a request, so chunk mode runs rounds
of at most ``chunk_size`` new tokens, resubmitting each running row as ``prompt +
response so far`` (the prefix cache keeps its KV blocks), and asks the listener between
rounds; the student's top-K ids come from vLLM's per-token top-K log-probs.

On a machine without CUDA or without the ``vllm`` package the constructor refuses with a
ValueError naming ``rollout.engine``. Request building and result handling live in
:mod:`megatron_opd.rollout.vllm_requests`; both are tested on CPU against a fake
``vllm`` package (:mod:`megatron_opd.testing.fake_vllm`). Not yet run on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.distributed import LaunchEnv, ParallelGroups, read_launch_env
from megatron_opd.platform import cuda_available, has_module
from megatron_opd.rollout.batch import RolloutBatch
from megatron_opd.rollout.engine import (
    ChunkListener,
    GenerationChunk,
    PromptBlock,
    right_padded_batch,
)
from megatron_opd.rollout.vllm_requests import (
    Completion,
    request_seed,
    sampling_kwargs,
    stage_rows,
    unpack_completion,
)

SLEEP_TAGS = ("weights", "kv_cache")


def check_vllm_available(config: RolloutConfig) -> None:
    """ValueError unless CUDA and the vllm package are present."""
    missing = []
    if not cuda_available():
        missing.append("a CUDA GPU")
    if not has_module("vllm"):
        missing.append("the vllm package (pip install vllm)")
    if missing:
        raise ValueError(
            f"rollout.engine={config.engine!r} needs {' and '.join(missing)}; "
            "set rollout.engine=megatron to sample with the Megatron-native engine"
        )


def vllm_process_env(groups: ParallelGroups, launch: LaunchEnv) -> dict[str, str]:
    """Environment vLLM's ``external_launcher`` executor reads in this process: the
    in-process engine switch, this rank, and the GPU Megatron uses on it."""
    device = groups.platform.device
    local_rank = device.index if device.type == "cuda" and device.index is not None else 0
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "RANK": str(groups.rank),
        "WORLD_SIZE": str(groups.world_size),
        "LOCAL_RANK": str(local_rank),
        "MASTER_ADDR": launch.master_addr,
        "MASTER_PORT": str(launch.master_port),
    }


def check_tp_groups_are_consecutive(groups: ParallelGroups) -> None:
    """ValueError unless this rank's Megatron TP group is a block of consecutive ranks,
    the layout vLLM derives for its own TP groups from the world group."""
    ranks = list(dist.get_process_group_ranks(groups.tp_group)) if groups.tp_size > 1 else []
    first = groups.rank - groups.tp_rank
    if ranks and ranks != list(range(first, first + groups.tp_size)):
        raise ValueError(
            f"rollout.engine=vllm needs consecutive ranks in each tensor-parallel group (vLLM "
            f"builds its TP groups that way), got {ranks}; keep Megatron's default rank order"
        )


def load_weights_on_worker(worker, weights) -> int:
    """Runs in vLLM's worker (``collective_rpc`` passes the worker first): copy HF-named
    tensors into the model in place; returns how many were given."""
    weights = list(weights)
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


class VLLMRolloutEngine:
    """Sampling with a colocated vLLM on every rank, weights pushed from the student."""

    def __init__(
        self,
        groups: ParallelGroups,
        config: RolloutConfig,
        *,
        hf_model_dir: str,
        hf_weights: Callable[[], Iterable[tuple[str, torch.Tensor]]],
        eos_token_ids: Sequence[int],
        pad_id: int,
        dtype: str = "bfloat16",
        max_model_len: int,
        max_logprobs: int = 20,
        launch_env: LaunchEnv | None = None,
    ) -> None:
        """
        Args:
            groups: this rank's groups (every rank hosts a vLLM TP shard).
            config: the ``rollout`` section (engine must be ``vllm``; ``config.vllm``
                holds the memory fraction, sleep level, eager mode).
            hf_model_dir: HF directory of the student's config and tokenizer (vLLM starts
                with dummy weights; the first rollout pushes the student's).
            hf_weights: every ``(hf_name, full tensor)`` of the student, a collective
                over the replica called on every rank.
            eos_token_ids: ids that end a response.
            pad_id: id right of every sequence in the RolloutBatch.
            dtype: vLLM's compute dtype (the student's).
            max_model_len: longest prompt + response a request may have.
            max_logprobs: most top log-probs a request may ask for (the online stop asks
                for ``prune.top_k``).
            launch_env: rendezvous of this process (default: read from the environment).
        """
        if config.engine != "vllm":
            raise ValueError(
                f"VLLMRolloutEngine needs rollout.engine='vllm', got {config.engine!r}"
            )
        check_vllm_available(config)
        check_tp_groups_are_consecutive(groups)
        if max_model_len < 2:
            raise ValueError(f"rollout.vllm.max_model_len must be >= 2, got {max_model_len}")
        self.groups = groups
        self.config = config
        self.hf_weights = hf_weights
        self.eos_token_ids = sorted({int(i) for i in eos_token_ids})
        self.pad_id = int(pad_id)
        self.max_model_len = int(max_model_len)
        self.device = groups.platform.device
        os.environ.update(vllm_process_env(groups, launch_env or read_launch_env()))
        from vllm import LLM

        options = config.vllm
        extra = {"max_num_seqs": options.max_num_seqs} if options.max_num_seqs else {}
        self.llm = LLM(
            model=hf_model_dir,
            tensor_parallel_size=groups.tp_size,
            distributed_executor_backend="external_launcher",
            dtype=dtype,
            load_format="dummy",
            skip_tokenizer_init=True,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            enable_prefix_caching=True,
            enable_sleep_mode=True,
            enforce_eager=options.enforce_eager,
            logprobs_mode="raw_logprobs",
            max_logprobs=max_logprobs,
            seed=config.seed,
            **extra,
        )
        self.sleeping: set[str] = set()
        self.weights_current = False
        self.prefix_cache_stale = False
        self._sleep()

    # ----------------------------------------------------------------- residency
    def _sleep(self) -> None:
        self.llm.sleep(level=self.config.vllm.sleep_level)
        self.sleeping = set(SLEEP_TAGS)
        if self.config.vllm.sleep_level == 2:
            self.weights_current = False  # level 2 discards the weights

    def _wake(self, tag: str) -> None:
        if tag in self.sleeping:
            self.llm.wake_up(tags=[tag])
            self.sleeping.discard(tag)

    def sync_weights(self) -> None:
        """Push the student's current weights into vLLM (collective over the replica)."""
        self._wake("weights")
        loaded = 0
        for name, tensor in self.hf_weights():
            loaded += self.llm.collective_rpc(load_weights_on_worker, args=([(name, tensor)],))[0]
        if loaded == 0:
            raise ValueError("hf_weights() yielded no tensors; nothing was loaded into vLLM")
        self.weights_current = True
        self.prefix_cache_stale = True

    def _wake_for_generation(self) -> None:
        if not self.weights_current:
            self.sync_weights()
        self._wake("weights")
        self._wake("kv_cache")
        if self.prefix_cache_stale:
            self.llm.reset_prefix_cache()  # cached blocks were computed by older weights
            self.prefix_cache_stale = False

    # ----------------------------------------------------------------- sampling
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        seed: int,
        chunk_listener: ChunkListener | None = None,
    ) -> RolloutBatch:
        """Sample ``n_samples_per_prompt`` responses per prompt (see RolloutEngine)."""
        if chunk_listener is not None and self.config.chunk_size == 0:
            raise ValueError(
                "a chunk_listener was passed but rollout.chunk_size is 0; set "
                "rollout.chunk_size > 0 to generate in chunks"
            )
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token id lists")
        n = self.config.n_samples_per_prompt
        rows = [list(map(int, p)) for p in prompts for _ in range(n)]
        num_new = min(int(max_new_tokens), self.config.max_new_tokens)
        longest = max(len(r) for r in rows)
        if longest + num_new > self.max_model_len:
            raise ValueError(
                f"longest prompt ({longest}) + max_new_tokens ({num_new}) exceeds "
                f"rollout.vllm.max_model_len ({self.max_model_len}); raise it or lower "
                "data.max_prompt_length / rollout.max_new_tokens"
            )
        self._wake_for_generation()
        try:
            if chunk_listener is None:
                results = self._sample(rows, list(range(len(rows))), num_new, seed, 0, 0)
                responses = [torch.tensor(r.token_ids, dtype=torch.long) for r in results]
                log_probs = [torch.tensor(r.log_probs, dtype=torch.float32) for r in results]
            else:
                responses, log_probs = self._sample_chunked(rows, num_new, seed, chunk_listener)
        finally:
            self._sleep()
        prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
        return right_padded_batch(
            rows, responses, log_probs, prompt_index, pad_id=self.pad_id, device=self.device
        )

    def _sample(self, inputs, row_ids, max_tokens, seed, start, top_k) -> list[Completion]:
        """Generate ``max_tokens`` for ``inputs[j]`` (row ``row_ids[j]``): this stage's
        block with vLLM, all-gathered over the pipeline; results in ``row_ids`` order."""
        from vllm import SamplingParams

        groups = self.groups
        mine = stage_rows(range(len(row_ids)), groups.pp_rank, groups.pp_size)
        requests = [{"prompt_token_ids": inputs[j]} for j in mine]
        params = [
            SamplingParams(
                **sampling_kwargs(
                    self.config, max_tokens=max_tokens, eos_token_ids=self.eos_token_ids,
                    seed=request_seed(seed, row_ids[j], start), num_logprobs=top_k,
                )
            )
            for j in mine
        ]  # fmt: skip
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        local = [unpack_completion(out.outputs[0], top_k, max_tokens) for out in outputs]
        if groups.pp_size == 1:
            return local
        gathered: list = [None] * groups.pp_size
        dist.all_gather_object(gathered, local, group=groups.pp_group)
        return [completion for stage in gathered for completion in stage]

    def _sample_chunked(self, rows, num_new, seed, listener):
        device, pad, chunk_size = self.device, self.pad_id, self.config.chunk_size
        top_k = int(listener.student_top_k)
        m = len(rows)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        width = int(lengths.max())
        padded = torch.full((m, width), pad, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            padded[i, width - len(r) :] = torch.tensor(r, device=device)
        sample_index = torch.arange(m, device=device)
        listener.start(
            PromptBlock(
                sample_index=sample_index, prompt_tokens=padded, prompt_lengths=lengths,
                num_samples=m, max_new_tokens=num_new,
            )
        )  # fmt: skip
        responses: list[list[int]] = [[] for _ in rows]
        log_probs: list[list[float]] = [[] for _ in rows]
        running, start = list(range(m)), 0
        while running and start < num_new:
            c = min(chunk_size, num_new - start)
            inputs = [rows[i] + responses[i] for i in running]
            results = self._sample(inputs, running, c, seed, start, top_k)
            eos = set(self.eos_token_ids)
            tokens = torch.full((len(running), c), pad, dtype=torch.long)
            topk_ids = torch.zeros(len(running), c, top_k, dtype=torch.long)
            finished = []
            for j, (i, result) in enumerate(zip(running, results)):
                responses[i].extend(result.token_ids)
                log_probs[i].extend(result.log_probs)
                count = len(result.token_ids)
                tokens[j, :count] = torch.tensor(result.token_ids, dtype=torch.long)
                topk_ids[j, :count] = result.topk_ids
                ended_at_eos = count > 0 and result.token_ids[-1] in eos
                finished.append(ended_at_eos or result.stopped or start + count >= num_new)
            chunk = GenerationChunk(
                sample_index=sample_index[running],
                start=start,
                tokens=tokens.to(device),
                lengths=torch.tensor([len(r.token_ids) for r in results], device=device),
                finished=torch.tensor(finished, device=device),
                student_topk_ids=topk_ids.to(device) if top_k else None,
            )
            stop = listener.on_chunk(chunk).tolist()
            running = [i for j, i in enumerate(running) if not (finished[j] or stop[j])]
            start += c
        return (
            [torch.tensor(r, dtype=torch.long) for r in responses],
            [torch.tensor(lp, dtype=torch.float32) for lp in log_probs],
        )
