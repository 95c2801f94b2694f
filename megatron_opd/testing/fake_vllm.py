"""A stand-in for the ``vllm`` package, for CPU tests of the vLLM rollout engine.

It follows vLLM's documented offline API (``vllm.LLM``, ``SamplingParams``,
``RequestOutput`` / ``CompletionOutput`` / ``Logprob``) and the behaviour the engine
depends on, written from vLLM's sources and docs, not from the engine:

- ``LLM(..., distributed_executor_backend="external_launcher")`` runs its one worker in
  this process: it asserts ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and reads ``RANK`` and
  ``LOCAL_RANK`` from the environment (``ExecutorWithExternalLauncher``); unknown
  keyword arguments are refused (``EngineArgs``).
- Sleep mode keeps the executor's bookkeeping: ``sleep`` while any tag still sleeps is a
  no-op (vLLM logs "Executor is already sleeping"), ``wake_up`` of a tag that is not
  asleep is refused the same way, the engine is awake only when no tag sleeps; level 2
  discards the weights. Loading weights while they sleep, or generating while anything
  sleeps or with discarded weights, raises here (on a GPU it would crash or return
  garbage).
- ``collective_rpc(callable, args=...)`` calls ``callable(worker, *args)`` in process
  and returns one result per worker (one here); ``worker.model_runner.model.load_weights``
  accepts HF checkpoint names only, with the shapes the model's ``config.json`` implies
  (the table below is written from the HF model definitions).
- ``generate(prompts, sampling_params)`` takes ``{"prompt_token_ids": [...]}`` prompts and
  one ``SamplingParams`` or a list of them; each request with a seed draws from its own
  generator; ``stop_token_ids`` end a request and stay in the output; ``logprobs=k``
  returns, per generated token, the top ``k`` ids with their ranks plus the sampled id.

The "model" is a bigram table made from the loaded embedding (logits of the next id =
``E @ E[last id]``), so what is generated depends on the weights pushed into it.

Use :func:`install` to put it in ``sys.modules`` as ``vllm``.
"""

from __future__ import annotations

import json
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

_LLM_ARGS = {
    "model", "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
    "dtype", "load_format", "skip_tokenizer_init", "gpu_memory_utilization", "max_model_len",
    "enable_prefix_caching", "enable_sleep_mode", "enforce_eager", "logprobs_mode",
    "max_logprobs", "seed", "max_num_seqs", "max_num_batched_tokens", "trust_remote_code",
}  # fmt: skip
_LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
EVENTS: list[tuple] = []
"""Every call the engine made on any fake LLM of this process, in order."""
INSTANCES: list[LLM] = []


@dataclass(kw_only=True)
class SamplingParams:
    """vLLM's per-request sampling settings (the fields the engine may set)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    logprobs: int | None = None


@dataclass
class Logprob:
    """One candidate id's log-probability and its 1-based rank in the vocabulary."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


