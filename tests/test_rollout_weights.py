"""The rollout samples from exactly the weights being trained.

Reference: Megatron's training forward of the same GPTModel, the call ``forward_step``
makes (train mode, no KV cache, right-padded rows, ``model(tokens, positions, None)``),
after the parameters were changed in place as an optimizer step changes them. Compared:

- the logits of the KV-cached decoders (the lean path and Megatron's own) at every
  position of ragged, left-padded rows, through prefill, one-token steps and a row
  leaving the cache;
- the log-probs the rollout engine records for the tokens it sampled.

On CPU at TP=1 and TP=2 (gloo) for Qwen3 (GQA, q/k norm, tied embeddings) and Llama
(llama3 RoPE scaling, untied output layer); the same checks on CUDA in a world of one
(skipped without CUDA).
"""

import os

import pytest
import torch

from megatron_opd.testing.multiprocess import run_distributed

PROMPTS = [[5, 17, 42, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11], [100, 7, 3, 2, 61, 9, 14]]
CONTINUATION = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36]]
DROP_AFTER = 3
"""Row 1 leaves the cache after this many decode steps (its later logits are not read)."""


def _build(path: str, groups):
    from megatron_opd.config.model import ModelConfig
    from megatron_opd.conversion import load_model_weights
    from megatron_opd.models import build_model

    config = ModelConfig(path=path, transformer_impl="local")
    chunks, info = build_model(config, groups, role="student")
    load_model_weights(chunks, config, info, groups)
    return chunks[0], info


