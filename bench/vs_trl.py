"""megatron-opd against TRL's ``DistillationTrainer`` on the same work, side by side (CPU).

    pip install -e '.[bench]'              # TRL (never a runtime dependency)
    python bench/vs_trl.py                 # plain OPD: default loss and exact reverse KL
    python bench/vs_trl.py --prune         # + the Prune-OPD settings (truncate, online stop)
    python bench/vs_trl.py --quick         # smoke run: 4 steps of 16 tokens, one repeat

The work. One tokenizer, one student and one teacher are built here, with fixed seeds and
no hub: a character-level Hugging Face tokenizer over the built-in countdown task (padded
with filler tokens to ``--vocab`` ids) and random-init ``Qwen3ForCausalLM`` models from
configs (the demo's sizes: student 2 layers x 64, teacher 4 layers x 128), saved in HF
format. The prompts are countdown problems of one fixed length ("Count by 7: 12:153"), so
every step of every arm does the same work whatever order it draws them in. Each step
samples ``--rows`` sequences (one per prompt) of exactly ``--new`` new tokens (EOS is held
back: TRL's ``min_new_tokens``, our engine with no EOS id) at temperature 1, scores them
with the teacher and makes one optimizer update (AdamW, lr 1e-5, grad clip 1), fp32,
``--threads`` threads, one process.

Arms (each its own process, run alternately ``--repeats`` times; medians over steps
``--first-step``.. of every repeat):

- ``trl``: TRL's ``DistillationTrainer`` with its default loss, ``beta = 1``: the exact
  full-vocabulary reverse KL ``KL(student || teacher)`` (chunked over the vocabulary).
- ``ours``: megatron-opd plain OPD with its default loss (the release's top-K reverse-KL
  policy gradient, K = 16), no pruning, no budget.
- ``ours_exact_kl``: megatron-opd with ``loss.kind=topk_reverse_kl`` over every id
  (``prune.top_k = V``, no tail bucket): the exact full-vocabulary reverse KL, TRL's loss.
- ``ours_prune`` (``--prune``): the default loss with Prune-OPD on: ``prune.mode=truncate``
  and the chunked online stop (``rollout.chunk_size=16``, ``--chunk`` to change it;
  teacher scored chunk by chunk, fused teacher scoring). ``w_drop`` is set so low that
  no sample can stop within ``--new`` tokens: the arm generates exactly the plain arm's
  tokens, so its extra cost is the price of the online stop at equal generated tokens.
  Here the scorer knows no stop is possible and defers every chunk to one teacher
  forward at the end (:mod:`megatron_opd.rollout.chunk_scorer`): the price when the stop
  cannot fire.
- ``ours_prune_every_chunk`` (``--prune``): the same with deferral switched off in this
  process (``ChunkScorer._may_defer``), so every chunk is read on its own: the price
  when a stop is possible at every chunk (a larger ``w_drop``), at equal tokens.

Phases. TRL: ``generate`` (``transformers.generate``), ``score`` (the teacher's no-grad
forward inside the loss), ``train`` (the rest of the step: the student's forward, the
chunked divergence, backward and the optimizer). Ours: the trainer's own timers
``rollout``, ``score``, ``prune``, ``train``. ``step`` is the wall time of the whole step
for both. Generation speed is new tokens per second of the generation phase.

For the online-stop arms the script also prints where the chunk scorer's time goes: its
teacher forwards and its scoring calls (top-K op, gather, drift events, stopper), timed by
wall-clock wrappers in the arm's process, beside the plain arm's SCORE stage that the fused
teacher scores replace.

Targets (issue 12), printed with PASS / MISS: plain-OPD step <= 1.0x TRL's with the default
loss and <= 1.2x with exact reverse KL; generation tokens/s >= TRL's; the online stop adds
<= 10 % to a step at equal generated tokens. Timings on a shared machine are noisy: the
load average is printed before and after; compare ratios measured in one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
STUDENT = dict(layers=2, hidden=64, heads=4, kv_heads=2)
TEACHER = dict(layers=4, hidden=128, heads=4, kv_heads=2)
LR = 1e-5
TARGETS = {
    "ours": 1.0,  # step time / TRL's
    "ours_exact_kl": 1.2,
    "online_stop": 1.10,  # ours_prune step / ours step at equal generated tokens
}


# --------------------------------------------------------------------------- the work
def _problems(num: int, seed: int) -> list[str]:
    """Countdown problems of one fixed length: 2-digit steps, 3-digit start, 1-digit k."""
    import random

    from megatron_opd.data.countdown_task import make_countdown_problem

    rng = random.Random(seed)
    out = []
    while len(out) < num:
        problem = make_countdown_problem(rng, min_steps=10, max_steps=40, max_start=199)
        out.append(problem.problem)
    assert len({len(p) for p in out}) == 1, "prompts must share one length"
    return out


def _write_tokenizer(directory: Path, vocab: int) -> None:
    """A character-level HF tokenizer: specials, the task's characters, filler ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("Count by:0123456789 \\boxed{}\n"))
    pieces = [PAD, BOS, EOS, UNK, *chars]
    if vocab < len(pieces):
        raise SystemExit(f"--vocab must be >= {len(pieces)}")
    pieces += [f"<x{i}>" for i in range(vocab - len(pieces))]
    table = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.WordLevel(table, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, table[BOS])]
    )
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        unk_token=UNK, padding_side="left",
    )  # fmt: skip
    fast.save_pretrained(directory)