def hf_parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF checkpoint names and shapes of a llama / qwen2 / qwen3 causal LM config."""
    h, v = config["hidden_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads")
    kv = kv or heads
    d = config.get("head_dim") or h // heads
    ffn = config["intermediate_size"]
    model_type = config.get("model_type", "llama")
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * d, h),
            p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.v_proj.weight": (kv * d, h),
            p + "self_attn.o_proj.weight": (h, heads * d),
            p + "mlp.gate_proj.weight": (ffn, h),
            p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn),
        })  # fmt: skip
        if model_type == "qwen2":
            shapes.update({
                p + "self_attn.q_proj.bias": (heads * d,),
                p + "self_attn.k_proj.bias": (kv * d,),
                p + "self_attn.v_proj.bias": (kv * d,),
            })  # fmt: skip
        if model_type == "qwen3":
            shapes.update(
                {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
            )
    return shapes


class FakeModel:
    """The model inside the worker: holds what ``load_weights`` received."""

    def __init__(self, config: dict, llm: LLM) -> None:
        self.shapes = hf_parameter_shapes(config)
        self.llm = llm
        self.weights: dict[str, torch.Tensor] = {}
        self.load_calls = 0

    def load_weights(self, weights) -> set[str]:
        if "weights" in self.llm.sleeping_tags:
            raise RuntimeError("load_weights while the weights sleep: wake_up(tags=['weights'])")
        loaded = set()
        for name, tensor in weights:
            if name not in self.shapes:
                raise KeyError(f"{name} is not a parameter of this model")
            if tuple(tensor.shape) != self.shapes[name]:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {self.shapes[name]}")
            self.weights[name] = tensor.detach().to("cpu", torch.float32).clone()
            loaded.add(name)
        self.load_calls += 1
        self.llm.weights_discarded = False
        EVENTS.append(("load_weights", tuple(sorted(loaded))))
        return loaded


class _ModelRunner:
    def __init__(self, model: FakeModel) -> None:
        self.model = model


class _Worker:
    def __init__(self, model: FakeModel) -> None:
        self.model_runner = _ModelRunner(model)


class LLM:
    """vLLM's offline engine, reduced to what the rollout engine calls."""

    def __init__(self, model: str, **kwargs) -> None:
        unknown = set(kwargs) - _LLM_ARGS
        if unknown:
            raise TypeError(f"EngineArgs got unexpected keyword arguments {sorted(unknown)}")
        self.kwargs = dict(model=model, **kwargs)
        if kwargs.get("distributed_executor_backend") == "external_launcher":
            assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0", (
                "To get deterministic execution, please set VLLM_ENABLE_V1_MULTIPROCESSING=0"
            )
            self.rank = int(os.environ["RANK"])
            self.local_rank = int(os.environ["LOCAL_RANK"])
        if kwargs.get("logprobs_mode", "raw_logprobs") not in _LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {_LOGPROBS_MODES}")
        config = json.loads((Path(model) / "config.json").read_text())
        self.vocab_size = config["vocab_size"]
        self.max_model_len = kwargs.get("max_model_len") or config["max_position_embeddings"]
        self.max_logprobs = kwargs.get("max_logprobs", 20)
        self.enable_sleep_mode = kwargs.get("enable_sleep_mode", False)
        self.model = FakeModel(config, self)
        self.worker = _Worker(self.model)
        self.is_sleeping = False
        self.sleeping_tags: set[str] = set()
        self.weights_discarded = kwargs.get("load_format") == "dummy"
        INSTANCES.append(self)
        EVENTS.append(("init",))

    # -- sleep mode (vllm.v1.executor.abstract.Executor.sleep / wake_up)
    def sleep(self, level: int = 1) -> None:
        assert self.enable_sleep_mode, "sleep mode needs enable_sleep_mode=True"
        EVENTS.append(("sleep", level))
        if self.is_sleeping:
            return  # "Executor is already sleeping."
        self.is_sleeping = True
        self.sleeping_tags = {"weights", "kv_cache"}
        if level == 2:
            self.weights_discarded = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        EVENTS.append(("wake_up", tuple(tags) if tags else None))
        if not self.is_sleeping:
            return  # "Executor is not sleeping."
        if tags:
            if any(tag not in self.sleeping_tags for tag in tags):
                return  # "Tag ... is not in sleeping tags"
            self.sleeping_tags -= set(tags)
        else:
            self.sleeping_tags.clear()
        self.is_sleeping = bool(self.sleeping_tags)

    def reset_prefix_cache(self) -> bool:
        EVENTS.append(("reset_prefix_cache",))
        return True

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None) -> list:
        if isinstance(method, str):
            return [getattr(self.worker, method)(*args, **(kwargs or {}))]
        return [method(self.worker, *args, **(kwargs or {}))]

    # -- generation
    def generate(self, prompts, sampling_params=None, *, use_tqdm: bool = True, **_):
        if self.is_sleeping:
            raise RuntimeError(
                f"generate while asleep (sleeping tags {sorted(self.sleeping_tags)})"
            )
        if self.weights_discarded:
            raise RuntimeError("generate with discarded or dummy weights: load weights first")
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("the lengths of prompts and sampling_params must be the same")
        EVENTS.append(("generate", len(prompts)))
        return [self._one(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]

    def _one(self, request_id: str, prompt: dict, params: SamplingParams) -> RequestOutput:
        ids = [int(t) for t in prompt["prompt_token_ids"]]
        if params.n != 1:
            raise ValueError("this fake serves n=1 requests (the engine's only kind)")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(
                f"Requested sample logprobs of {params.logprobs}, which is greater than "
                f"max allowed: {self.max_logprobs}"
            )
        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else 0)
        embed = self.model.weights["model.embed_tokens.weight"]
        out, per_token, reason = [], [], "length"
        room = self.max_model_len - len(ids)
        for _ in range(min(params.max_tokens, room)):
            raw = embed @ embed[(ids + out)[-1]]  # [V] logits of the next id
            log_probs = raw.log_softmax(-1)
            if params.temperature == 0 or params.top_k == 1:
                token = int(raw.argmax())
            else:
                token = int(torch.multinomial((raw / params.temperature).softmax(-1), 1,
                                              generator=generator))  # fmt: skip
            out.append(token)
            if params.logprobs is not None:
                order = torch.argsort(log_probs, descending=True)
                rank = {int(t): r + 1 for r, t in enumerate(order.tolist())}
                chosen = order[: params.logprobs].tolist() + [token]
                per_token.append(
                    {int(t): Logprob(float(log_probs[t]), rank[int(t)]) for t in chosen}
                )
            if token in params.stop_token_ids:
                reason = "stop"
                break
        completion = CompletionOutput(
            index=0, text="", token_ids=out, cumulative_logprob=None,
            logprobs=per_token if params.logprobs is not None else None, finish_reason=reason,
        )  # fmt: skip
        return RequestOutput(request_id, None, ids, [completion])


def install() -> types.ModuleType:
    """Register this module as ``vllm`` (and ``vllm.inputs``) in ``sys.modules``."""
    module = sys.modules[__name__]
    sys.modules["vllm"] = module
    EVENTS.clear()
    INSTANCES.clear()
    return module
