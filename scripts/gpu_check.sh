#!/usr/bin/env bash
# The full CIFAR-10-LT IF=100 recipe on one GPU, timed: throughput benchmark, 200-epoch stage 1,
# 10-epoch stage 2 (H2T rho=0.25), eval. Logs and summaries go to $OUT (flat, at most 8 files).
#
# Here (a machine with ../shared/data and pip):   bash scripts/gpu_check.sh --prepare
#   copies the CIFAR-10 archive into the ignored data/src/ and the yacs wheel into the ignored .whl/.
# There (the device tool, from the repo root):     bash scripts/gpu_check.sh     with carry ["data/src", ".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    mkdir -p data/src
    cp ../shared/data/cifar10-jpeg.tar.gz ../shared/data/make_cifar10.py data/src/
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl yacs==0.1.8
    echo "prepared data/src and .whl; now run scripts/gpu_check.sh on the GPU machine with carry [data/src, .whl]"
    exit 0
fi

OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu GPU_CHECK_OVERRIDES="num_epochs 1" BENCH_STEPS=2: a dry run on CPU
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d data/cifar10/cifar-10-batches-py ] || python3 data/src/make_cifar10.py data/cifar10
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt"

NO_COMPILE=(); BENCH_FLAGS=()
# the stage-1 config compiles; without Triton (CUDA) or a C++ compiler (CPU) run it eager and say so
if ! python3 -c "import sys, torch; from utils.runtime import check_compile_toolchain as c; c(torch.device(sys.argv[1]))" \
        "$DEVICE" 2>> "$OUT/gpu.txt"; then
    echo "torch.compile toolchain missing: runs with compile False" | tee -a "$OUT/gpu.txt"
    NO_COMPILE=(compile False); BENCH_FLAGS=(--no-compile)
fi
python3 benchmarks/throughput.py --device "$DEVICE" --steps "${BENCH_STEPS:-50}" "${BENCH_FLAGS[@]}" 2>&1 | tee "$OUT/throughput.txt"

SAVE=/tmp/gpu_saved
EXTRA=(save_dir "$SAVE" device "$DEVICE" print_freq 1000 "${NO_COMPILE[@]}" ${GPU_CHECK_OVERRIDES:-})
start=$(date +%s)
python3 train_stage1.py --cfg config/cifar10/cifar10_imb001_stage1_ce_mixup.yaml "${EXTRA[@]}" 2>&1 | tee "$OUT/stage1.log"
mid=$(date +%s)
run1=$(ls -d "$SAVE"/cifar10_imb001_stage1_ce_mixup_* | tail -1)
python3 train_stage2.py --cfg config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml "${EXTRA[@]}" \
    resume "$run1/ckps/model_best.pth.tar" 2>&1 | tee "$OUT/stage2.log"
end=$(date +%s)
run2=$(ls -d "$SAVE"/cifar10_imb001_stage2_ce_h2t_* | tail -1)
python3 eval.py --cfg config/cifar10/cifar10_imb001_stage2_ce_H2T.yaml device "$DEVICE" resume "$run2/ckps/model_best.pth.tar"
cp "$run1/summary.json" "$OUT/stage1_summary.json"
cp "$run2/summary.json" "$OUT/stage2_summary.json"
cp "$run2/ckps/model_best.eval.json" "$OUT/eval.json"
echo "stage 1: $((mid - start)) s, stage 2: $((end - mid)) s" | tee -a "$OUT/gpu.txt"
