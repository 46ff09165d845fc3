#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (synthetic data only; nothing is downloaded):
#   1. the demo end to end with accelerator/precision 'auto' (CUDA, bf16-mixed): training, the
#      post-training suite and TTA in bf16, guard, evaluation, explanation panels, report;
#   2. bench/device_parity.py on the demo's checkpoint: CPU fp32, CUDA fp32, CUDA autocast, CPU bf16;
#   2b. a two-epoch DDP run on one GPU (NCCL) with the epoch budget and the final anneal on;
#   3. the test suite on that machine (accelerator 'auto' picks the GPU), minus the web service tests
#      (pytest-xdist, if installed: 14 workers, 1 thread each);
#   4. bench/speed.py --device cuda at the recipe's batch 32 and at batch 256, torch.compile off
#      (SPEED_ARGS adds flags: one compile of the model took 48 s for inference alone on an H200).
# Each step runs alone: the demo run beside the 14 test workers was starved of CPU and cut at 150 s.
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (a Python with PyTorch + CUDA and the package's deps).
# pydicom is one of them (every image read imports it): the lent H200's image lacks it, so install its
# wheel there first; the script stops at once without it.
# Eight files in OUT_DIR. On an H200: demo 76 s, tests 225 s, speed about 90 s; step 2b (not yet run on a GPU) has
# a 120-s limit.
set -uo pipefail
OUT=$(realpath -m "${1:-${OUT:-runs/gpu_check}}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import pydicom" 2>/dev/null || { echo "pydicom is missing: install its wheel first (pip install --no-index --no-deps pydicom-*.whl)"; exit 2; }
$PY -c "import torch, torchvision, lightning; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'lightning', lightning.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

DEMO=$(mktemp -d)/demo  # fresh each time: a finished demo folder would refuse a second run
start=$(date +%s)
timeout 150 $PY -m chexformer demo --out-dir "$DEMO" > "$OUT/demo.log" 2>&1
echo "1. demo rc=$? in $(( $(date +%s) - start )) s"
grep -E "robustness suite|test split|finished|Error|error" "$OUT/demo.log" | head -20
cp "$DEMO/summary.json" "$OUT/demo_summary.json" 2>/dev/null
echo "2. device parity"
timeout 90 $PY bench/device_parity.py "$DEMO/checkpoints/best.ckpt" "$DEMO/demo-data" --max-images 128 2>&1 \
    | grep -v Warning | tee "$OUT/device_parity.txt"
echo "parity rc=${PIPESTATUS[0]}"

echo "2b. DDP with NCCL on one GPU, the recipe's budget and final anneal on (the anneal gathers its forecast)"
DDP=$(mktemp -d)/ddp
timeout 120 $PY -m chexformer train --data-dir "$DEMO/demo-data" --out-dir "$DDP" --epochs 2 --img-size 64 \
    --d-model 32 --num-heads 4 --ffn-dim 64 --num-layers 1 --batch-size 8 --backbone-weights none --num-workers 0 \
    --devices 1 --strategy ddp --epoch-budget-minutes 600 --final-anneal-epochs 1 > "$OUT/ddp_nccl.log" 2>&1
echo "ddp rc=$?"; grep -E "projected to be|Error|error" "$OUT/ddp_nccl.log" | head -5

echo "3. tests"
workers=(-o "addopts=-ra")  # without pytest-xdist, pyproject's '-n logical' would be an unknown option
$PY -c "import xdist" 2>/dev/null && workers=(-n 14 -p no:benchmark)
start=$(date +%s)
# -v: each test's outcome is in the log as it ends, so a run cut by the timeout still says what failed
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout "${PYTEST_TIMEOUT:-300}" $PY -m pytest -v -p no:cacheprovider \
    "${workers[@]}" --timeout 150 --ignore tests/test_serve.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"
grep -E "FAILED|ERROR|Timeout" "$OUT/pytest.log" | head -30; tail -3 "$OUT/pytest.log"

echo "4. speed"
for bs in 32 256; do
    timeout "${SPEED_TIMEOUT:-100}" $PY bench/speed.py --device cuda --compile off --batch-size $bs ${SPEED_ARGS:-} \
        > "$OUT/speed_b$bs.txt" 2>> "$OUT/speed.log"
    echo "speed batch $bs rc=$?"; sed -n '/## Summary/,$p' "$OUT/speed_b$bs.txt"
done
