"""A lean KV-cached forward over a Megatron-Core GPTModel's own parameters.

Why. On CPU a rollout is mostly decode steps of a few rows, where Megatron's forward is
dominated by per-call overhead rather than arithmetic: tensor-parallel autograd
wrappers run even under ``no_grad`` at TP=1, RoPE cos/sin are recomputed in every layer
on every call, the local attention is unfused (``baddbmm`` + masked softmax + ``bmm``, K/V
repeated per query head), the static KV cache is written through several copies, and
warnings / RNG-tracker forks run per layer. This module computes the same function with
plain torch calls on the *same parameter tensors* (no copy: an optimizer step is seen by
the next call), so a rollout samples from exactly the weights being trained:

- cos/sin of Megatron's own ``RotaryEmbedding`` table, computed once per cache (at the
  real position of every token: ``column - left padding``, as the training forward sees
  right-padded sequences);
- one ``F.linear`` per projection; at TP > 1 an all-reduce after the row-parallel ones,
  a masked lookup + all-reduce for the vocabulary-parallel embedding, and an all-gather
  of the vocabulary-sharded logits (what Megatron's inference path returns);
- the KV cache as one ``[rows, groups, max_len, head_dim]`` buffer per layer and
  tensor, written in place (one copy per step and layer);
- ``scaled_dot_product_attention`` with grouped-query heads folded into the query
  length (``[rows, groups, heads_per_group * s, head_dim]``), so K/V are never repeated.

Scope: what the project's model builder produces with the local spec: pre-norm
``TransformerLayer`` with torch RMSNorm/LayerNorm, optional q/k norm, RoPE (not
interleaved, no position interpolation), ``MLP`` with or without a gated unit, biases or
none, ``num_query_groups >= TP``, one pipeline stage, no FP8. :func:`lean_unsupported`
says why another model cannot use it (the engine then runs Megatron's own forward).
Tests compare its logits with Megatron's training forward at TP=1 and TP=2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_opd.distributed import ParallelGroups


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's Float16Module (or the model itself)."""
    return getattr(model, "module", model) if not hasattr(model, "decoder") else model


