"""The config loader: YAML + ``a.b=c`` overrides -> typed dataclasses, with errors that name
the field; field documentation; ``megatron-opd config`` and early failure of ``train``.

Expected values are written by hand here (typed YAML values, field names, docstrings).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from megatron_opd.config.describe import describe_config
from megatron_opd.config.loader import (
    build_config,
    config_to_dict,
    field_docs,
    load_config,
    merge_overrides,
    parse_override,
)
from megatron_opd.config.opd import OPDConfig
from megatron_opd.config.prune import PruneConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny_cpu.yaml"


@dataclass(kw_only=True)
class _Inner:
    """A nested section for the tests."""

    ratio: float = 0.5
    """A ratio.
    Spread over two lines."""

    mode: Literal["a", "b"] = "a"
    """One of two modes."""

    undocumented: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.ratio <= 1:
            raise ValueError(f"inner.ratio must be in [0, 1], got {self.ratio}")


@dataclass(kw_only=True)
class _Outer:
    """A top-level config for the tests."""

    name: str = "x"
    """A name."""

    count: int = 1
    """A count."""

    limit: int | None = None
    """An optional limit."""

    files: list[str] = field(default_factory=list)
    """Some files."""

    inner: _Inner = field(default_factory=_Inner)
    """The nested section."""


# ---------------------------------------------------------------- overrides and typing


@pytest.mark.parametrize(
    ("text", "path", "value"),
    [
        ("rollout.temperature=0.7", ["rollout", "temperature"], 0.7),
        ("training.num_steps=12", ["training", "num_steps"], 12),
        ("logging.tensorboard=false", ["logging", "tensorboard"], False),
        ("prune.drift_budget=null", ["prune", "drift_budget"], None),
        ("eval.datasets=[a.jsonl, b.jsonl]", ["eval", "datasets"], ["a.jsonl", "b.jsonl"]),
        ("student.path=/m/Qwen3-1.7B", ["student", "path"], "/m/Qwen3-1.7B"),
        ("student.path=a=b", ["student", "path"], "a=b"),  # only the first '=' splits
        (" prune.threshold = 0.5 ", ["prune", "threshold"], 0.5),
    ],
)
def test_parse_override_uses_yaml_typing(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("text", ["prune.threshold", "=3", "..=3"])
def test_malformed_override_is_a_value_error(text):
    with pytest.raises(ValueError, match="override"):
        parse_override(text)


def test_merge_overrides_copies_and_creates_sections():
    base = {"prune": {"threshold": 0.7}}
    merged = merge_overrides(base, ["prune.top_k=8", "budget.init_len=2048"])
    assert merged == {"prune": {"threshold": 0.7, "top_k": 8}, "budget": {"init_len": 2048}}
    assert base == {"prune": {"threshold": 0.7}}  # the input is untouched
    with pytest.raises(ValueError, match="'threshold' is a value, not a section"):
        merge_overrides(base, ["prune.threshold.x=1"])


def test_overrides_reach_typed_fields_of_opd_config():
    c = load_config(
        OPDConfig,
        None,
        [
            "rollout.temperature=0.7",
            "prune.mode=truncate",
            "prune.drift_budget=5",
            "eval.datasets=[a.jsonl, b.jsonl]",
            "logging.log_dir=null",
            "training.lr=1e-6",  # PyYAML alone reads this as the string '1e-6'
            "loss.clip_ratio_c=3",  # an int for a float field becomes a float
        ],
    )
    assert c.rollout.temperature == 0.7
    assert c.prune.drift_budget == 5
    assert c.eval.datasets == ["a.jsonl", "b.jsonl"]
    assert c.logging.log_dir is None
    assert c.training.lr == 1e-6 and isinstance(c.training.lr, float)
    assert c.loss.clip_ratio_c == 3.0 and isinstance(c.loss.clip_ratio_c, float)


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("prune:\n  threshold: 0.6\n  top_k: 8\ntraining:\n  lr: 1e-5\n")
    c = load_config(OPDConfig, path, ["prune.top_k=4"])
    assert (c.prune.threshold, c.prune.top_k, c.training.lr) == (0.6, 4, 1e-5)
    assert c.budget.init_len == 1024  # a default (PRUNE_OPD.md section 4)


def test_build_config_nested_optional_list_and_literal():
    c = build_config(
        _Outer,
        {"name": "n", "limit": 3, "files": ["f"], "inner": {"ratio": 1, "mode": "b"}},
    )
    assert c == _Outer(name="n", limit=3, files=["f"], inner=_Inner(ratio=1.0, mode="b"))
    assert isinstance(c.inner.ratio, float)
    assert build_config(_Outer, None) == _Outer()


def test_config_round_trips_through_a_plain_dict():
    c = load_config(OPDConfig, TINY, ["prune.mode=truncate", "prune.drift_budget=7"])
    assert build_config(OPDConfig, config_to_dict(c)) == c


# ---------------------------------------------------------------- errors name the field


def test_unknown_field_names_section_field_and_lists_valid_fields():
    with pytest.raises(ValueError) as info:
        load_config(OPDConfig, None, ["prune.thresold=0.5"])
    message = str(info.value)
    assert "prune.thresold" in message
    assert "valid fields" in message
    for name in ("threshold", "top_k", "w_drop", "w_base"):
        assert name in message


def test_unknown_section_lists_the_sections():
    with pytest.raises(ValueError) as info:
        load_config(OPDConfig, None, ["prun.threshold=0.5"])
    message = str(info.value)
    assert "prun" in message and "valid fields" in message
    for section in ("student", "teacher", "prune", "budget", "rollout", "eval"):
        assert section in message


def test_unknown_nested_field_in_a_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("budget:\n  init_length: 10\n")
    with pytest.raises(ValueError, match=r"budget\.init_length.*valid fields:.*init_len"):
        load_config(OPDConfig, path)


@pytest.mark.parametrize(
    ("override", "field_name", "what"),
    [
        ("rollout.n_samples_per_prompt=four", "rollout.n_samples_per_prompt", "integer"),
        ("rollout.n_samples_per_prompt=2.5", "rollout.n_samples_per_prompt", "integer"),
        ("training.num_steps=true", "training.num_steps", "integer"),
        ("logging.tensorboard=maybe", "logging.tensorboard", "true or false"),
        ("prune.threshold=high", "prune.threshold", "number"),
        ("student.path=3", "student.path", "string"),
        ("eval.datasets=a.jsonl", "eval.datasets", "list"),
        ("eval.datasets=[1]", "eval.datasets[0]", "string"),
        ("loss.kind=bogus", "loss.kind", "topk_reverse_kl_pg"),
        ("prune=3", "prune", "section"),
        ("loss.clip_ratio_c=wide", "loss.clip_ratio_c", "number"),
    ],
)
def test_wrong_type_names_the_field(override, field_name, what):
    with pytest.raises(ValueError) as info:
        load_config(OPDConfig, None, [override])
    message = str(info.value)
    assert field_name in message
    assert what in message


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["prune.threshold=2"], ["prune.threshold"]),
        (["budget.min_len=0"], ["budget.min_len"]),
        (["rollout.top_p=0"], ["rollout.top_p"]),
        (["eval.k=0"], ["eval.k"]),
        (["parallel.sequence_parallel=true"], ["sequence_parallel", "tensor_parallel_size"]),
        # ModelConfig is used for two sections: the section is named too.
        (["teacher.dtype=float16"], ["teacher", "dtype", "bfloat16"]),
        # A cross-section check of OPDConfig itself.
        (["budget.min_len=2048", "rollout.max_new_tokens=1000"], ["budget.min_len"]),
        # Was clamped silently: the budget could never reach its max_len.
        (
            ["budget.max_len=4096", "rollout.max_new_tokens=2048", "budget.min_len=1024"],
            ["budget.max_len", "rollout.max_new_tokens"],
        ),
    ],
)
def test_bad_value_from_post_init_names_the_field(overrides, words):
    with pytest.raises(ValueError) as info:
        load_config(OPDConfig, None, overrides)
    for word in words:
        assert word in str(info.value)


def test_post_init_error_of_a_nested_section_gets_the_section_prefix():
    with pytest.raises(ValueError, match=r"inner\.ratio must be in \[0, 1\]"):
        build_config(_Outer, {"inner": {"ratio": 2}})


def test_missing_file_and_invalid_yaml_are_clear(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=r"nope\.yaml does not exist"):
        load_config(OPDConfig, missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  threshold: [0.7\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML"):
        load_config(OPDConfig, bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- prune\n- budget\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(OPDConfig, listing)


def test_empty_file_gives_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    assert load_config(OPDConfig, empty) == OPDConfig()


# ---------------------------------------------------------------- documentation


def test_field_docs_reads_the_docstring_under_each_field():
    docs = field_docs(_Inner)
    assert docs == {"ratio": "A ratio. Spread over two lines.", "mode": "One of two modes."}
    assert field_docs(PruneConfig)["threshold"].startswith("tau of the overlap metric")


def _dotted_fields(cls: type, prefix: str = "") -> list[str]:
    names = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            names.extend(_dotted_fields(type(default), prefix + f.name + "."))
        else:
            names.append(prefix + f.name)
    return names


def test_describe_config_lists_every_field_with_its_documentation():
    config = load_config(OPDConfig, TINY)
    lines = describe_config(config).splitlines()
    described = {}
    for line in lines:
        if line.startswith("["):
            continue
        name, rest = line.split(" = ", 1)
        value, doc = rest.split("  # ", 1)
        described[name] = (value, doc)
    expected = _dotted_fields(OPDConfig)
    assert len(expected) > 80
    assert sorted(described) == sorted(expected)
    undocumented = [name for name, (_, doc) in described.items() if not doc.strip()]
    assert undocumented == []
    assert described["prune.threshold"][0] == "0.9"
    assert described["student.path"][0] == "'demo_out/assets/student'"
    sections = [line for line in lines if line.startswith("[")]
    assert sections[0].startswith("[student]  # ") and len(sections[0]) > len("[student]  # ")


# ---------------------------------------------------------------- command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_config_prints_every_field():
    result = _cli("config", "--config", "examples/tiny_cpu.yaml", "prune.top_k=6")
    assert result.returncode == 0, result.stderr
    assert "prune.threshold = 0.9" in result.stdout
    assert "prune.top_k = 6" in result.stdout
    assert "budget.init_len = 64" in result.stdout


def test_cli_train_rejects_a_bad_value_before_any_process_group():
    start = time.monotonic()
    result = _cli("train", "--config", "examples/tiny_cpu.yaml", "prune.threshold=2")
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "config error" in result.stderr and "prune.threshold" in result.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"


def test_train_never_starts_with_a_bad_config(monkeypatch, capsys):
    """In process: the training entry (which creates the process groups) is not reached.

    A stand-in ``megatron_opd.train`` module fails the test if the CLI ever imports it
    and calls ``run_training`` (it also keeps torch/Megatron out of this fast test).
    """
    import types

    from megatron_opd import cli
    from megatron_opd.training import preflight

    def must_not_run(config, **kwargs):
        raise AssertionError("run_training was called with an invalid config")

    stand_in = types.ModuleType("megatron_opd.train")
    stand_in.run_training = must_not_run
    monkeypatch.setitem(sys.modules, "megatron_opd.train", stand_in)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config", str(TINY), "prune.threshold=2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "config error" in err and "prune.threshold" in err

    # The stand-in is really what the CLI would call: a valid config (whose files the
    # pre-flight checks would not find here, so they are stubbed) reaches it.
    monkeypatch.setattr(preflight, "preflight_training", lambda config, world_size: None)
    with pytest.raises(AssertionError, match="run_training was called"):
        cli.main(["train", "--config", str(TINY)])
