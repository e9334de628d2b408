#!/usr/bin/env bash
# The train stage's GPU checks, for a machine with one CUDA GPU and no Ray: full vs LoRA vs QLoRA on a
# ~1.1B Llama (benchmarks/train.py --gpu) and the gpu-marked tests (LoRA and QLoRA through the stage's
# own functions in one process). Needs torch with CUDA, transformers, peft, accelerate; QLoRA needs
# bitsandbytes (importable, e.g. from PYTHONPATH). Logs go to $OUT (default /tmp/alpaca-ray-gpu-check).
# About 3-4 minutes on an H200; each part has its own time limit so the whole stays under 6.
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/alpaca-ray-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || echo "bitsandbytes: not importable (QLoRA rows and tests are skipped)"
  python3 -c "import ray" 2>/dev/null && echo "ray: importable" || echo "ray: not installed (not needed here)"
} 2>&1 | tee "$OUT/versions.txt"

status=0
echo "== benchmarks/train.py --gpu ==" | tee "$OUT/train_gpu_benchmark.log"
timeout 210 python3 benchmarks/train.py --gpu --steps 20 --micro 4 2>&1 | tee -a "$OUT/train_gpu_benchmark.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== pytest -m gpu ==" | tee "$OUT/pytest_gpu.log"
timeout 150 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -o addopts="" tests/gpu/test_train_adapters_gpu.py \
  2>&1 | tee -a "$OUT/pytest_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "exit status $status (logs in $OUT)"
exit $status
