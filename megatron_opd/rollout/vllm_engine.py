"""vLLM rollouts (GPU only): the RolloutEngine protocol on vLLM's offline ``LLM`` API.

Placement: one in-process ``vllm.LLM`` (its own tensor_parallel_size 1) per model replica,
on the replica's first rank (TP rank 0 of the first pipeline stage), sharing that GPU with
Megatron through vLLM's sleep mode: ``sleep()`` after a rollout frees its KV cache and
weights for training, ``wake_up()`` before the next one. The sampled tokens are then
broadcast over the TP group and the pipeline group so every rank of the replica holds the
same RolloutBatch.

Weights: :meth:`VLLMRolloutEngine.sync_weights` pushes the student's current weights in
Hugging Face names (from the injected ``hf_weights`` callable, e.g. the conversion
module's exporter, which gathers TP/PP shards) into vLLM's model with
``collective_rpc(load_weights)``. Call it after every optimizer step.

Log-probs: vLLM runs with ``logprobs_mode="raw_logprobs"``, i.e. log-softmax of the raw
logits (temperature 1, before top-p), the same behaviour-policy definition as the
Megatron engine. vLLM computes them in its own precision; the scoring pass recomputes the
student's log-probs with Megatron (``student_sampled_log_probs``).

Chunked online stop: vLLM cannot call back in the middle of a request, so chunk mode
runs rounds of at most ``chunk_size`` new tokens, resubmitting each running row as
``prompt + response so far`` (vLLM's prefix cache keeps the prefix's KV blocks, so a
round costs only its new tokens), and asks the listener between rounds. The student's
top-K ids for the listener come from vLLM's per-token top-``k`` log-probs (raw logits).

On a machine without CUDA or without the ``vllm`` package the constructor refuses with a
ValueError naming ``rollout.engine``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_opd.config.rollout import RolloutConfig
from megatron_opd.distributed import ParallelGroups
from megatron_opd.platform import cuda_available, has_module
from megatron_opd.rollout.batch import RolloutBatch
from megatron_opd.rollout.engine import (
    ChunkListener,
    GenerationChunk,
    PromptBlock,
    right_padded_batch,
)


def vllm_sampling_kwargs(
    config: RolloutConfig,
    *,
    max_new_tokens: int,
    seed: int,
    eos_token_ids: Sequence[int],
    num_logprobs: int = 0,
    n: int | None = None,
) -> dict:
    """Keyword arguments of ``vllm.SamplingParams`` equivalent to the Megatron engine.

    Greedy (temperature 0) maps to vLLM's temperature 0. EOS ids become
    ``stop_token_ids`` and stay in the output (as the Megatron engine keeps them);
    ``ignore_eos`` is off and no detokenisation happens. ``num_logprobs`` is the number of
    top log-probs returned per token (the sampled token's is always included).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return dict(
        n=config.n_samples_per_prompt if n is None else n,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=-1 if config.temperature > 0 else 1,
        max_tokens=min(max_new_tokens, config.max_new_tokens),
        seed=int(seed) % (2**31 - 1),
        stop_token_ids=sorted(set(int(i) for i in eos_token_ids)),
        include_stop_str_in_output=True,
        skip_special_tokens=False,
        detokenize=False,
        logprobs=num_logprobs,
    )


def check_vllm_available(config: RolloutConfig) -> None:
    """ValueError unless CUDA and the vllm package are present."""
    missing = []
    if not cuda_available():
        missing.append("a CUDA GPU")
    if not has_module("vllm"):
        missing.append("the vllm package (pip install megatron-opd[gpu])")
    if missing:
        raise ValueError(
            f"rollout.engine={config.engine!r} needs {' and '.join(missing)}; "
            "set rollout.engine=megatron to sample with the Megatron-native engine"
        )


def _load_weights_on_worker(worker, weights) -> None:
    # Runs inside vLLM's worker (collective_rpc passes the worker as the first argument).
    worker.model_runner.model.load_weights(weights=weights)


