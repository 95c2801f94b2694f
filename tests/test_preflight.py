"""Mistakes found before any process group: each is one ValueError naming the field or
file and the fix (megatron_opd/training/preflight.py), and the CLI prints it once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from megatron_opd.testing.tiny_run import make_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    return root, make_tiny_run(root / "run")


def _config(overrides):
    from megatron_opd.config.loader import build_config, merge_overrides
    from megatron_opd.config.opd import OPDConfig

    return build_config(OPDConfig, merge_overrides({}, overrides))


def _preflight(overrides, world_size=1):
    from megatron_opd.training.preflight import preflight_training

    return preflight_training(_config(overrides), world_size=world_size)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_good_run_passes_and_hands_on_what_it_read(tiny):
    root, run = tiny
    prepared = _preflight([*run, f"checkpoint.save_dir={root / 'ckpt'}"])
    assert len(prepared.prompts) == 64 and prepared.resume_from is None
    assert prepared.tokenizer.vocab_size > 0
    assert not (root / "ckpt").exists()  # checked, not created


def _model_without_weights(root, run):
    target = root / "no_weights"
    if not target.exists():
        shutil.copytree(run[0].split("=", 1)[1], target)
        (target / "model.safetensors").unlink()
    return target


def _teacher_with_other_tokenizer(root, run):
    from megatron_opd.data.chain_task import train_task_tokenizer

    teacher = run[1].split("=", 1)[1]
    target = root / "other_tokenizer"
    if not target.exists():
        shutil.copytree(teacher, target)
        other = train_task_tokenizer(root / "other_tok", seed=7, num_corpus_problems=300)
        shutil.copy(other, target / "tokenizer.model")
    return target


CASES = {
    "student path": (lambda r, run: ["student.path=/nonexistent/model"],
                     r"student.path=/nonexistent/model does not exist"),
    "no config.json": (lambda r, run: [f"teacher.path={r}"], r"teacher.path=.*has no config.json"),
    "no weights": (lambda r, run: [f"student.path={_model_without_weights(r, run)}"],
                   r"student.path=.*no_weights: .*has neither model.safetensors"),
    "vocabulary": (lambda r, run: [f"teacher.path={_teacher_with_other_tokenizer(r, run)}"],
                   r"do not share a vocabulary: tokenizer.model differs"),
    "top_k": (lambda r, run: ["prune.top_k=100000"], r"prune.top_k=100000 is larger than"),
    "train file": (lambda r, run: [f"data.train_path={r / 'missing.jsonl'}"],
                   r"data.train_path: data file .*missing.jsonl does not exist"),
    "train key": (lambda r, run: ["data.answer_key=gold"],
                  r"missing field 'gold' .*; set data.answer_key to the field"),
    "prompt length": (lambda r, run: ["data.max_prompt_length=3"],
                      r"prompt has \d+ tokens .* more than data.max_prompt_length=3"),
    "context": (lambda r, run: ["rollout.max_new_tokens=600", "budget.max_len=600"],
                r"exceeds the student's context of 512 tokens"),
    "too few prompts": (lambda r, run: ["data.prompts_per_step=128"],
                        r"has 64 prompts, fewer than prompts_per_step=128"),
    "save_dir below a file": (
        lambda r, run: [f"checkpoint.save_dir={r / 'run/prompts.jsonl/ckpt'}"],
        r"checkpoint.save_dir=.* cannot be created: .*prompts.jsonl is a file"),
    "save_dir unwritable": (lambda r, run: ["checkpoint.save_dir=/proc/megatron-opd-ckpt"],
                            r"checkpoint.save_dir=/proc/megatron-opd-ckpt is not writable"),
    "log_dir unwritable": (lambda r, run: ["logging.log_dir=/proc/megatron-opd-logs"],
                           r"logging.log_dir=/proc/megatron-opd-logs is not writable"),
    "export dir exists": (
        lambda r, run: [f"checkpoint.export_hf_dir={r / 'run'}"],
        r"export_hf_dir=.* already exists; .* set checkpoint.export_hf_overwrite=true"),
    "load_dir empty": (lambda r, run: [f"checkpoint.load_dir={r / 'run'}"],
                       r"checkpoint.load_dir=.* holds no complete checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_mistake_is_found_before_any_process_group(tiny, case):
    root, run = tiny
    overrides, message = CASES[case]
    with pytest.raises(ValueError, match=message):
        _preflight([*run, *overrides(root, run)])


@pytest.mark.parametrize(
    ("world_size", "layout", "message"),
    [
        (3, ["parallel.tensor_parallel_size=2"], r"3 processes do not divide into .* = 2"),
        (
            3,
            ["parallel.tensor_parallel_size=3", "data.prompts_per_step=3"],
            r"student.path=.*tensor_parallel_size=3 does not divide num_attention_heads=4",
        ),
        (3, [], r"data.prompts_per_step \(2\) must be divisible by the data-parallel size 3"),
        (2, ["training.num_mini_batches=3"], r"training.num_mini_batches \(3\) must divide"),
    ],
)
def test_layout_mistakes_are_found_from_the_launch_size(tiny, world_size, layout, message):
    root, run = tiny
    with pytest.raises(ValueError, match=message):
        _preflight([*run, *layout], world_size=world_size)


def test_eval_sets_are_read_with_their_own_keys(tiny, tmp_path):
    root, run = tiny
    aime = _write_jsonl(tmp_path / "aime.jsonl", [{"question": "1+1?", "solution": "2"}])
    with pytest.raises(ValueError, match=r"eval.datasets: .*aime.jsonl:1: missing field 'problem'.*"
                                         r"set eval.problem_key"):  # fmt: skip
        _preflight([*run, f"eval.datasets=[{aime}]"])
    with pytest.raises(ValueError, match=r"missing field 'answer'.*set eval.answer_key"):
        _preflight([*run, f"eval.datasets=[{aime}]", "eval.problem_key=question"])
    _preflight([*run, f"eval.datasets=[{aime}]", "eval.problem_key=question",
                "eval.answer_key=solution"])  # fmt: skip


def test_an_existing_export_dir_may_be_replaced_when_asked(tiny):
    root, run = tiny
    _preflight(
        [*run, f"checkpoint.export_hf_dir={root / 'run'}", "checkpoint.export_hf_overwrite=true"]
    )


def test_the_cli_prints_one_error_line_on_rank_zero_and_creates_nothing(tiny, tmp_path):
    """An unwritable save_dir used to be found after the last step, losing the run. Every
    rank runs the checks; rank 0 prints the error at once; another rank prints it only
    after a grace period (under srun/torchrun it is killed before, once rank 0 failed),
    so a failure on that rank alone is not silent."""
    root, run = tiny
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = [*run, f"checkpoint.save_dir={blocker / 'ckpt'}", f"logging.log_dir={tmp_path / 'logs'}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    outputs = {}
    for rank in (0, 1):
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "megatron_opd.cli", "train", *bad],
            env={**env, "RANK": str(rank), "WORLD_SIZE": "2", "PYTHONWARNINGS": "ignore",
                 "MEGATRON_OPD_ERROR_GRACE_S": "3"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        elapsed = time.monotonic() - start
        outputs[rank] = (done.returncode, [ln for ln in done.stderr.splitlines() if ln.strip()])
        assert elapsed < 120, f"took {elapsed:.0f} s"
        assert rank == 0 or elapsed >= 3, elapsed
    message = (
        f"error: checkpoint.save_dir={blocker / 'ckpt'} cannot be created: {blocker} is a "
        "file, not a directory"
    )
    assert outputs[0] == (2, [message])
    assert outputs[1] == (2, [f"[rank 1] {message}"])
    assert not (tmp_path / "logs").exists()
