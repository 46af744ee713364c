#!/usr/bin/env bash
# What is left of the CIFAR-100-LT table, run on one lent GPU in one call of at most 10 minutes:
#   imb0005, imb002  stage 1 (CE + mixup, 200 epochs), then stage 2 rho 0 / 0.25, seeds 0 1 2, from
#                    model_best and from the last epoch (12 runs each)
#   ldam             LDAM-DRW IF 100: its own stage 1, then stage 2 rho 0 / 0.25 (seed 0, from model_best)
#   imb001           (not run unless PARTS names it: the CPU has run it all, so on a GPU it is a cross-check)
#                    IF 100 from the committed stage-1 zoo weights (the CPU run): seeds 1 2 x best/last x
#                    rho 0 / 0.25, then MiSLAS / MiSLAS + H2T (seeds 0 1 2), then the rho sweep; its rho 0.01
#                    fuses no channel (int(0.01 * 64) = 0) but sends the instance batch through the
#                    backbone (BN statistics, shift_bn True): what H2T changes besides the fusion
# ResNet-32 leaves a large GPU mostly idle, so the parts run side by side. At DEADLINE_S (or when all
# are done) every part is stopped and packed, finished or not: $OUT/<part>.tar.gz holds its run folders
# (stage-1 checkpoints included, so an unfinished stage 1 resumes elsewhere with
# `resume <run>/ckps/current.pth.tar auto_resume True`; stage-2 weights only for H2T seed 0 from
# model_best) and its logs; $OUT/gpu.txt the GPU, versions, progress and wall times.
# scripts/collect_results.py makes results/ from the unpacked run folders.
#
# Here (a machine with the data and pip):      bash scripts/gpu_table.sh --prepare
#   packs the long-tailed subsets and the test set into the ignored data/pack/ (scripts/device_pack.py,
#   50.4 MiB) and the yacs wheel into the ignored .whl/.
# There (the device tool, from the repo root): bash scripts/gpu_table.sh   carry ["data/pack", ".whl"]
# Dry run on CPU: DEVICE=cpu DATA=<cifar100 root> OUT=/tmp/o PARTS="imb0005 imb001" IF100_SEEDS=1
#   SEEDS=0 FROM=best OVERRIDES="num_epochs 1 loss.LDAM.reweight_epoch 0" DEADLINE_S=600
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    [ -d data/cifar100/cifar-100-python ] || python3 ../shared/data/make_cifar100.py data/cifar100
    [ -f data/pack/cifar100_lt.xz ] || python3 scripts/device_pack.py pack cifar100 data/cifar100 data/pack/cifar100_lt.xz
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl yacs==0.1.8
    echo "prepared data/pack and .whl; run scripts/gpu_table.sh on the device with carry [data/pack, .whl]"
    exit 0
fi

start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
OUT=${OUT:-gpu_table_out}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data/cifar100}
DEADLINE_S=${DEADLINE_S:-530}
PARTS=${PARTS:-imb0005 imb002 ldam}  # imb001 only when asked: the CPU has run all of it
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
log() { echo "[$(elapsed) s] $*" >> "$OUT/gpu.txt"; }
export PYTHONUNBUFFERED=1 PYTHON=python3 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d "$DATA/cifar-100-python" ] || python3 scripts/device_pack.py unpack data/pack/cifar100_lt.xz "$DATA"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"; } >> "$OUT/gpu.txt"
log "data ready"
# MPS lets the processes' small kernels share the GPU at once instead of taking turns; checked with one
# client first, and left off if that fails
if [ "$DEVICE" = cuda ] && [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
    mkdir -p /tmp/mps_pipe /tmp/mps_log
    if nvidia-cuda-mps-control -d && timeout 90 python3 -c "import torch; assert torch.ones(2, device='cuda').sum().item() == 2"; then
        log "MPS on"
    else
        echo quit | nvidia-cuda-mps-control 2> /dev/null || true
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        log "MPS off: its check failed"
    fi
fi

SAVE=${SAVE:-/tmp/table_saved}
mkdir -p "$SAVE"
# fp32 as on the CPU runs and in the authors' code; eager: a cold torch.compile costs more than it saves
# in 200 short epochs here
export STAGE1_OVERRIDES="data_path $DATA device $DEVICE precision fp32 compile False print_freq 1000 ${OVERRIDES:-}"
export STAGE2_OVERRIDES=$STAGE1_OVERRIDES
table=config/cifar100/cifar100_imb

part() {  # NAME: the runs of one part, each reproduce.sh into $SAVE/NAME (its log: $SAVE/NAME/NAME.log)
    local save=$SAVE/$1
    mkdir -p "$save"
    case $1 in
        imb0005|imb002)
            SAVE_DIR=$save RESULTS=$save/results JOBS=4 FROM=${FROM:-best last} SEEDS=${SEEDS:-0 1 2} \
                bash scripts/reproduce.sh "$table${1#imb}" 0 0.25 ;;
        ldam)
            SAVE_DIR=$save RESULTS=$save/results JOBS=2 METHOD=ldam_drw FROM=best SEEDS=0 \
                bash scripts/reproduce.sh "${table}001" 0 0.25 ;;
        imb001)  # from the CPU stage-1 run's committed zoo weights
            local w=results/cifar100_imb001/weights
            export STAGE1_CKPT=$w/stage1_ce_mixup_best.pth.tar STAGE1_LAST=$w/stage1_ce_mixup_last.pth.tar \
                SAVE_DIR=$save JOBS=3
            RESULTS=$save/results_seeds FROM="best last" SEEDS=${IF100_SEEDS:-1 2} \
                bash scripts/reproduce.sh "${table}001" 0 0.25
            log "imb001: seeds done"
            RESULTS=$save/results_mislas METHOD=mislas FROM=best SEEDS=${SEEDS:-0 1 2} \
                bash scripts/reproduce.sh "${table}001" 0 0.25
            log "imb001: MiSLAS done"
            RESULTS=$save/results_sweep FROM=best SEEDS=0 \
                bash scripts/reproduce.sh "${table}001" ${SWEEP_RHOS:-0.1 0.2 0.3 0.5 0.75 1.0 0.01} ;;
    esac
}

