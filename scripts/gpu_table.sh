#!/usr/bin/env bash
# The CIFAR-100-LT table (IF 200 / 100 / 50: stage 1, stage 2 rho 0 and 0.25 from model_best and from the
# last epoch, 3 seeds) and the LDAM-DRW row at IF 100 (its own stage 1, then rho 0 / 0.25), then at IF 100
# the rho sweep and the MiSLAS / MiSLAS + H2T rows (3 seeds), on one lent GPU in one call. ResNet-32
# leaves a large GPU mostly idle, so the four stage 1s run side by side and each runs its stage-2 runs
# JOBS at a time.
#
# Here (a machine with the data and pip):      bash scripts/gpu_table.sh --prepare
#   packs the long-tailed subsets and the test set into the ignored data/pack/ (scripts/device_pack.py,
#   50.4 MiB) and the yacs wheel into the ignored .whl/.
# There (the device tool, from the repo root): bash scripts/gpu_table.sh   carry ["data/pack", ".whl"]
# $OUT gets gpu.txt (GPU, versions, wall times) and a tarball per part: results/<name>/ as
# scripts/collect_results.py writes it, the zoo weights in each IF's weights/, and the logs.
# Dry run on CPU: DEVICE=cpu DATA=<cifar100 root> SEEDS=0 FROM=best
#   OVERRIDES="num_epochs 1 compile False loss.LDAM.reweight_epoch 0"
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    [ -d data/cifar100/cifar-100-python ] || python3 ../shared/data/make_cifar100.py data/cifar100
    python3 scripts/device_pack.py pack cifar100 data/cifar100 data/pack/cifar100_lt.xz
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl yacs==0.1.8
    echo "prepared data/pack and .whl; run scripts/gpu_table.sh on the device with carry [data/pack, .whl]"
    exit 0
fi

OUT=${OUT:-gpu_table_out}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data/cifar100}
BUDGET_S=${BUDGET_S:-420}  # the sweep and MiSLAS phase starts only if the table took less than this
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHON=python3 JOBS=${JOBS:-4}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d "$DATA/cifar-100-python" ] || python3 scripts/device_pack.py unpack data/pack/cifar100_lt.xz "$DATA"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/gpu.txt"

SAVE=/tmp/table_saved; RES=/tmp/table_results
mkdir -p "$SAVE" "$RES"
export STAGE1_OVERRIDES="data_path $DATA device $DEVICE print_freq 1000 ${OVERRIDES:-}"
export STAGE2_OVERRIDES=$STAGE1_OVERRIDES
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

pack() {  # NAME DIR...: one tarball of results and logs into $OUT
    local name=$1; shift
    tar czf "$OUT/$name.tar.gz" -C / "${@#/}"
}

# phase 1: the table, the three IFs side by side
pids=()
for imb in 0005 001 002; do
    ( SAVE_DIR=$SAVE/imb$imb RESULTS=$RES/cifar100_imb$imb FROM=${FROM:-best last} SEEDS=${SEEDS:-0 1 2} \
          bash scripts/reproduce.sh "config/cifar100/cifar100_imb$imb" 0 0.25 > "$SAVE/imb$imb.log" 2>&1
      echo "IF $imb (stage 1 + $(ls -d "$SAVE/imb$imb"/*stage2*/ | wc -l) stage-2 runs): done at $(elapsed) s" ) \
        >> "$OUT/gpu.txt" &
    pids+=($!)
done
( SAVE_DIR=$SAVE/ldam RESULTS=$RES/cifar100_imb001_ldam_drw METHOD=ldam_drw FROM=best SEEDS=0 \
      bash scripts/reproduce.sh config/cifar100/cifar100_imb001 0 0.25 > "$SAVE/ldam.log" 2>&1
  echo "LDAM-DRW IF 100 (stage 1 + 2 stage-2 runs): done at $(elapsed) s" ) >> "$OUT/gpu.txt" &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid" || echo "a table run failed: see its log in the tarball" >> "$OUT/gpu.txt"; done
pack ldam_drw_imb001 "$RES/cifar100_imb001_ldam_drw" "$SAVE/ldam.log" || true

zoo() {  # IMB: stage-1 model_best and last epoch, and the H2T stage 2 (rho 0.25, seed 0, from model_best)
    local run1 run2 w=$RES/cifar100_imb$1/weights
    run1=$(ls -d "$SAVE/imb$1"/cifar100_imb$1_stage1_ce_mixup_* | head -1) &&
    run2=$(ls -d "$SAVE/imb$1"/cifar100_imb$1_stage2_ce_rho0.25_2* | head -1) || return 1
    python3 scripts/export_weights.py "$run1/ckps/model_best.pth.tar" "$w/stage1_ce_mixup_best.pth.tar" &&
    python3 scripts/export_weights.py "$run1/ckps/current.pth.tar" "$w/stage1_ce_mixup_last.pth.tar" &&
    python3 scripts/export_weights.py "$run2/ckps/model_best.pth.tar" "$w/stage2_ce_H2T_rho0.25.pth.tar"
}
for imb in 0005 001 002; do
    zoo $imb || echo "no zoo weights for IF $imb" >> "$OUT/gpu.txt"
    pack "table_imb$imb" "$RES/cifar100_imb$imb" "$SAVE/imb$imb.log" || true
done
echo "phase 1 (table): $(elapsed) s" >> "$OUT/gpu.txt"

# phase 2: at IF 100, the rho sweep (one seed) and MiSLAS / MiSLAS + H2T (3 seeds), from its model_best
if [ "$(elapsed)" -ge "$BUDGET_S" ]; then
    echo "phase 2 skipped: the table took $(elapsed) s (BUDGET_S $BUDGET_S)" >> "$OUT/gpu.txt"
    exit 0
fi
run1=$(ls -d "$SAVE/imb001"/cifar100_imb001_stage1_ce_mixup_* 2>/dev/null | head -1) || true
[ -n "$run1" ] || { echo "phase 2 skipped: no IF-100 stage 1 (see table_imb001's log)" >> "$OUT/gpu.txt"; exit 1; }
ckpt=$run1/ckps/model_best.pth.tar
( STAGE1_CKPT=$ckpt SAVE_DIR=$SAVE/sweep RESULTS=$RES/cifar100_imb001_rho_sweep SEEDS=0 FROM=best \
      bash scripts/reproduce.sh config/cifar100/cifar100_imb001 0 0.1 0.2 0.25 0.3 0.5 0.75 1.0 > "$SAVE/sweep.log" 2>&1
  echo "rho sweep: done at $(elapsed) s" ) >> "$OUT/gpu.txt" &
sweep=$!
( STAGE1_CKPT=$ckpt SAVE_DIR=$SAVE/mislas RESULTS=$RES/cifar100_imb001_mislas METHOD=mislas SEEDS=${SEEDS:-0 1 2} \
      FROM=best bash scripts/reproduce.sh config/cifar100/cifar100_imb001 0 0.25 > "$SAVE/mislas.log" 2>&1
  echo "MiSLAS rows: done at $(elapsed) s" ) >> "$OUT/gpu.txt" &
mislas=$!
wait $sweep || echo "the rho sweep failed: see its log" >> "$OUT/gpu.txt"
wait $mislas || echo "the MiSLAS rows failed: see their log" >> "$OUT/gpu.txt"
pack imb001_sweep_mislas "$RES/cifar100_imb001_rho_sweep" "$RES/cifar100_imb001_mislas" "$SAVE/sweep.log" \
    "$SAVE/mislas.log" || true
echo "phase 2 (sweep, MiSLAS): $(elapsed) s" >> "$OUT/gpu.txt"
