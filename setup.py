"""megatron-opd: Prune-OPD on-policy distillation on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-opd",
    version="0.1.0",
    description=(
        "On-policy distillation (Prune-OPD) for long-horizon reasoning models on Megatron-Core"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_opd", "megatron_opd.*"]),
    install_requires=[
        # CPU installs pin torch==2.13.0 on the command line (see README); a bare newer
        # torch requirement would pull a multi-GB CUDA build.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        # dist_checkpointing's forked writer needs psutil (it is not declared upstream).
        "psutil",
        "numpy",
        "sentencepiece",
        "pyyaml",
        "safetensors",
        # HF configs, tokenizers and the demo's SFT models; conversion writes HF checkpoints.
        "transformers>=4.51",
        # Prompt and evaluation sets in parquet (DAPO-Math-17k ships as parquet).
        "pyarrow",
        "tqdm",
        "math-verify>=0.9",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        # NVIDIA apex is never listed: the PyPI package of that name is an unrelated web toolkit.
        # Cluster containers ship NVIDIA apex; megatron_opd.platform detects it at run time.
        "gpu": ["transformer-engine[pytorch]", "vllm"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
        # bench/vs_trl.py runs TRL's DistillationTrainer beside ours; install with the CPU pin
        # (pip install torch==2.13.0 -e '.[bench]') so TRL never pulls another torch.
        "bench": ["trl>=1.16"],
    },
    entry_points={"console_scripts": ["megatron-opd=megatron_opd.cli:main"]},
)