def _write_model(directory: Path, tokenizer_dir: Path, vocab: int, seed: int, size: dict) -> None:
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=size["hidden"] * 3,
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"], head_dim=size["hidden"] // size["heads"],
        max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, directory / item.name)


def build_work(root: Path, *, vocab: int, num_prompts: int, seed: int) -> dict:
    """Tokenizer, models and prompts under ``root``; returns their paths and facts."""
    from megatron_opd.data.tokenizer import load_tokenizer

    tokenizer_dir = root / "tokenizer"
    _write_tokenizer(tokenizer_dir, vocab)
    _write_model(root / "student", tokenizer_dir, vocab, seed + 1, STUDENT)
    _write_model(root / "teacher", tokenizer_dir, vocab, seed + 2, TEACHER)
    problems = _problems(num_prompts, seed)
    with open(root / "prompts.jsonl", "w") as out:
        for problem in problems:
            out.write(json.dumps({"problem": problem, "answer": ""}) + "\n")
    # TRL tokenizes the prompt text it is given; ours formats the problem (plain template:
    # problem + newline, BOS first). Both must see the same ids.
    ours = load_tokenizer(root / "student")
    texts = [ours.format_prompt(p) for p in problems]
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(root / "student"))
    for problem, text in zip(problems, texts):
        assert theirs(text)["input_ids"] == ours.encode_prompt(problem), "tokenizations differ"
    return {
        "root": str(root),
        "prompt_texts": texts,
        "prompt_len": len(ours.encode_prompt(problems[0])),
    }


