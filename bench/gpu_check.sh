#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (synthetic data only; nothing is downloaded):
#   1. the demo end to end with accelerator/precision 'auto' (CUDA, bf16-mixed): training, the
#      post-training suite and TTA in bf16, guard, evaluation, explanation panels, report;
#   2. bench/device_parity.py on the demo's checkpoint: CPU fp32 vs CPU bf16 vs CUDA fp32 vs CUDA bf16;
#   3. the test suite on that machine (accelerator 'auto' picks the GPU), minus the web service tests.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (a Python with PyTorch + CUDA and the package's deps)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
$PY -c "import torch, torchvision, lightning; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'lightning', lightning.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
start=$(date +%s)
timeout 150 $PY -m chexformer demo --out-dir /tmp/gpu_demo > "$OUT/demo.log" 2>&1
echo "1. demo rc=$? in $(( $(date +%s) - start )) s"
grep -E "precision|robustness suite|scored in|test split|finished|Error|error" "$OUT/demo.log" | head -20
cp /tmp/gpu_demo/summary.json "$OUT/demo_summary.json" 2>/dev/null
cp /tmp/gpu_demo/validation_shift_suite.json "$OUT/demo_validation_shift_suite.json" 2>/dev/null
echo "2. device parity"
timeout 90 $PY bench/device_parity.py /tmp/gpu_demo/checkpoints/best.ckpt /tmp/gpu_demo/demo-data --max-images 128 2>&1 \
    | tee "$OUT/device_parity.txt" | grep -v Warning
echo "3. tests"
start=$(date +%s)
# -v: each test's outcome is in the log as it ends, so a run cut by the timeout still says what failed
timeout 420 $PY -m pytest -v -p no:cacheprovider -p no:benchmark -n 8 --ignore tests/test_serve.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
grep -E "FAILED|ERROR" "$OUT/pytest.log" | head -20; tail -3 "$OUT/pytest.log"
