"""Bad input to the conversion fails with a ValueError that says what is wrong (1 process)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_opd.conversion.hf_io import (
    SafetensorsReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
)
from megatron_opd.conversion.hf_loader import validate_hf_checkpoint
from megatron_opd.models.builder import check_parallel_layout
from megatron_opd.models.hf_config import read_model_info
from megatron_opd.models.megatron_checkpoint import read_conversion_metadata
from megatron_opd.models.tiny import make_tiny_hf_model
from megatron_opd.models.vocab import check_vocab_compatible


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=3)


def _rewrite(src, dst, edit):
    dst.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _validate(path):
    with SafetensorsReader(path) as reader:
        validate_hf_checkpoint(reader, read_model_info(path))


def test_valid_checkpoint_passes_and_sharded_read_equals_single_file(qwen2_dir, tmp_path):
    _validate(qwen2_dir)
    state = load_file(qwen2_dir / "model.safetensors")
    (tmp_path / "config.json").write_bytes((qwen2_dir / "config.json").read_bytes())
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=30_000)
    for name, tensor in state.items():
        writer.add(name, tensor)
    files = writer.close()
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    _validate(tmp_path)
    with SafetensorsReader(tmp_path) as reader:
        assert reader.names() == set(state)
        for name, tensor in state.items():
            assert torch.equal(reader.read(name), tensor)
        name = "model.layers.1.mlp.up_proj.weight"
        assert torch.equal(reader.read(name, 1, 5, 9), state[name][:, 5:9])


def test_missing_extra_and_misshapen_tensors_are_named(qwen2_dir, tmp_path):
    missing = _rewrite(
        qwen2_dir, tmp_path / "missing", lambda s: s.pop("model.layers.1.self_attn.k_proj.bias")
    )
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj"):
        _validate(missing)

    def add_extra(state):
        state["model.layers.2.mlp.gate_proj.weight"] = torch.zeros(128, 64)

    extra = _rewrite(qwen2_dir, tmp_path / "extra", add_extra)
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.2\.mlp\.gate_proj"):
        _validate(extra)

    def reshape(state):
        state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 96)

    bad_shape = _rewrite(qwen2_dir, tmp_path / "shape", reshape)
    with pytest.raises(
        ValueError, match=r"down_proj.weight has shape \[64, 96\], expected \[64, 128\]"
    ):
        _validate(bad_shape)


def test_unsupported_architecture_is_named_with_the_supported_ones(qwen2_dir, tmp_path):
    config = json.loads((qwen2_dir / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="MistralForCausalLM.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    ):
        read_model_info(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        read_model_info(tmp_path / "nowhere")


def test_tp_that_does_not_divide_heads_is_refused(qwen2_dir):
    info = read_model_info(qwen2_dir)  # 4 heads, 2 kv heads
    check_parallel_layout(info, SimpleNamespace(tp_size=2, pp_size=2))
    with pytest.raises(
        ValueError, match="tensor_parallel_size=4 does not divide num_key_value_heads=2"
    ):
        check_parallel_layout(info, SimpleNamespace(tp_size=4, pp_size=1))
    with pytest.raises(
        ValueError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"
    ):
        check_parallel_layout(info, SimpleNamespace(tp_size=3, pp_size=1))
    with pytest.raises(ValueError, match="pipeline_parallel_size=3"):
        check_parallel_layout(info, SimpleNamespace(tp_size=1, pp_size=3))


def test_vocab_compatibility(qwen2_dir, tmp_path):
    same = make_tiny_hf_model(tmp_path / "same", "qwen3", seed=1)
    check_vocab_compatible(same, qwen2_dir)
    bigger = make_tiny_hf_model(tmp_path / "bigger", "llama", seed=1, vocab_size=260)
    with pytest.raises(
        ValueError, match="vocab_size in config.json differs: student 250, teacher 260"
    ):
        check_vocab_compatible(qwen2_dir, bigger)
    other = tmp_path / "other_tokenizer"
    other.mkdir()
    (other / "config.json").write_bytes((qwen2_dir / "config.json").read_bytes())
    tokenizer = json.loads((qwen2_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["t3"], vocab["t4"] = vocab["t4"], vocab["t3"]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="tokenizer.json differs"):
        check_vocab_compatible(qwen2_dir, other)
    (other / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json exists only in the student"):
        check_vocab_compatible(qwen2_dir, other)


def test_interrupted_conversion_leaves_no_complete_looking_output(tmp_path):
    out = tmp_path / "converted"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_output_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "x").write_text("done")
    assert (out / "x").read_text() == "done"
    with pytest.raises(ValueError, match="already exists"):
        with atomic_output_dir(out):
            pass
    # A Megatron checkpoint whose writer died before COMPLETE is refused.
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "conversion.json").write_text("{}")
    with pytest.raises(ValueError, match="incomplete"):
        read_conversion_metadata(tmp_path / "ckpt")


def test_cli_entry_points_have_help(capsys):
    from megatron_opd.conversion.cli import main_hf_to_megatron, main_megatron_to_hf, main_verify

    for main, flag in ((main_hf_to_megatron, "--hf-dir"), (main_megatron_to_hf, "--megatron-dir"),
                       (main_verify, "--atol")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out


def test_cli_refuses_non_positive_layouts_and_mismatched_models(tmp_path, capsys):
    from megatron_opd.conversion.cli import main_hf_to_megatron, main_verify

    for flag in ("--tp", "--pp"):
        with pytest.raises(SystemExit) as exit_info:
            main_hf_to_megatron(["--hf-dir", "x", "--out", "y", flag, "0"])
        assert exit_info.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err
    # Two models of different vocabularies: one line, before any process group (it used to
    # end in a tensor-size error after both models were built).
    small = make_tiny_hf_model(tmp_path / "small", "qwen2", seed=1)
    large = make_tiny_hf_model(tmp_path / "large", "qwen2", seed=1, vocab_size=200)
    with pytest.raises(SystemExit) as exit_info:
        main_verify(["--hf-dir", str(small), "--megatron-dir", str(large)])
    message = str(exit_info.value.code)
    assert message.startswith("error: --hf-dir") and "vocabulary of" in message
    assert "200" in message and "not the same model" in message


def test_verify_cli_runs_a_real_comparison(qwen2_dir):
    """The verify tool end to end in its own process: transformers vs Megatron -> PASS."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run(
        [sys.executable, "tools/verify_conversion.py", "--hf-dir", str(qwen2_dir)],
        env={**env, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("PASS max_abs_logit_diff=")