# --------------------------------------------------------------------------- the arms
def _trl_arm(spec: dict) -> list[dict]:
    """TRL's DistillationTrainer for ``spec['steps']`` steps; per-step phase times."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(spec["threads"])
    root = Path(spec["root"])
    tokenizer = AutoTokenizer.from_pretrained(str(root / "student"), padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(str(root / "student"), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher"), dtype=torch.float32)
    args = DistillationConfig(
        output_dir=str(root / "trl_out"), per_device_train_batch_size=spec["rows"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        max_completion_length=spec["new"], temperature=1.0, beta=1.0,
        generation_kwargs={"min_new_tokens": spec["new"]}, gradient_checkpointing=False,
        bf16=False, use_cpu=True, save_strategy="no", report_to="none", logging_steps=10**6,
        disable_tqdm=True, shuffle_dataset=False, seed=spec["seed"], dataloader_num_workers=0,
    )  # fmt: skip
    dataset = Dataset.from_dict({"prompt": spec["prompt_texts"]})
    phases: dict[str, float] = {}
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            phases.clear()
            phases["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            step = time.perf_counter() - phases.pop("start")
            generate, score = phases.get("generate", 0.0), phases.get("score", 0.0)
            steps.append({"step": step, "generate": generate, "score": score,
                          "train": step - generate - score,
                          "tokens": phases.get("tokens", 0.0)})  # fmt: skip

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset,
        processing_class=tokenizer, callbacks=[Clock()],
    )  # fmt: skip
    generate, hidden = trainer._generate_single_turn, trainer._get_last_hidden_state

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        phases["generate"] = phases.get("generate", 0.0) + time.perf_counter() - start
        phases["tokens"] = phases.get("tokens", 0.0) + sum(len(c) for c in out)
        return out

    def timed_hidden(*a, **k):
        if torch.is_grad_enabled():  # the student's forward (part of training)
            return hidden(*a, **k)
        start = time.perf_counter()
        out = hidden(*a, **k)
        phases["score"] = phases.get("score", 0.0) + time.perf_counter() - start
        return out

    trainer._generate_single_turn, trainer._get_last_hidden_state = timed_generate, timed_hidden
    trainer.train()
    return steps


def _ours_overrides(spec: dict, arm: str) -> list[str]:
    root = Path(spec["root"])
    overrides = [
        f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
        "student.transformer_impl=local", "teacher.transformer_impl=local",
        f"data.train_path={root / 'prompts.jsonl'}", "data.prompt_key=problem",
        f"data.max_prompt_length={spec['prompt_len']}", f"data.prompts_per_step={spec['rows']}",
        "rollout.n_samples_per_prompt=1", f"rollout.max_new_tokens={spec['new']}",
        "rollout.temperature=1.0", "budget.enable=false", "prune.enable=false",
        f"training.num_steps={spec['steps']}", f"training.lr={LR}", "training.clip_grad=1.0",
        f"training.max_micro_batch_rows={spec['rows']}",
        f"training.micro_batch_tokens={spec['rows'] * (spec['prompt_len'] + spec['new'])}",
        f"training.seed={spec['seed']}", f"rollout.seed={spec['seed']}",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.log_dir=null",
    ]  # fmt: skip
    if arm == "ours_exact_kl":
        overrides += ["loss.kind=topk_reverse_kl", "loss.tail_bucket=false",
                      f"prune.top_k={spec['vocab']}"]  # fmt: skip
    if arm.startswith("ours_prune"):
        # Truncate mode with the chunked online stop; w_drop so low that the weight never
        # reaches 0 within the response: equal tokens to the plain arm.
        overrides += ["prune.enable=true", "prune.mode=truncate", "prune.online_stop=true",
                      f"rollout.chunk_size={spec.get('chunk', 16)}",
                      f"prune.w_drop={0.5 / spec['new']}"]  # fmt: skip
    return overrides


def _ours_arm(spec: dict, arm: str) -> list[dict]:
    """megatron-opd's trainer in this process (world size 1); per-step phase times."""
    import torch

    from megatron_opd.testing.multiprocess import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))  # fmt: skip
    torch.set_num_threads(spec["threads"])
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig
    from megatron_opd.distributed import destroy_distributed, init_distributed
    from megatron_opd.platform import apply_cpu_compat
    from megatron_opd.training.setup import build_components
    from megatron_opd.training.trainer import Trainer

    apply_cpu_compat()
    from megatron_opd.rollout.chunk_scorer import ChunkScorer

    if arm == "ours_prune_every_chunk":
        ChunkScorer._may_defer = lambda self, chunk: False  # read every chunk on its own
    parts = _time_chunk_scorer(ChunkScorer, Trainer)
    config = build_config(OPDConfig, merge_overrides({}, _ours_overrides(spec, arm)))
    groups = init_distributed(config.parallel, seed=config.training.seed)
    torch.set_num_threads(spec["threads"])
    try:
        components = build_components(config, groups)
        # Every row runs the full --new tokens (TRL: min_new_tokens): no EOS id.
        components.engine.eos_token_ids = torch.zeros(0, dtype=torch.long)
        trainer = Trainer(config, groups, components)
        history = trainer.train()
    finally:
        destroy_distributed()
    return [
        {"step": h["time_step_wall_s"], "generate": h["time_rollout_s"],
         "score": h["time_score_s"], "prune": h["time_prune_s"], "train": h["time_train_s"],
         "tokens": h["tokens_generated"], "stopped": h.get("samples_stopped", 0.0),
         "forwards": h.get("teacher_chunk_forwards", 0.0),
         "chunk_forward": part["forward"], "chunk_scoring": part["scoring"]}
        for h, part in zip(history, parts, strict=True)
    ]  # fmt: skip


