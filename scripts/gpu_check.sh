#!/usr/bin/env bash
# Every check that needs a GPU, in one call of a few minutes on one GPU (the device machine has torch with CUDA but
# no verl, vLLM or Ray: the checks import ring-ext from this checkout). Results under benchmarks/results/gpu_check/.
#   bash scripts/gpu_check.sh          # on the GPU host
#   DRY_RUN=1 bash scripts/gpu_check.sh  # the same on CPU at tiny sizes, results under /tmp (run before a GPU call)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/plugins/icepop:$PWD/plugins/astate:$PWD/plugins/c3po${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
if [ "${DRY_RUN:-0}" = 1 ]; then
  dev=cpu; sizes=(8x1024); tokens=(2048); gib=(0.05); out=/tmp/gpu_check_dry
else
  dev=cuda; sizes=(64x8192 512x16384 1024x32768); tokens=(16384 65536); gib=(0.5 2); out=benchmarks/results/gpu_check
fi
mkdir -p "$out"
# 1. IcePop's weights and diagnostics at real sizes (kernels, one device sync per call)
timeout 180 "$PY" benchmarks/bench_icepop_mask.py --device "$dev" --sizes "${sizes[@]}" --min-run-time 0.1 \
  --no-verl --out-dir "$out"
# 2. the attention the recipes pick on a GPU: sdpa's dense packed mask vs flash-attn's varlen kernel
timeout 120 "$PY" benchmarks/gpu_attention_check.py --device "$dev" --tokens "${tokens[@]}" --out-dir "$out"
# 3. astate's staged sync between processes on the device (CUDA IPC transport on a GPU)
timeout 240 "$PY" benchmarks/bench_astate_sync.py --device "$dev" --gib "${gib[@]}" --senders 1 2 --repeats 2 \
  --transport shm --out "$out/astate_sync" || echo "astate sync check failed (see above)"
# 4. the GPU writer's copy under sleep mode: a worker pulls a trainer's CUDA IPC view into virtual-memory-backed
#    (expandable-segment) memory, before and after a sleep that replaces its pages; can vm-backed memory be exported?
timeout 180 "$PY" benchmarks/gpu_ipc_check.py --device "$dev" --gib "${gib[@]}" --out "$out" \
  || echo "gpu ipc check failed (see above)"
echo "results in $out"