def _step_in_place(model, seed: int) -> None:
    """Change every parameter in place, as an optimizer step does (the same generator on
    every rank keeps replicated parameters, the norms, identical)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.device))


def _training_logits(model, tokens: torch.Tensor, groups) -> torch.Tensor:
    """``[b, s, V_padded]`` full logits of the training forward (train mode, no cache)."""
    import torch.distributed as dist

    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device)[None].expand(b, s)
    model.train()
    with torch.no_grad():
        logits = model(tokens, positions, None)
    model.eval()
    if groups.tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(groups.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=groups.tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits.float()


def _decoder_logits(model, groups, *, lean: bool):
    """Per row, ``[len, V]`` logits of prompt + continuation from a KV-cached decoder."""
    from megatron_opd.rollout.kv_decoder import make_kv_decoder
    from megatron_opd.rollout.lean_decoder import LeanDecoder

    device = groups.platform.device
    m, n = len(PROMPTS), len(CONTINUATION[0])
    p = max(len(x) for x in PROMPTS)
    tokens = torch.zeros(m, p, dtype=torch.long, device=device)
    for i, prompt in enumerate(PROMPTS):
        tokens[i, p - len(prompt) :] = torch.tensor(prompt)
    pad = torch.tensor([p - len(x) for x in PROMPTS], device=device)
    columns = torch.arange(p + n, device=device)
    key_valid = columns[None] >= pad[:, None]
    positions = (columns[None] - pad[:, None]).clamp(min=0)
    decoder = make_kv_decoder(model, groups, rows=m, max_len=p + n, lean=lean, all_logits=True)
    assert isinstance(decoder, LeanDecoder) == lean, "the lean path must not fall back here"
    model.eval()
    out = [[] for _ in range(m)]
    logits = decoder.forward(tokens, positions[:, :p], key_valid)
    for i, prompt in enumerate(PROMPTS):
        out[i].append(logits[i, p - len(prompt) :])
    running = torch.arange(m, device=device)
    cont = torch.tensor(CONTINUATION, device=device)
    for step in range(n - 1):
        column = p + step
        logits = decoder.forward(
            cont[running, step : step + 1], positions[running, column : column + 1],
            key_valid[running],
        )  # fmt: skip
        for row, i in enumerate(running.tolist()):
            out[i].append(logits[row])
        if step + 1 == DROP_AFTER:
            keep = running != 1
            decoder.keep_rows(keep)
            running = running[keep]
    return [torch.cat(rows) for rows in out]


def _check(path: str, family_seed: int, tp: int) -> int:
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.config.rollout import RolloutConfig
    from megatron_opd.distributed import destroy_model_parallel, init_distributed
    from megatron_opd.ops.vocab_parallel import vocab_parallel_log_probs
    from megatron_opd.rollout.megatron_engine import MegatronRolloutEngine

    groups = init_distributed(ParallelConfig(tensor_parallel_size=tp))
    try:
        model, info = _build(path, groups)
        device = groups.platform.device
        engines = {
            lean: MegatronRolloutEngine(
                model,
                groups,
                RolloutConfig(
                    temperature=1.0, n_samples_per_prompt=2, max_new_tokens=8, lean_decode=lean
                ),
                eos_token_ids=[2],
                vocab_size=info.vocab_size,
            )  # fmt: skip
            for lean in (True, False)
        }
        for engine in engines.values():  # the engines exist (and have run) before the step
            engine.generate(PROMPTS, max_new_tokens=2, seed=0)
        _step_in_place(model, family_seed)
        full = [torch.tensor(p + c, device=device) for p, c in zip(PROMPTS, CONTINUATION)]
        width = max(len(x) for x in full)
        right = torch.zeros(len(full), width, dtype=torch.long, device=device)
        for i, row in enumerate(full):
            right[i, : len(row)] = row
        reference = _training_logits(model, right, groups)
        checked = 0
        for lean in (True, False):
            got = _decoder_logits(model, groups, lean=lean)
            for i, logits in enumerate(got):
                # Row 1 left after DROP_AFTER steps: only its first positions exist.
                want = reference[i, : logits.shape[0], : info.vocab_size]
                torch.testing.assert_close(logits[:, : info.vocab_size], want, atol=2e-4, rtol=1e-4)
                checked += logits.shape[0]
            batch = engines[lean].generate(PROMPTS, max_new_tokens=8, seed=3)
            tokens = batch.tokens.to(device)
            logits = _training_logits(model, tokens, groups)
            if groups.tp_size > 1:  # the ops take this rank's vocabulary shard
                start, end = groups.vocab_partition(logits.shape[-1])
                logits = logits[..., start:end]
            want = vocab_parallel_log_probs(
                logits[:, :-1].contiguous(), tokens[:, 1:, None], groups.tp_group,
                vocab_size=info.vocab_size,
            )[..., 0]  # fmt: skip
            mask = batch.response_mask().to(device)[:, 1:]
            got_lp = batch.sampled_log_probs.to(device)[:, 1:]
            torch.testing.assert_close(got_lp[mask], want[mask], atol=2e-5, rtol=0)
            checked += int(mask.sum())
        return checked
    finally:
        destroy_model_parallel()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    from megatron_opd.models.tiny import make_tiny_hf_model

    root = tmp_path_factory.mktemp("rollout_weights")
    return {
        "qwen3": str(make_tiny_hf_model(root / "qwen3", "qwen3", seed=1)),
        # (tiny llama configs carry llama3 RoPE scaling)
        "llama": str(
            make_tiny_hf_model(root / "llama", "llama", seed=2, tie_word_embeddings=False)
        ),
    }


@pytest.mark.parametrize("family,tp", [("qwen3", 1), ("llama", 1), ("qwen3", 2)])
def test_rollout_logits_equal_the_training_forward(hf_models, family, tp):
    counts = run_distributed(_check, tp, hf_models[family], 7, tp, timeout_s=240)
    assert all(c > 40 for c in counts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rollout_logits_equal_the_training_forward_on_cuda(hf_models):
    from megatron_opd.distributed import destroy_distributed
    from megatron_opd.testing.multiprocess import free_port

    os.environ.update(
        RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    try:
        assert _check(hf_models["qwen3"], 7, 1) > 40
    finally:
        destroy_distributed()