def _time_chunk_scorer(scorer_class, trainer_class) -> list[dict]:
    """Per training step, seconds inside the chunk scorer's teacher forwards and its scoring
    (top-K op, gather, drift events, stopper): wall-clock wrappers in this process."""
    totals = {"forward": 0.0, "scoring": 0.0}
    steps: list[dict] = []

    def timed(method, key):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start

        return run

    scorer_class._forward = timed(scorer_class._forward, "forward")
    scorer_class._score = timed(scorer_class._score, "scoring")
    train_step = trainer_class.train_step

    def step(self, *args, **kwargs):
        before = dict(totals)
        try:
            return train_step(self, *args, **kwargs)
        finally:
            steps.append({key: totals[key] - before[key] for key in totals})

    trainer_class.train_step = step
    return steps


# --------------------------------------------------------------------------- driver
def _run_arm(arm: str, spec: dict) -> list[dict]:
    """One arm in a fresh process (its own threads, memory and process group)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**spec, "arm": arm}, f)
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", f.name], capture_output=True, text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])},
        )  # fmt: skip
    finally:
        os.unlink(f.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"arm {arm} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _worker(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    arm = spec["arm"]
    steps = _trl_arm(spec) if arm == "trl" else _ours_arm(spec, arm)
    print("RESULT " + json.dumps(steps), flush=True)


def _median(runs: list[list[dict]], key: str, first: int) -> float:
    return statistics.median(step[key] for run in runs for step in run[first - 1 :])


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prune", action="store_true", help="also the Prune-OPD arm")
    parser.add_argument("--quick", action="store_true", help="smoke: 4 steps x 16 tokens")
    parser.add_argument("--arms", default=None, help="comma list (default: all that apply)")
    for name, default in (("rows", 8), ("new", 128), ("steps", 20), ("first-step", 3),
                          ("chunk", 16),
                          ("repeats", 2), ("threads", 2), ("vocab", 512), ("seed", 0)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    if args.quick:
        args.new, args.steps, args.first_step, args.repeats = 16, 4, 2, 1
    arms = ["trl", "ours", "ours_exact_kl"]
    arms += ["ours_prune", "ours_prune_every_chunk"] if args.prune else []
    if args.arms:
        arms = args.arms.split(",")
    print(f"load average before: {_load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = build_work(Path(tmp), vocab=args.vocab, num_prompts=max(64, args.rows * args.steps),
                          seed=args.seed)  # fmt: skip
        spec = {**work, "rows": args.rows, "new": args.new, "steps": args.steps,
                "chunk": args.chunk,
                "threads": args.threads, "vocab": args.vocab, "seed": args.seed}  # fmt: skip
        runs: dict[str, list] = {arm: [] for arm in arms}
        for repeat in range(args.repeats):
            # Alternate the order too, so neither arm always runs right after the other.
            for arm in arms if repeat % 2 == 0 else arms[::-1]:
                runs[arm].append(_run_arm(arm, spec))
                print(f"  repeat {repeat + 1} {arm:<14} done (load {_load()})", flush=True)
    first = args.first_step
    print(
        f"\n{args.rows} sequences x {args.new} new tokens, prompt {work['prompt_len']} tokens, "
        f"V={args.vocab}, student {STUDENT}, teacher {TEACHER}, fp32, {args.threads} threads; "
        f"medians of steps {first}-{args.steps} over {args.repeats} alternated repeat(s)"
    )
    print(f"{'arm':<22} {'step s':>8} {'generate':>9} {'score':>8} {'prune':>7} {'train':>8} "
          f"{'gen tok/s':>10} {'tokens':>7} {'teacher chunk fwd':>18}")  # fmt: skip
    med: dict[str, dict[str, float]] = {}
    for arm in arms:
        keys = ("step", "generate", "score", "train", "tokens") + (
            ("prune", "forwards", "chunk_forward", "chunk_scoring") if arm != "trl" else ()
        )
        med[arm] = {key: _median(runs[arm], key, first) for key in keys}
        m = med[arm]
        print(f"{arm:<22} {m['step']:>8.3f} {m['generate']:>9.3f} {m['score']:>8.3f} "
              f"{m.get('prune', 0.0):>7.3f} {m['train']:>8.3f} "
              f"{m['tokens'] / m['generate']:>10.0f} {m['tokens']:>7.0f} "
              f"{m.get('forwards', 0.0):>18.0f}")  # fmt: skip
    print(f"load average after: {_load()}")
    chunked = [arm for arm in arms if arm.startswith("ours_prune")]
    if chunked and "ours" in med:
        print(f"\nwhere the online stop's time goes (medians per step): the plain arm's SCORE "
              f"stage (the teacher pass fused scoring replaces) {med['ours']['score'] * 1e3:.1f} "
              "ms")  # fmt: skip
        for arm in chunked:
            m = med[arm]
            per = m["chunk_forward"] / max(m["forwards"], 1)
            print(f"  {arm:<22} chunk scorer: teacher forwards {m['chunk_forward'] * 1e3:.1f} "
                  f"ms ({m['forwards']:.0f} x {per * 1e3:.2f} ms), scoring (top-K, gather, "
                  f"drift events, stopper) {m['chunk_scoring'] * 1e3:.1f} ms")  # fmt: skip
    print("\ntargets")
    trl = med.get("trl")
    if trl is not None:
        for arm in (a for a in arms if a != "trl"):
            m = med[arm]
            print(f"  ({arm}: step {m['step'] / trl['step']:.2f}x TRL's | generate "
                  f"{m['generate'] / trl['generate']:.2f}x | score "
                  f"{m['score'] / trl['score']:.2f}x | "
                  f"train {m['train'] / trl['train']:.2f}x)")  # fmt: skip
        for arm in ("ours", "ours_exact_kl"):
            if arm in med:
                ratio = med[arm]["step"] / trl["step"]
                verdict = "PASS" if ratio <= TARGETS[arm] else "MISS"
                print(f"  {verdict} {arm} step / TRL step = {ratio:.2f}x "
                      f"(target <= {TARGETS[arm]}x)")  # fmt: skip
        if "ours" in med:
            ours_rate = med["ours"]["tokens"] / med["ours"]["generate"]
            trl_rate = trl["tokens"] / trl["generate"]
            verdict = "PASS" if ours_rate >= trl_rate else "MISS"
            print(f"  {verdict} generation {ours_rate:.0f} tok/s vs TRL {trl_rate:.0f} tok/s "
                  f"({ours_rate / trl_rate:.2f}x, target >= 1.0x)")  # fmt: skip
    for arm in ("ours_prune", "ours_prune_every_chunk"):
        if arm not in med or "ours" not in med:
            continue
        prune, plain = med[arm], med["ours"]
        ratio = prune["step"] / plain["step"]
        equal = prune["tokens"] == plain["tokens"]
        verdict = "PASS" if ratio <= TARGETS["online_stop"] and equal else "MISS"
        print(f"  {verdict} online stop ({arm}): step {ratio:.2f}x plain OPD's at "
              f"{'equal' if equal else 'UNEQUAL'} generated tokens ({prune['tokens']:.0f} vs "
              f"{plain['tokens']:.0f}), {prune['forwards']:.0f} teacher chunk forwards per "
              f"step; target <= {TARGETS['online_stop']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
