"""A complete, tiny Prune-OPD run directory built in seconds, for tests and smoke runs.

``make_tiny_run(root)`` writes a SentencePiece tokenizer trained on the built-in chain-sum
task, a random-init tiny Qwen3 teacher and a smaller random-init student (HF format with
the tokenizer inside, as a user would have them), a prompt file, and returns the
overrides of an OPDConfig that points at them.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def _save_hf_model(out_dir: Path, tokenizer_dir: Path, *, vocab_size: int, layers: int,
                   hidden: int, heads: int, kv_heads: int, seed: int) -> Path:  # fmt: skip
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
    model.save_pretrained(out_dir, safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        if item.name.startswith("tokenizer") and item.suffix != ".txt":
            shutil.copy2(item, out_dir / item.name)
    return out_dir


def make_tiny_run(root: str | Path, *, num_prompts: int = 64, seed: int = 0) -> list[str]:
    """Build the run's files under ``root``; return config overrides (``a.b=c``)."""
    from megatron_opd.data.chain_task import train_task_tokenizer, training_problems, write_jsonl

    root = Path(root)
    tokenizer_dir = root / "tokenizer"
    train_task_tokenizer(tokenizer_dir, seed=seed, num_corpus_problems=500)
    import sentencepiece as spm

    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    vocab_size = vocab_size.get_piece_size()
    teacher = _save_hf_model(root / "teacher", tokenizer_dir, vocab_size=vocab_size, layers=2,
                             hidden=64, heads=4, kv_heads=2, seed=seed + 1)  # fmt: skip
    student = _save_hf_model(root / "student", tokenizer_dir, vocab_size=vocab_size, layers=2,
                             hidden=32, heads=4, kv_heads=2, seed=seed + 2)  # fmt: skip
    problems = training_problems(seed=seed, min_terms=2, max_terms=3)
    prompts = write_jsonl(root / "prompts.jsonl", (next(problems) for _ in range(num_prompts)))
    return [
        f"student.path={student}",
        f"teacher.path={teacher}",
        f"data.train_path={prompts}",
        "data.max_prompt_length=64",
        "data.prompts_per_step=2",
        "rollout.n_samples_per_prompt=2",
        "rollout.max_new_tokens=16",
        "budget.init_len=12",
        "budget.min_len=8",
        "budget.max_len=16",
        "budget.step=2",
        "budget.margin=2",
        "prune.top_k=4",
        "prune.threshold=0.5",
        "prune.w_drop=0.2",
        "prune.w_base=0.0",
        "training.lr=0.01",
        "training.num_steps=4",
        "training.micro_batch_tokens=64",
        "training.max_micro_batch_rows=2",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"logging.log_dir={root / 'logs'}",
    ]
