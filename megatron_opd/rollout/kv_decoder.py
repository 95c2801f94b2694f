"""KV-cached forwards for rollouts and chunk scoring: the lean path or Megatron's own.

The rollout engine (prefill, then one token per step) and the chunk scorer (prefill,
then one chunk of ``c`` tokens per call) both feed new columns of left-padded rows after
a cached prefix, drop finished rows, and read the logits. :func:`make_kv_decoder` gives
them one object for that:

- :class:`~megatron_opd.rollout.lean_decoder.LeanDecoder` when the model supports it
  (``lean=True``, one pipeline stage, the local spec; see its module essay): a plain-torch
  forward over the model's own parameters, several times cheaper per decode step on CPU;
- :class:`MegatronKVDecoder` otherwise: ``GPTModel.forward`` with a Megatron
  ``StaticInferenceContext``, across pipeline stages (any layout, any layer spec).

Masks follow Megatron's convention here (True = masked); a row's pad keys are hidden by
``key_valid [a, offset + s]`` (False on pads), or nothing when no row is padded.
"""

from __future__ import annotations

import torch

from megatron_opd.distributed import ParallelGroups
from megatron_opd.mcore_compat import materialize_all_logits
from megatron_opd.rollout.lean_decoder import LeanDecoder, lean_unsupported
from megatron_opd.scoring import forward_through_stages


class MegatronKVDecoder:
    """Megatron's own forward with a ``StaticInferenceContext`` (any TP/PP layout)."""

    shards_vocab = False
    """Megatron's inference forward always gathers the logits over TP."""

    def __init__(
        self,
        model: torch.nn.Module,
        groups: ParallelGroups,
        *,
        rows: int,
        max_len: int,
        all_logits: bool = False,
        decode_after_first: bool = True,
    ) -> None:
        """
        Args:
            model: this stage's GPTModel; the caller puts it in eval mode without SP.
            groups: this rank's groups.
            rows, max_len: the cache's rows and sequence length.
            all_logits: return every fed position's logits (else Megatron may keep only
                the last one).
            decode_after_first: switch the context to decode mode after the first call
                (one-token steps follow).
        """
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model, self.groups = model, groups
        self.context = StaticInferenceContext(rows, max_len)
        if all_logits:
            materialize_all_logits(self.context)
        self.decode_after_first = decode_after_first

    @property
    def offset(self) -> int:
        """Columns already in the cache."""
        return self.context.sequence_len_offset

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor | None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor | None:
        """Feed ``tokens [a, s]`` after the cache; ``[a, s or 1, V]`` logits on the last
        stage (gathered over TP), None elsewhere. Arguments as :meth:`LeanDecoder.forward`."""
        context = self.context
        offset, s = context.sequence_len_offset, tokens.shape[1]
        end = offset + s
        mask = None
        if s > 1 or key_valid is not None:
            query = torch.arange(offset, end, device=tokens.device)
            future = torch.arange(end, device=tokens.device)[None, :] > query[:, None]
            mask = future[None, None]
            if key_valid is not None:
                mask = mask | ~key_valid[:, None, None, :end]
        logits = forward_through_stages(
            self.model,
            tokens,
            positions,
            mask,
            self.groups,
            inference_context=context,
            runtime_gather_output=True,
        )
        first = offset == 0
        context.increment_sequence_len_offset(s)
        if first and self.decode_after_first:
            context.enable_decode_mode()
        if logits is not None and last_only:
            logits = logits[:, -1:]
        return logits

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop the cache rows where ``keep [a]`` is False."""
        memory = self.context.key_value_memory_dict
        for layer, (k, v) in memory.items():
            memory[layer] = (k[:, keep], v[:, keep])


def make_kv_decoder(
    model: torch.nn.Module,
    groups: ParallelGroups,
    *,
    rows: int,
    max_len: int,
    lean: bool,
    all_logits: bool = False,
    decode_after_first: bool = True,
) -> LeanDecoder | MegatronKVDecoder:
    """The lean decoder when ``lean`` and the model supports it, else Megatron's."""
    if lean and lean_unsupported(model, groups) is None:
        return LeanDecoder(model, groups, rows=rows, max_len=max_len)
    return MegatronKVDecoder(
        model, groups, rows=rows, max_len=max_len, all_logits=all_logits,
        decode_after_first=decode_after_first,
    )  # fmt: skip
