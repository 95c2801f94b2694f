"""Tiny Qwen3 models trained by supervised fine-tuning on a built-in task, in plain PyTorch.

The demo needs a teacher that solves the built-in task and a student that is visibly
worse but not hopeless. Both are Hugging Face ``Qwen3ForCausalLM`` models (so the
project's HF -> Megatron conversion loads them like real checkpoints), trained here on
the task's worked solutions with the loss on solution tokens only.

Training batches are generated fresh from the task stream, one problem size per batch so
rows have similar lengths, right-padded (causal attention never looks right, so no mask
is needed and the loss ignores the padding). Periodic greedy evaluation on the held-out
split uses ``model.generate`` with its KV cache over left-padded prompts and is graded
with math-verify; training stops at a target accuracy or a wall-time cap. Evaluation
time does not count against the training budget (it is reported separately).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from megatron_opd.data.tokenizer import Tokenizer
from megatron_opd.eval.grading import grade


@dataclass(kw_only=True)
class TinyModelShape:
    """Size of a tiny Qwen3 model."""

    num_layers: int
    """Transformer layers."""

    hidden_size: int
    """Model width."""

    num_attention_heads: int
    """Query heads (head_dim = hidden_size / num_attention_heads)."""

    num_key_value_heads: int
    """Key/value heads (grouped-query attention)."""

    intermediate_size: int
    """Width of the SwiGLU MLP."""


def build_qwen3(shape: TinyModelShape, tokenizer: Tokenizer, *, seed: int, max_positions: int):
    """A freshly initialised ``Qwen3ForCausalLM`` with tied embeddings (fp32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.hidden_size // shape.num_attention_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_id
    model.generation_config.eos_token_id = tokenizer.eos_id
    model.generation_config.bos_token_id = tokenizer.bos_id
    return model


def sft_batch(problems: list, tokenizer: Tokenizer):
    """``(input_ids [b, s], labels [b, s])``: prompt + solution + EOS, loss on the solution."""
    rows, prompt_lengths = [], []
    for p in problems:
        prompt = tokenizer.encode_prompt(p.problem)
        rows.append(prompt + tokenizer.encode(p.solution) + [tokenizer.eos_id])
        prompt_lengths.append(len(prompt))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (row, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, prompt_length : len(row)] = torch.tensor(row[prompt_length:])
    return input_ids, labels


@torch.no_grad()
def generate_greedy(
    model, tokenizer: Tokenizer, problems: list[str], *, max_new_tokens: int, batch_size: int = 256
) -> list[str]:
    """Greedy responses (decoded text) for ``problems``, with the KV cache."""
    model.eval()
    responses: list[str] = []
    for start in range(0, len(problems), batch_size):
        prompts = [tokenizer.encode_prompt(p) for p in problems[start : start + batch_size]]
        length = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), length), tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, length - len(p) :] = torch.tensor(p)
            attention_mask[i, length - len(p) :] = 1
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id,
        )
        for row in out[:, length:].tolist():
            if tokenizer.eos_id in row:
                row = row[: row.index(tokenizer.eos_id)]
            responses.append(tokenizer.decode(row))
    return responses


def greedy_accuracy(model, tokenizer: Tokenizer, problems: list, *, max_new_tokens: int) -> float:
    """Fraction of ``problems`` solved by greedy decoding (graded with math-verify)."""
    responses = generate_greedy(
        model, tokenizer, [p.problem for p in problems], max_new_tokens=max_new_tokens
    )
    return sum(grade(r, p.answer) for r, p in zip(responses, problems)) / len(problems)


@dataclass(kw_only=True)
class SFTSchedule:
    """How long and how hard to train."""

    max_seconds: float
    """Training wall-time cap (evaluation excluded)."""

    target_accuracy: float
    """Stop at the first evaluation whose held-out accuracy is at least this."""

    eval_every_seconds: float
    """Training seconds between evaluations."""

    batch_size: int = 64
    """Problems per optimizer step."""

    lr: float = 3e-3
    """Peak AdamW learning rate (cosine decay to 10 % over ``max_seconds``)."""

    warmup_steps: int = 30
    """Linear warm-up steps."""

    min_eval_seconds: float = 0.0
    """No evaluation before this much training (accuracy is 0 before the model learns
    the format, so early evaluations only cost time)."""

    probe_threads: bool = True
    """Time a few steps with the current torch thread count and with one thread, and keep
    the faster. On a CPU shared with busy processes, two OpenMP threads can run ~10x
    slower than one (they spin waiting for each other); on idle cores two are faster."""

    clock: Literal["wall", "cpu"] = "wall"
    """What the seconds above measure. ``"wall"``: wall time. ``"cpu"``: the process's CPU
    time divided by its torch threads, i.e. wall time on an idle machine; use it on a
    shared machine so the result does not depend on the neighbours' load."""

    max_steps: int | None = None
    """Count in optimizer steps instead of seconds: the LR schedule spans ``max_steps``,
    evaluations fall every ``eval_every_steps`` from ``min_eval_steps`` on, and the run
    uses one torch thread, so the same seed gives the same model on any machine.
    ``max_seconds`` then only guards against a machine far slower than expected."""

    eval_every_steps: int = 50
    """Steps between evaluations (with ``max_steps``)."""

    min_eval_steps: int = 0
    """No evaluation before this step (with ``max_steps``)."""