class VLLMRolloutEngine:
    """Sampling with vLLM, weights pushed from the Megatron student."""

    def __init__(
        self,
        student: torch.nn.Module | None,
        groups: ParallelGroups,
        config: RolloutConfig,
        *,
        tokenizer=None,
        hf_model_dir: str | None = None,
        hf_weights: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
        eos_token_ids: Sequence[int] | None = None,
        pad_id: int | None = None,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.4,
        max_model_len: int | None = None,
    ) -> None:
        """
        Args:
            student: this stage's student GPTModel (kept for reference; the weights
                travel through ``hf_weights``).
            groups: this rank's groups (the LLM lives on the replica's first rank).
            config: the ``rollout`` section (engine must be ``vllm``).
            tokenizer: supplies ``eos_id`` / ``pad_id`` when those are not given.
            hf_model_dir: HF directory of the student (config + tokenizer; its weights
                are replaced by :meth:`sync_weights` before the first rollout).
            hf_weights: returns the student's current ``(hf_name, tensor)`` pairs; called
                on every rank (a collective), only the first rank's pairs are used.
            eos_token_ids: ids that end a response.
            pad_id: id right of every sequence in the RolloutBatch.
            dtype, gpu_memory_utilization, max_model_len: passed to ``vllm.LLM``.
        """
        if config.engine != "vllm":
            raise ValueError(
                f"VLLMRolloutEngine needs rollout.engine='vllm', got {config.engine!r}"
            )
        check_vllm_available(config)
        self.groups = groups
        self.config = config
        if hf_model_dir is None or hf_weights is None:
            raise ValueError(
                "rollout.engine='vllm' needs the student's HF directory (hf_model_dir) and a "
                "weight exporter (hf_weights) to push Megatron weights into vLLM"
            )
        if eos_token_ids is None:
            eos_token_ids = [tokenizer.eos_id] if tokenizer is not None else []
        if pad_id is None:
            pad_id = tokenizer.pad_id if tokenizer is not None else 0
        self.student = student
        self.hf_weights = hf_weights
        self.eos_token_ids = list(eos_token_ids)
        self.pad_id = int(pad_id)
        self.device = groups.platform.device
        self.owner = groups.tp_rank == 0 and groups.is_first_stage
        self.llm = None
        if self.owner:
            from vllm import LLM

            self.llm = LLM(
                model=hf_model_dir,
                tensor_parallel_size=1,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                enable_prefix_caching=True,
                enable_sleep_mode=True,
                logprobs_mode="raw_logprobs",
                seed=config.seed,
            )
            self.llm.sleep(level=1)

    def sync_weights(self) -> None:
        """Push the student's current weights into vLLM (collective over the replica)."""
        weights = list(self.hf_weights())
        if self.owner:
            self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
            self.llm.sleep(level=1)

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
            raise ValueError("a chunk_listener needs rollout.chunk_size > 0")
        n = self.config.n_samples_per_prompt
        rows = [list(map(int, p)) for p in prompts for _ in range(n)]
        num_new = min(max_new_tokens, self.config.max_new_tokens)
        top_k = int(chunk_listener.student_top_k) if chunk_listener is not None else 0
        if self.owner:
            self.llm.wake_up()
        try:
            if chunk_listener is None:
                responses, log_probs = self._sample(rows, num_new, seed, 0)[:2]
            else:
                responses, log_probs = self._sample_chunked(
                    rows, num_new, seed, top_k, chunk_listener
                )
        finally:
            if self.owner:
                self.llm.sleep(level=1)
        prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
        return right_padded_batch(
            rows, responses, log_probs, prompt_index, pad_id=self.pad_id, device=self.device
        )

    def _sample(self, rows, num_new, seed, top_k):
        """One vLLM call (owner) broadcast to the replica: per row ids, log-probs, top-K."""
        if self.owner:
            from vllm import SamplingParams
            from vllm.inputs import TokensPrompt

            params = SamplingParams(
                **vllm_sampling_kwargs(
                    self.config, max_new_tokens=num_new, seed=seed,
                    eos_token_ids=self.eos_token_ids, num_logprobs=top_k, n=1,
                )
            )  # fmt: skip
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False
            )
            packed = [self._unpack(out.outputs[0], top_k) for out in outputs]
        else:
            packed = None
        packed = self._broadcast_object(packed)
        return (
            [torch.tensor(p[0], dtype=torch.long) for p in packed],
            [torch.tensor(p[1], dtype=torch.float32) for p in packed],
            [torch.tensor(p[2], dtype=torch.long).view(-1, top_k) for p in packed],
        )

    @staticmethod
    def _unpack(completion, top_k):
        ids = list(completion.token_ids)
        log_probs, topk = [], []
        for token, candidates in zip(ids, completion.logprobs or [{}] * len(ids)):
            log_probs.append(float(candidates[token].logprob) if token in candidates else 0.0)
            ranked = sorted(candidates.items(), key=lambda kv: (-kv[1].logprob, kv[0]))
            topk.extend(t for t, _ in ranked[:top_k])
        return ids, log_probs, topk

    def _sample_chunked(self, rows, num_new, seed, top_k, listener):
        device = self.device
        m = len(rows)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        width = int(lengths.max())
        padded = torch.full((m, width), self.pad_id, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            padded[i, width - len(r) :] = torch.tensor(r, device=device)
        sample_index = torch.arange(m, device=device)
        listener.start(
            PromptBlock(
                sample_index=sample_index, prompt_tokens=padded, prompt_lengths=lengths,
                num_samples=m, max_new_tokens=num_new,
            )
        )  # fmt: skip
        responses = [torch.zeros(0, dtype=torch.long) for _ in rows]
        log_probs = [torch.zeros(0) for _ in rows]
        running = list(range(m))
        start = 0
        while running and start < num_new:
            c = min(self.config.chunk_size, num_new - start)
            ids, lps, topks = self._sample(
                [rows[i] + responses[i].tolist() for i in running], c, seed + start, top_k
            )
            eos = set(self.eos_token_ids)
            finished = []
            for j, i in enumerate(running):
                responses[i] = torch.cat([responses[i], ids[j]])
                log_probs[i] = torch.cat([log_probs[i], lps[j]])
                ended = start + ids[j].numel() >= num_new or (
                    ids[j].numel() > 0 and int(ids[j][-1]) in eos
                )
                finished.append(ended)
            tokens = torch.full((len(running), c), self.pad_id, dtype=torch.long)
            topk_ids = torch.zeros(len(running), c, top_k, dtype=torch.long)
            for j in range(len(running)):
                tokens[j, : ids[j].numel()] = ids[j]
                topk_ids[j, : ids[j].numel()] = topks[j]
            chunk = GenerationChunk(
                sample_index=sample_index[running],
                start=start,
                tokens=tokens.to(device),
                lengths=torch.tensor([x.numel() for x in ids], device=device),
                finished=torch.tensor(finished, device=device),
                student_topk_ids=topk_ids.to(device) if top_k else None,
            )
            stop = listener.on_chunk(chunk).tolist()
            running = [i for j, i in enumerate(running) if not (finished[j] or stop[j])]
            start += c
        return responses, log_probs

    def _broadcast_object(self, value):
        """The owner's Python object on every rank of the replica (TP, then PP)."""
        box = [value]
        groups = self.groups
        if groups.tp_size > 1 and groups.is_first_stage:
            src = dist.get_global_rank(groups.tp_group, 0)
            dist.broadcast_object_list(box, src=src, group=groups.tp_group)
        if groups.pp_size > 1:
            src = groups.first_stage_global_rank
            dist.broadcast_object_list(box, src=src, group=groups.pp_group)
        return box[0]
