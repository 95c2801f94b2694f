"""Command-line entry points of the conversion (``megatron-opd convert ...`` and tools/).

Each runs either under a launcher (torchrun or srun; the world size must be a multiple of
TP x PP) or as a single process (TP=PP=1; a dist checkpoint written at TP=1 loads at any
TP/PP). Each returns a process exit code; bad arguments exit with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megatron_opd.config.parallel import ParallelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--tp 0`` is a mistake, not a layout)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _init(tp: int, pp: int):
    from megatron_opd.distributed import init_distributed
    from megatron_opd.launch_env import launch_world_size

    world_size = launch_world_size()
    if world_size == 1 and tp * pp != 1:
        print(
            f"single process: converting at TP=1, PP=1 instead of TP={tp}, PP={pp} "
            "(the dist checkpoint loads at any TP/PP); start TP x PP processes (torchrun, "
            "srun) for that layout",
            file=sys.stderr,
        )
        tp = pp = 1
    if world_size % (tp * pp):
        raise SystemExit(
            f"error: {world_size} processes cannot hold --tp {tp} x --pp {pp} = {tp * pp} "
            f"shards; start a multiple of {tp * pp} processes (srun --ntasks, torchrun "
            "--nproc-per-node)"
        )
    config = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp, timeout_seconds=600)
    return init_distributed(config)


def _finish() -> None:
    from megatron_opd.distributed import destroy_distributed

    destroy_distributed()


def main_hf_to_megatron(argv: list[str] | None = None) -> int:
    """HF directory -> converted Megatron (dist_checkpointing) checkpoint."""
    parser = argparse.ArgumentParser(
        prog="convert_hf_to_megatron",
        description="Convert an HF llama/qwen2/qwen3 checkpoint into a Megatron dist checkpoint.",
    )
    parser.add_argument(
        "--hf-dir", required=True, help="HF model directory (config.json, *.safetensors)"
    )
    parser.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    from megatron_opd.conversion.megatron_ckpt import convert_hf_to_megatron

    groups = _init(args.tp, args.pp)
    try:
        out = convert_hf_to_megatron(
            args.hf_dir,
            args.out,
            groups,
            dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            overwrite=args.overwrite,
        )
        if groups.rank == 0:
            print(f"wrote Megatron checkpoint {out}")
    finally:
        _finish()
    return 0


def main_megatron_to_hf(argv: list[str] | None = None) -> int:
    """Converted Megatron checkpoint -> HF directory."""
    parser = argparse.ArgumentParser(
        prog="convert_megatron_to_hf",
        description="Convert a Megatron checkpoint written by convert_hf_to_megatron back to HF.",
    )
    parser.add_argument("--megatron-dir", required=True, help="converted Megatron checkpoint")
    parser.add_argument("--out", required=True, help="output HF directory (must not exist)")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="written dtype (default: the checkpoint's)")  # fmt: skip
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    from megatron_opd.conversion.megatron_ckpt import convert_megatron_to_hf

    groups = _init(args.tp, args.pp)
    try:
        out = convert_megatron_to_hf(
            args.megatron_dir,
            args.out,
            groups,
            dtype=_DTYPES[args.dtype] if args.dtype else None,
            max_shard_bytes=int(args.max_shard_gb * 1024**3),
            overwrite=args.overwrite,
        )
        if groups.rank == 0:
            print(f"wrote HF checkpoint {out}")
    finally:
        _finish()
    return 0


def main_verify(argv: list[str] | None = None) -> int:
    """Same tokens through transformers and the Megatron model: max |logit diff| and KL."""
    parser = argparse.ArgumentParser(
        prog="verify_conversion",
        description="Compare logits of transformers and Megatron on the same input; PASS/FAIL.",
    )
    parser.add_argument("--hf-dir", required=True, help="HF model directory (the reference)")
    parser.add_argument("--megatron-dir", default=None,
                        help="converted checkpoint (default: load --hf-dir)")  # fmt: skip
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
    parser.add_argument("--seq-len", type=positive_int, default=32)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atol", type=float, default=1e-3, help="max |logit diff| to PASS")
    args = parser.parse_args(argv)
    from megatron_opd.config.model import ModelConfig
    from megatron_opd.conversion.logits import gather_full_logits
    from megatron_opd.conversion.megatron_ckpt import load_model_weights
    from megatron_opd.launch_env import launch_rank
    from megatron_opd.models.builder import build_model
    from megatron_opd.models.hf_config import read_model_info

    vocab_size = read_model_info(args.hf_dir).vocab_size
    if args.megatron_dir is not None:
        other = read_model_info(args.megatron_dir).vocab_size
        if other != vocab_size:
            raise SystemExit(
                f"error: --hf-dir {args.hf_dir} has a vocabulary of {vocab_size} ids and "
                f"--megatron-dir {args.megatron_dir} one of {other}: they are not the same "
                "model; pass the Megatron checkpoint converted from --hf-dir"
            )
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab_size, (args.batch, args.seq_len), generator=generator)
    hf_logits = None
    if launch_rank() == 0:
        # The reference runs before Megatron exists in this process: a transformers model
        # loaded after a Megatron build under the CPU compat layer got garbage RoPE buffers.
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            hf_logits = hf_model(ids).logits.float()
        del hf_model
    groups = _init(args.tp, args.pp)
    try:
        model_config = ModelConfig(path=args.megatron_dir or args.hf_dir, transformer_impl="local")
        chunks, info = build_model(model_config, groups, role="teacher")
        load_model_weights(chunks, model_config, info, groups)
        megatron_logits = gather_full_logits(chunks, ids, info, groups)
        if groups.rank != 0:
            return 0
        max_diff = (hf_logits - megatron_logits).abs().max().item()
        hf_logp = torch.log_softmax(hf_logits, -1)
        mg_logp = torch.log_softmax(megatron_logits, -1)
        kl = (hf_logp.exp() * (hf_logp - mg_logp)).sum(-1).mean().item()
        verdict = "PASS" if max_diff <= args.atol else "FAIL"
        print(
            f"{verdict} max_abs_logit_diff={max_diff:.3e} kl_hf_megatron={kl:.3e} atol={args.atol}"
        )
        return 0 if verdict == "PASS" else 1
    finally:
        _finish()
