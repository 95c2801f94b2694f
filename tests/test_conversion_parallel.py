"""HF <-> Megatron conversion proven against transformers, over TP/PP layouts (gloo, CPU).

References are independent: logits from transformers' own forward on the saved HF
model, and the original safetensors bytes for the round trip. One ``run_distributed``
call per world size covers all families and layouts.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_opd.models.tiny import make_tiny_hf_model
from megatron_opd.testing.multiprocess import run_distributed

FAMILIES = {"qwen3": True, "qwen2": False, "llama": False}
"""family -> tie_word_embeddings of its tiny model (both cases covered)."""
TOLERANCE = 1e-4


def _state(path):
    files = sorted(path.glob("*.safetensors"))
    state = {}
    for file in files:
        state.update(load_file(file))
    return state


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    ids = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(7))
    models = {}
    for seed, (family, tied) in enumerate(FAMILIES.items()):
        path = make_tiny_hf_model(root / family, family, seed=seed, tie_word_embeddings=tied)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            models[family] = (str(path), model(ids).logits)
    return root, ids, models


def _init(tp, pp):
    import multiprocessing

    # The pool's workers are daemonic; dist_checkpointing's save starts a Manager process,
    # which a daemonic process may not. The workers are torn down with the pool anyway.
    multiprocessing.current_process()._config["daemon"] = False
    from megatron_opd.config.parallel import ParallelConfig
    from megatron_opd.distributed import init_distributed

    return init_distributed(ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp))


def _build_load_logits(path, ids, tp, pp):
    from megatron_opd.config.model import ModelConfig
    from megatron_opd.conversion import gather_full_logits, load_model_weights
    from megatron_opd.models import build_model

    groups = _init(tp, pp)
    model_config = ModelConfig(path=str(path))
    chunks, info = build_model(model_config, groups)
    load_model_weights(chunks, model_config, info, groups)
    return groups, chunks, info, gather_full_logits(chunks, ids, info, groups)


def _two_ranks(models, ids, out_root):
    import torch.distributed as dist

    from megatron_opd.conversion import (
        convert_hf_to_megatron,
        convert_megatron_to_hf,
        export_hf_from_model,
    )
    from megatron_opd.conversion import export as export_module

    logits = {}
    for family, path in models.items():
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            groups, chunks, info, out = _build_load_logits(path, ids, tp, pp)
            logits[(family, tp, pp)] = out
        if family == "qwen3":
            # Model loaded at TP=1,PP=2: export with tiny shards (index.json path).
            export_hf_from_model(
                chunks, f"{out_root}/export_pp2", info, groups, max_shard_bytes=40_000
            )
            # An export that fails midway on rank 0 leaves no output directory.
            original = export_module.write_hf_config_files
            if groups.rank == 0:
                export_module.write_hf_config_files = _raise_interrupted
            try:
                export_hf_from_model(chunks, f"{out_root}/interrupted", info, groups)
            except RuntimeError:
                dist.barrier()
            finally:
                export_module.write_hf_config_files = original
    # HF -> Megatron at TP=2, back to HF at TP=1,PP=2 (a resharded load), and logits.
    convert_hf_to_megatron(models["qwen2"], f"{out_root}/qwen2_mcore", _init(2, 1))
    *_, resharded = _build_load_logits(f"{out_root}/qwen2_mcore", ids, 1, 2)
    logits[("qwen2_mcore", 1, 2)] = resharded
    convert_megatron_to_hf(f"{out_root}/qwen2_mcore", f"{out_root}/qwen2_back", _init(1, 2))
    return logits


def _raise_interrupted(*args, **kwargs):
    raise RuntimeError("simulated interruption")


def test_two_rank_layouts_match_transformers_and_round_trip(tiny_models):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    root, ids, models = tiny_models
    paths = {family: path for family, (path, _) in models.items()}
    results = run_distributed(_two_ranks, 2, paths, ids, str(root), timeout_s=300)
    logits = results[0]
    assert len(logits) == 10
    for (family, tp, pp), value in logits.items():
        reference = models["qwen2" if family == "qwen2_mcore" else family][1]
        assert value.shape == reference.shape, (family, tp, pp)
        diff = (value - reference).abs().max().item()
        assert diff < TOLERANCE, f"{family} TP={tp} PP={pp}: max |logit diff| {diff:.2e}"
    # Round trips are bitwise: HF -> Megatron (TP1,PP2) -> HF, and via a dist checkpoint.
    for name, source in (("export_pp2", "qwen3"), ("qwen2_back", "qwen2")):
        out = root / name
        original, exported = _state(root / source), _state(out)
        assert sorted(original) == sorted(exported), name
        for key in original:
            assert torch.equal(original[key], exported[key]), (name, key)
        assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
        assert (out / "tokenizer.json").is_file()
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, models[source][1])
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
        assert tokenizer("t5 t7")["input_ids"] == [5, 7]
    index = json.loads((root / "export_pp2" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (root / "interrupted").exists()
    assert not list(root.glob("interrupted.tmp-*"))


def _four_ranks(models, ids, out_root):
    from megatron_opd.conversion import save_megatron_checkpoint

    logits = {}
    for family, path in models.items():
        groups, chunks, info, out = _build_load_logits(path, ids, 2, 2)
        logits[(family, 2, 2)] = out
    # The llama model (untied, scaled RoPE) saved at TP=2,PP=2 reloads at TP=1,PP=1.
    save_megatron_checkpoint(chunks, f"{out_root}/llama_tp2pp2", info, groups)
    *_, out = _build_load_logits(f"{out_root}/llama_tp2pp2", ids, 1, 1)
    logits[("llama_resharded", 1, 1)] = out
    return logits


def test_four_rank_tp2_pp2_and_resharding(tiny_models):
    root, ids, models = tiny_models
    paths = {family: path for family, (path, _) in models.items()}
    logits = run_distributed(_four_ranks, 4, paths, ids, str(root), timeout_s=400)[0]
    assert len(logits) == 4
    for (family, tp, pp), value in logits.items():
        reference = models[family.removesuffix("_resharded")][1]
        diff = (value - reference).abs().max().item()
        assert diff < TOLERANCE, f"{family} TP={tp} PP={pp}: max |logit diff| {diff:.2e}"
    metadata = json.loads((root / "llama_tp2pp2" / "conversion.json").read_text())
    assert metadata["written_with"] == {"tp": 2, "pp": 2}