@dataclass(kw_only=True)
class SFTResult:
    """What one SFT run did."""

    accuracy: float
    """Held-out greedy accuracy at the end."""

    train_seconds: float
    """Training time on the schedule's clock (evaluation excluded)."""

    wall_seconds: float
    """Wall time of the whole run, evaluations included."""

    eval_seconds: float
    """Wall time spent in evaluations."""

    steps: int
    """Optimizer steps."""

    reached_target: bool
    """Whether ``target_accuracy`` was reached before ``max_seconds``."""

    num_threads: int = 1
    """torch threads used after the thread probe."""

    history: list[dict] = field(default_factory=list)
    """One entry per evaluation: step, train_seconds, loss, accuracy."""


class _ThreadProbe:
    """Alternate the configured thread count and one thread on steps 1-4; keep the faster.

    Step 0 is left out (first-call allocation). A gap of 2x after one step of each
    decides at once (a thrashing machine makes every configured step costly); otherwise
    the faster of two steps each decides.
    """

    def __init__(self) -> None:
        self.configured = torch.get_num_threads()
        self.timings: dict[int, list[float]] = {self.configured: [], 1: []}
        self.done = self.configured == 1

    def before_step(self, step: int) -> None:
        if 1 <= step <= 4:
            torch.set_num_threads(self.configured if step % 2 else 1)

    def after_step(self, step: int, seconds: float) -> None:
        index = step - 1
        if not 1 <= index <= 4:
            return
        self.timings[self.configured if index % 2 else 1].append(seconds)
        best = {n: min(t) for n, t in self.timings.items() if t}
        if len(best) == 2 and (index == 4 or max(best.values()) > 2 * min(best.values())):
            torch.set_num_threads(min(best, key=best.get))
            self.done = True


def train_sft(
    model,
    tokenizer: Tokenizer,
    problems: Iterator,
    schedule: SFTSchedule,
    evaluate: Callable[[], float],
    *,
    size_range: tuple[int, int],
    seed: int,
    progress_desc: str = "SFT",
    show_progress: bool = True,
    progress_position: int = 0,
) -> SFTResult:
    """Train ``model`` on ``problems`` until ``evaluate()`` >= target or time runs out.

    ``problems`` is the training stream (already disjoint from the held-out split) of
    problems with a ``size``; each batch takes problems of one size in ``size_range`` to
    keep padding small.
    """
    from tqdm.auto import tqdm

    rng = random.Random(f"sft-batches-{seed}")
    by_count: dict[int, list] = {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.98))
    train_s = eval_s = last_eval = 0.0
    step, accuracy, history = 0, 0.0, []
    by_steps = schedule.max_steps is not None
    unit = " steps" if by_steps else "s train"
    bar = tqdm(
        total=schedule.max_steps if by_steps else round(schedule.max_seconds),
        desc=progress_desc,
        disable=not show_progress,
        position=progress_position,
        bar_format=(
            "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total}" + unit + " "
            "[{elapsed}<{remaining}]{postfix}"
        ),
    )
    clock = time.process_time if schedule.clock == "cpu" else time.perf_counter
    wall_start = time.perf_counter()
    if by_steps:
        torch.set_num_threads(1)  # thread count changes float reductions, hence the model
    thread_probe = _ThreadProbe() if schedule.probe_threads and not by_steps else None
    while True:
        if thread_probe is not None:
            thread_probe.before_step(step)
        threads = torch.get_num_threads() if schedule.clock == "cpu" else 1
        start, start_wall = clock(), time.perf_counter()
        size = rng.randint(*size_range)
        batch: list = []
        while len(batch) < schedule.batch_size:
            bucket = by_count.setdefault(size, [])
            if bucket:
                batch.append(bucket.pop())
                continue
            p = next(problems)
            if p.size == size:
                batch.append(p)
            else:
                by_count.setdefault(p.size, []).append(p)
        input_ids, labels = sft_batch(batch, tokenizer)
        if by_steps:
            progress = min(step / schedule.max_steps, 1.0)
        else:
            progress = min(train_s / schedule.max_seconds, 1.0)
        lr = schedule.lr * min(1.0, (step + 1) / schedule.warmup_steps)
        lr *= 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        logits = model(input_ids=input_ids).logits[:, :-1]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        train_s += (clock() - start) / threads
        if thread_probe is not None:
            thread_probe.after_step(step, time.perf_counter() - start_wall)
            if thread_probe.done:
                thread_probe = None
        bar.update((step if by_steps else min(train_s, schedule.max_seconds)) - bar.n)
        out_of_time = train_s >= schedule.max_seconds
        if by_steps:
            out_of_time |= step >= schedule.max_steps
            due = step % schedule.eval_every_steps == 0 and step >= schedule.min_eval_steps
        else:
            due = train_s - last_eval >= schedule.eval_every_seconds
            due &= train_s >= schedule.min_eval_seconds
        if out_of_time or due:
            last_eval = train_s
            eval_start = time.perf_counter()
            accuracy = evaluate()
            eval_s += time.perf_counter() - eval_start
            history.append(
                {
                    "step": step,
                    "train_seconds": round(train_s, 1),
                    "loss": loss.item(),
                    "accuracy": accuracy,
                }
            )
            bar.set_postfix(
                step=step, loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}", refresh=False
            )
            if accuracy >= schedule.target_accuracy or out_of_time:
                break
    bar.close()
    model.eval()
    return SFTResult(
        accuracy=accuracy,
        train_seconds=train_s,
        wall_seconds=time.perf_counter() - wall_start,
        eval_seconds=eval_s,
        steps=step,
        reached_target=accuracy >= schedule.target_accuracy,
        num_threads=torch.get_num_threads(),
        history=history,
    )
