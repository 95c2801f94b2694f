#!/bin/bash
# The GPU check of megatron_opd on one H100/H200 node: Python 3.12, PyTorch with CUDA, a
# GPU, no internet. Transformer Engine and vLLM may be absent (their steps say SKIP).
#
#   1. On a machine with a package index (any Python; pip is told the target):
#        tools/gpu_check.sh --download DIR
#      fetches megatron-core 0.19.x and the pure-Python wheels the project needs beyond
#      such an image (list: megatron_opd/gpu_check/plan.py WHEELS) into DIR.
#   2. On the GPU node, from the repository root, DIR carried along:
#        tools/gpu_check.sh --wheels DIR --out RESULTS [--steps a,b] [--dry-run]
#      installs DIR offline into a scratch folder (PYTHONPATH, nothing system-wide), runs
#      every step in its own process under its time limit (all limits together: under
#      8 min), writes one file per step into RESULTS and one line per step into
#      RESULTS/summary.txt: PASS, FAIL or SKIP <why>. --dry-run prints the plan only.
#
# Steps (megatron_opd/gpu_check/plan.py STEPS): environment report; the suite's CUDA
# tests; bf16 logits of the local spec vs transformers; trainer at TP=1 on NCCL, 3 steps
# and 2 + save + resume + 1; chunked online stop; teacher offload with chunking;
# vocabulary-parallel ops on [8192, 151936] bf16 vs torch.topk + logsumexp; KV-cached
# generation tokens/s at batch 64. Exit status: 0 when no step failed.
set -uo pipefail

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
MODE="" WHEELS="" OUT="" STEPS="" DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --download) MODE=download; WHEELS=${2:?--download needs a folder}; shift 2 ;;
    --wheels) MODE=run; WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --steps) STEPS=${2:?--steps needs a comma list}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
plan() { PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m megatron_opd.gpu_check.plan "$@"; }

if [ "$MODE" = download ]; then
  mkdir -p "$WHEELS"
  command=$(plan download-command "$WHEELS" --python "$PYTHON") || exit 2
  echo "+ $command"
  [ "$DRY_RUN" = 1 ] && exit 0
  eval "$command" || { echo "gpu_check.sh: download failed" >&2; exit 1; }
  ls -1 "$WHEELS"
  exit 0
fi
[ "$MODE" = run ] || usage 2
[ -n "$OUT" ] || { echo "gpu_check.sh: --out RESULTS is required" >&2; exit 2; }
[ -d "$WHEELS" ] || { echo "gpu_check.sh: wheel folder $WHEELS does not exist" >&2; exit 2; }
plan_text=$(plan plan --out "$OUT" ${STEPS:+--steps "$STEPS"}) || exit 2
if [ "$DRY_RUN" = 1 ]; then
  echo "$plan_text"
  exit 0
fi

mkdir -p "$OUT"
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/megatron_opd_gpu_check_site}
rm -rf "$SITE"
install=$(plan install-command "$WHEELS" "$SITE" --python "$PYTHON")
echo "+ $install"
eval "$install" || { echo "gpu_check.sh: offline install from $WHEELS failed" >&2; exit 1; }
export PYTHONPATH="$REPO_DIR:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

summary="$OUT/summary.txt"
{ echo "megatron_opd GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname)"
  echo "$plan_text"; } > "$OUT/plan.txt"
: > "$summary"
failed=0
while read -r name limit output; do
  if [ -n "$STEPS" ] && [[ ",$STEPS," != *",$name,"* ]]; then continue; fi
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$PYTHON" -m megatron_opd.gpu_check run "$name" \
    --out "$OUT" > "$OUT/$name.log" 2>&1
  code=$?
  seconds=$(( $(date +%s) - start ))
  reason=$(tail -n 1 "$OUT/$name.log" 2>/dev/null)
  case $code in
    0) line="PASS $name (${seconds}s) $output" ;;
    3) line="SKIP $name: $reason" ;;
    124|137) line="FAIL $name: over its ${limit}s limit (log: $name.log)"; failed=1 ;;
    *) line="FAIL $name (exit $code): $reason (log: $name.log)"; failed=1 ;;
  esac
  echo "$line" | tee -a "$summary"
done < <(plan limits)
# Optional libraries that are absent: one SKIP line each (from the environment report).
if [ -f "$OUT/environment.json" ]; then
  "$PYTHON" -c 'import json, sys
for name, why in json.load(open(sys.argv[1]))["skips"].items():
    print(f"SKIP {name}: {why}")' "$OUT/environment.json" | tee -a "$summary"
fi
exit $failed