pack() {  # NAME: its run folders and logs, stage-2 weights only for H2T seed 0 from model_best
    local dir=$SAVE/$1 list=/tmp/pack_$1.txt
    (cd "$dir" && find . -type f \
        ! \( -path '*_stage2_*/ckps/*.pth.tar' ! -path '*_stage2_*_rho0.25_2*/ckps/model_best.pth.tar' \)) > "$list"
    tar czf "$OUT/$1.tar.gz.tmp" -C "$dir" -T "$list" && mv "$OUT/$1.tar.gz.tmp" "$OUT/$1.tar.gz"
}

progress() {  # the last epoch line of each running training log
    for f in "$SAVE"/*/*/logs/*.txt; do
        [ -f "$f" ] || continue
        [ $(( $(date +%s) - $(stat -c %Y "$f") )) -lt 60 ] || continue  # finished runs are reported once, by pack
        line=$(grep -h "^.\{9\}Epoch \[" "$f" | tail -1 | sed -E 's/^(.{8}) (Epoch \[[0-9/]+\]).*test top1 ([0-9.]+).*\| ([0-9.]+s train [0-9.]+s eval)$/\1 \2 top1 \3, \4/' || true)
        [ -z "$line" ] || echo "    $(basename "$(dirname "$(dirname "$f")")"): $line"
    done >> "$OUT/gpu.txt"
}

declare -A pid_of
for p in $PARTS; do
    part "$p" > "$SAVE/$p.log" 2>&1 &
    pid_of[$p]=$!
done
log "started: $PARTS"
last_report=0
while :; do
    sleep 5
    running=0
    for p in $PARTS; do
        if [ -n "${pid_of[$p]}" ] && ! kill -0 "${pid_of[$p]}" 2>/dev/null; then
            if wait "${pid_of[$p]}"; then log "$p: done"; else log "$p: FAILED (see $p.log in its tarball)"; fi
            pid_of[$p]=''
            cp "$SAVE/$p.log" "$SAVE/$p/" 2>/dev/null || true
            pack "$p"
        fi
        [ -z "${pid_of[$p]}" ] || running=1
    done
    [ $running = 1 ] || break
    if [ "$(elapsed)" -ge "$DEADLINE_S" ]; then
        log "deadline: stopping what still runs"
        progress
        for p in $PARTS; do  # the part's shell, its reproduce.sh, then every python of this $SAVE
            [ -z "${pid_of[$p]}" ] || { pkill -TERM -P "${pid_of[$p]}" || true; kill -TERM "${pid_of[$p]}" || true; }
        done 2>/dev/null
        for _ in 1 2 3; do pkill -TERM -f "save_dir $SAVE/" 2>/dev/null || true; sleep 2; done
        for p in $PARTS; do
            [ -z "${pid_of[$p]}" ] || { cp "$SAVE/$p.log" "$SAVE/$p/" 2>/dev/null || true; pack "$p"; log "$p: packed unfinished"; }
        done
        break
    fi
    if [ $(( $(elapsed) - last_report )) -ge 60 ]; then last_report=$(elapsed); log "progress"; progress; fi
done
log "all packed"
ls -la "$OUT" >> "$OUT/gpu.txt"
