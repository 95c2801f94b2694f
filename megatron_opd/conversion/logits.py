"""Full-vocabulary logits of a (TP/PP-split) Megatron model on global rank 0.

Used to prove a conversion against transformers: a plain forward through the pipeline
stages (hidden states ``[s, b, h]`` sent stage to stage over the pipeline group), the
last stage's vocabulary shards ``[b, s, V/TP]`` gathered over the TP group, padding
columns dropped, and the result sent to global rank 0. Not a training path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_opd.distributed import ParallelGroups
from megatron_opd.models.hf_config import ModelInfo


@torch.no_grad()
def gather_full_logits(
    model_chunks, input_ids: torch.Tensor, info: ModelInfo, groups: ParallelGroups
) -> torch.Tensor | None:
    """Collective: logits ``[b, s, vocab_size]`` (fp32) on global rank 0, None elsewhere.

    ``input_ids`` ``[b, s]`` must be the same on every rank.
    """
    model = model_chunks[0] if isinstance(model_chunks, list) else model_chunks
    model.eval()
    device = groups.platform.device
    input_ids = input_ids.to(device)
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)
    pp_ranks = groups.pp_global_ranks
    dtype = next(model.parameters()).dtype
    if not groups.is_first_stage:
        hidden = torch.empty((seq, batch, info.hidden_size), dtype=dtype, device=device)
        dist.recv(hidden, src=pp_ranks[groups.pp_rank - 1], group=groups.pp_group)
        model.set_input_tensor(hidden)
    output = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
    if not groups.is_last_stage:
        dist.send(output.contiguous(), dst=pp_ranks[groups.pp_rank + 1], group=groups.pp_group)
        logits = None
    else:
        local = output.float().contiguous()
        if groups.tp_size > 1:
            shards = [torch.empty_like(local) for _ in range(groups.tp_size)]
            dist.all_gather(shards, local, group=groups.tp_group)
            local = torch.cat(shards, dim=-1)
        logits = local[..., : info.vocab_size].contiguous()
    # The last stage of the pipeline that holds rank 0 sends its logits there.
    if groups.pp_size > 1 and groups.tp_rank == 0 and groups.dp_rank == 0:
        if groups.is_last_stage:
            dist.send(logits, dst=pp_ranks[0], group=groups.pp_group)
        elif groups.is_first_stage:
            logits = torch.empty((batch, seq, info.vocab_size), dtype=torch.float32, device=device)
            dist.recv(logits, src=pp_ranks[-1], group=groups.pp_group)
    return logits.cpu() if groups.rank == 0 else None
