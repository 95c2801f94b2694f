"""The single-node GPU check (``tools/gpu_check.sh``): what runs, and where results go.

One H100/H200 node with Python 3.12, PyTorch and a GPU but no internet. The wheels the
project needs beyond what such an image holds (megatron-core 0.19.x, math-verify and its
parser) are fetched beforehand with ``tools/gpu_check.sh --download DIR`` and installed
offline into a scratch directory. Then every step of :data:`~megatron_opd.gpu_check.plan.STEPS`
runs in its own process under a time limit and writes ``<step>.json`` (or ``.txt``) into
the output folder, and ``summary.txt`` gets one ``PASS`` / ``FAIL`` / ``SKIP <why>`` line
per step (Transformer Engine or vLLM being absent is a SKIP, not a failure).

Modules: :mod:`.plan` (steps, time limits, wheel list; standard library only, so the
download runs on any Python), :mod:`.environment`, :mod:`.numerics` (bf16 logits against
transformers, vocabulary-parallel ops against torch), :mod:`.generation` (KV-cached
tokens/s), :mod:`.training` (trainer on NCCL with save and resume, chunked online stop,
teacher offload with chunking). Each check takes its sizes and device as arguments, so
the tests run them small on CPU.
"""