def lean_unsupported(model: torch.nn.Module, groups: ParallelGroups) -> str | None:
    """Why ``model`` cannot run on the lean path here (None: it can)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP

    gpt = _inner(model)
    config = getattr(gpt, "config", None)
    if config is None or not hasattr(gpt, "decoder"):
        return "not a GPTModel"
    if groups.pp_size > 1 or groups.cp_size > 1:
        return "pipeline or context parallelism"
    if getattr(config, "fp8", None):
        return "FP8"
    if getattr(gpt, "position_embedding_type", None) != "rope":
        return f"position embedding {getattr(gpt, 'position_embedding_type', None)!r}"
    rope = getattr(gpt, "rotary_pos_emb", None)
    if type(rope) is not RotaryEmbedding or rope.rotary_interleaved:
        return "rotary embedding other than Megatron's plain RotaryEmbedding"
    if rope.seq_len_interpolation_factor not in (None, 1.0):
        return "RoPE position interpolation"
    flags = ("apply_residual_connection_post_layernorm", "fp32_residual_connection",
             "layernorm_zero_centered_gamma", "apply_query_key_layer_scaling",
             "attention_output_gate", "multi_latent_attention", "num_moe_experts",
             "window_size")  # fmt: skip
    for flag in flags:
        if getattr(config, flag, None):
            return f"config.{flag}"
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return "softmax_type"
    if config.num_query_groups is not None and config.num_query_groups < groups.tp_size:
        return "fewer query groups than TP ranks"
    norms = (torch.nn.RMSNorm, torch.nn.LayerNorm)
    for layer in gpt.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        if type(attention) is not SelfAttention or type(mlp) is not MLP:
            return "a layer other than SelfAttention + dense MLP"
        if not isinstance(layer.input_layernorm, norms) or not isinstance(
            layer.pre_mlp_layernorm, norms
        ):
            return "fused or non-torch layer norms (Transformer Engine spec)"
        linears = (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
        if not all(isinstance(x, (ColumnParallelLinear, RowParallelLinear)) for x in linears):
            return "non-local linear layers"
        for norm in (attention.q_layernorm, attention.k_layernorm):
            if (
                norm is not None
                and not isinstance(norm, norms)
                and type(norm).__name__ != ("IdentityOp")
            ):
                return "non-torch q/k norms"
    if gpt.decoder.final_layernorm is not None and not isinstance(
        gpt.decoder.final_layernorm, norms
    ):
        return "non-torch final norm"
    return None


def _norm(module: torch.nn.Module | None):
    """A plain function computing ``module`` (None / IdentityOp: identity)."""
    if isinstance(module, torch.nn.RMSNorm):
        shape, weight, eps = tuple(module.normalized_shape), module.weight, module.eps
        return lambda x: F.rms_norm(x, shape, weight, eps)
    if isinstance(module, torch.nn.LayerNorm):
        shape, weight, bias, eps = (
            tuple(module.normalized_shape), module.weight, module.bias, module.eps
        )  # fmt: skip
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    return None


class _Layer(NamedTuple):
    """One transformer layer's tensors and norms, looked up once per decoder (a decode
    step then reads no module attribute: those lookups were a fifth of its fixed cost)."""

    input_norm: Callable | None
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    q_norm: Callable | None
    k_norm: Callable | None
    proj: tuple[torch.Tensor, torch.Tensor | None]
    mlp_norm: Callable | None
    fc1: tuple[torch.Tensor, torch.Tensor | None]
    fc2: tuple[torch.Tensor, torch.Tensor | None]


def _layer_plan(layer) -> _Layer:
    attention, mlp = layer.self_attention, layer.mlp

    def linear(module):
        return module.weight, getattr(module, "bias", None)

    return _Layer(
        input_norm=_norm(layer.input_layernorm),
        qkv=linear(attention.linear_qkv),
        q_norm=_norm(attention.q_layernorm),
        k_norm=_norm(attention.k_layernorm),
        proj=linear(attention.linear_proj),
        mlp_norm=_norm(layer.pre_mlp_layernorm),
        fc1=linear(mlp.linear_fc1),
        fc2=linear(mlp.linear_fc2),
    )


class LeanDecoder:
    """KV-cached forward of this rank's GPTModel (one pipeline stage) for ``rows`` rows.

    Call :meth:`forward` with the next tokens of the running rows (a prefill, a decode
    step or a chunk), :meth:`keep_rows` when rows leave the batch.
    """

    shards_vocab = True
    """:meth:`forward` can return this TP rank's vocabulary shard (``vocab_parallel``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        groups: ParallelGroups,
        *,
        rows: int,
        max_len: int,
        use_cache: bool = True,
    ) -> None:
        """
        Args:
            model: the GPTModel (or Float16Module around it); :func:`lean_unsupported`
                must be None for it.
            groups: this rank's groups (TP all-reduces and the logits gather).
            rows: rows of the batch at the start (the cache's first dimension).
            max_len: longest prompt + new tokens (the cache's sequence dimension).
            use_cache: keep keys and values for later calls; False for a single
                whole-sequence forward (no-grad scoring), which then allocates no cache.
        """
        gpt = _inner(model)
        config = gpt.config
        self.gpt, self.groups = gpt, groups
        self.vocab_size = int(gpt.vocab_size)
        """The model's padded vocabulary (all TP shards)."""
        self.tp_group = groups.tp_group if groups.tp_size > 1 else None
        tp = groups.tp_size
        self.head_dim = config.kv_channels
        self.num_heads = config.num_attention_heads // tp
        self.num_groups = (config.num_query_groups or config.num_attention_heads) // tp
        self.per_group = self.num_heads // self.num_groups
        self.scale = config.softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.activation = config.activation_func
        self.gated = config.gated_linear_unit
        self.dtype = config.params_dtype
        param = next(gpt.parameters())
        device = param.device
        # Megatron's own table (what the training forward uses), once per cache.
        freqs = gpt.rotary_pos_emb(max_len)[:, 0, 0].to(device)  # [max_len, rot]
        self.rot = freqs.shape[-1]
        # Megatron's non-interleaved table repeats its angles over the two halves, so
        # rotate_half(x) * sin == roll(x, rot / 2) * (sin with its first half negated),
        # bit for bit ((-a) * b == -(a * b)): two ops fewer than negate-and-concatenate.
        half = self.rot // 2
        if not torch.equal(freqs[:, :half], freqs[:, half:]):
            raise RuntimeError(
                "LeanDecoder: the rotary table's two halves differ; this RoPE is not "
                "Megatron's non-interleaved one (set rollout.lean_decode=false)"
            )
        sin = freqs.sin()
        sin[:, :half].neg_()
        self.cos, self.sin_signed = freqs.cos().to(self.dtype), sin.to(self.dtype)
        shape = (rows, self.num_groups, max_len if use_cache else 0, self.head_dim)
        self.use_cache = use_cache
        self.keys = [
            torch.empty(shape, dtype=self.dtype, device=device) for _ in gpt.decoder.layers
        ]
        self.values = [torch.empty_like(k) for k in self.keys]
        self.offset = 0
        """Columns already in the cache (every running row is at the same column)."""
        self.layers = [_layer_plan(layer) for layer in gpt.decoder.layers]
        self.final_norm = _norm(gpt.decoder.final_layernorm)

    # ---------------------------------------------------------------- pieces
    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        embedding = self.gpt.embedding.word_embeddings
        weight = embedding.weight
        if self.tp_group is None:
            return F.embedding(tokens, weight)
        start = embedding.vocab_start_index
        local = tokens - start
        outside = (local < 0) | (local >= weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), weight)
        out.masked_fill_(outside[..., None], 0.0)
        return self._reduce(out)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """Megatron's non-interleaved RoPE on ``x [..., d]``; ``cos``/``sin_signed`` broadcast
        to ``[..., rot]`` (``sin_signed``: the sine with its first half negated)."""
        if self.rot < x.shape[-1]:
            head, tail = x[..., : self.rot], x[..., self.rot :]
            return torch.cat([self._rope(head, cos, sin_signed), tail], dim=-1)
        return x * cos + x.roll(self.rot // 2, dims=-1) * sin_signed

    def _attention(self, layer: _Layer, x, index, cos, sin, mask) -> torch.Tensor:
        """Self-attention of ``x [a, s, h]`` (normed) against the cache of layer ``index``;
        ``cos``/``sin`` ``[a, s, 1, 1, rot]`` (see :meth:`_rope`)."""
        a, s, _ = x.shape
        ng, npg, d = self.num_groups, self.per_group, self.head_dim
        qkv = F.linear(x, *layer.qkv)
        qkv = qkv.view(a, s, ng, npg + 2, d)  # per group: its query heads, key, value
        if layer.q_norm is None and layer.k_norm is None:
            query_key = qkv[:, :, :, : npg + 1]
        else:
            query, key = qkv[:, :, :, :npg], qkv[:, :, :, npg : npg + 1]
            query = query if layer.q_norm is None else layer.q_norm(query)
            key = key if layer.k_norm is None else layer.k_norm(key)
            query_key = torch.cat([query, key], dim=3)
        # One RoPE call for the queries and the key of every group.
        query_key = self._rope(query_key, cos, sin)  # [a, s, ng, npg + 1, d]
        key, value = query_key[:, :, :, npg], qkv[:, :, :, npg + 1]  # [a, s, ng, d]
        end = self.offset + s
        if self.use_cache:
            keys, values = self.keys[index], self.values[index]
            keys[:a, :, self.offset : end] = key.transpose(1, 2)
            values[:a, :, self.offset : end] = value.transpose(1, 2)
        else:
            assert self.offset == 0, "a cache-less LeanDecoder makes one forward"
            keys, values = key.transpose(1, 2), value.transpose(1, 2)
        # Grouped-query heads ride in the query length: [a, ng, npg * s, d] against the
        # group's [a, ng, end, d] keys, so K/V are never repeated per head.
        query = query_key[:, :, :, :npg].permute(0, 2, 3, 1, 4).reshape(a, ng, npg * s, d)
        out = F.scaled_dot_product_attention(
            query, keys[:a, :, :end], values[:a, :, :end], attn_mask=mask, scale=self.scale
        )
        out = out.view(a, ng, npg, s, d).permute(0, 3, 1, 2, 4).reshape(a, s, ng * npg * d)
        weight, bias = layer.proj
        out = self._reduce(F.linear(out, weight))
        return out if bias is None else out + bias

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, *layer.fc1)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(hidden)
        weight, bias = layer.fc2
        out = self._reduce(F.linear(hidden, weight))
        return out if bias is None else out + bias

    def _logits(self, x: torch.Tensor, gather: bool = True) -> torch.Tensor:
        gpt = self.gpt
        if gpt.share_embeddings_and_output_weights:
            weight = gpt.shared_embedding_or_output_weight()
        else:
            weight = gpt.output_layer.weight
        logits = F.linear(x, weight, getattr(gpt.output_layer, "bias", None))
        if self.tp_group is None or not gather:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.groups.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # ---------------------------------------------------------------- API
    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor | None,
        *,
        last_only: bool = False,
        logits_from: int = 0,
        vocab_parallel: bool = False,
    ) -> torch.Tensor:
        """Feed ``tokens [a, s]`` of the running rows after the cached columns.

        Args:
            tokens: ``[a, s]`` ids (``a`` <= the cache's rows after :meth:`keep_rows`).
            positions: ``[a, s]`` real position of each token (RoPE angle).
            key_valid: ``[a, offset + s]`` bool, False on pad keys (None: none is a pad).
            last_only: return the last column's logits only.
            logits_from: return the logits of columns ``logits_from..s-1`` only (the
                others are never projected onto the vocabulary).
            vocab_parallel: return this TP rank's vocabulary shard ``[.., V/TP]`` in the
                model's dtype (what Megatron's forward returns outside inference),
                instead of the gathered float32 logits.

        Returns:
            ``[a, s - logits_from or 1, V]`` float32 logits over the whole (padded)
            vocabulary (``vocab_parallel``: ``[.., V/TP]``, model dtype).
        """
        a, s = tokens.shape
        end = self.offset + s
        mask = None  # SDPA: True = may attend
        if s > 1 or key_valid is not None:
            query = torch.arange(self.offset, end, device=tokens.device)
            allowed = torch.arange(end, device=tokens.device)[None, :] <= query[:, None]
            allowed = allowed[None]  # [1, s, end]
            if key_valid is not None:
                allowed = allowed & key_valid[:, None, :end]
                # A pad query sees no valid key; letting it see itself keeps its (unused,
                # masked-out) keys and values finite, as Megatron's masked softmax does.
                allowed = allowed | (torch.arange(end, device=tokens.device) == query[:, None])
            # Queries are ordered (head in group, column): repeat the column rows per head.
            mask = allowed[:, None].expand(-1, self.per_group, -1, -1)
            mask = mask.reshape(mask.shape[0], 1, self.per_group * s, end)
        cos = self.cos[positions][:, :, None, None]  # [a, s, 1, 1, rot]
        sin = self.sin_signed[positions][:, :, None, None]
        x = self._embed(tokens).to(self.dtype)
        for index, layer in enumerate(self.layers):
            normed = x if layer.input_norm is None else layer.input_norm(x)
            x = x + self._attention(layer, normed, index, cos, sin, mask)
            x = x + self._mlp(layer, x if layer.mlp_norm is None else layer.mlp_norm(x))
        self.offset = end
        x = x[:, -1:] if last_only else x[:, logits_from:]
        if self.final_norm is not None:
            x = self.final_norm(x)
        if vocab_parallel:
            return self._logits(x, gather=False)
        return self._logits(x).float()

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the cache rows where ``keep [a]`` (bool, over the running rows) is False."""
        a = keep.shape[0]
        for cache in (self.keys, self.values):
            for i, buffer in enumerate(cache):
                cache[i] = buffer[:a][keep]
