#!/usr/bin/env bash
# Reproduce one row: stage 1, then stage 2 from that checkpoint for each rho, eval, and a summary.
#
#   scripts/reproduce.sh config/cifar10/cifar10_imb001 [RHO ...]        (default rhos: 0 0.25 0.5 1.0)
#
# Uses ${PREFIX}_stage1_ce_mixup.yaml and ${PREFIX}_stage2_ce_H2T.yaml. Environment:
#   STAGE1_OVERRIDES / STAGE2_OVERRIDES  extra `KEY VALUE` pairs (e.g. "num_epochs 2")
#   STAGE1_CKPT                          skip stage 1 and start stage 2 from this checkpoint
#   SAVE_DIR (saved), RESULTS (results/<name of PREFIX>)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/reproduce.sh CONFIG_PREFIX [RHO ...]" >&2; exit 2; }
prefix=$1; shift
rhos=("$@"); [ ${#rhos[@]} -gt 0 ] || rhos=(0 0.25 0.5 1.0)
cfg1=${prefix}_stage1_ce_mixup.yaml
cfg2=${prefix}_stage2_ce_H2T.yaml
for f in "$cfg1" "$cfg2"; do [ -f "$f" ] || { echo "error: config $f not found; give a prefix like config/cifar10/cifar10_imb001" >&2; exit 2; }; done
name=$(basename "$prefix")
save=${SAVE_DIR:-saved}
results=${RESULTS:-results/$name}
export PYTHONUNBUFFERED=1

newest_run() { ls -dt "$save/$1"_* 2>/dev/null | head -1; }

if [ -n "${STAGE1_CKPT:-}" ]; then
    ckpt=$STAGE1_CKPT
    run1=$(dirname "$(dirname "$ckpt")")
else
    echo "== stage 1: $cfg1"
    python train_stage1.py --cfg "$cfg1" save_dir "$save" ${STAGE1_OVERRIDES:-}
    run1=$(newest_run "${name}_stage1_ce_mixup")
    ckpt=$run1/ckps/model_best.pth.tar
fi
python eval.py --cfg "$cfg1" save_dir "$save" ${STAGE1_OVERRIDES:-} resume "$ckpt"

runs=("$run1")
for rho in "${rhos[@]}"; do
    echo "== stage 2: rho $rho"
    python train_stage2.py --cfg "$cfg2" save_dir "$save" ${STAGE2_OVERRIDES:-} resume "$ckpt" H2T "$rho" \
        name "${name}_stage2_rho${rho}"
    run2=$(newest_run "${name}_stage2_rho${rho}")
    python eval.py --cfg "$cfg2" save_dir "$save" ${STAGE2_OVERRIDES:-} resume "$run2/ckps/model_best.pth.tar"
    runs+=("$run2")
done
python scripts/collect_results.py --out "$results" "${runs[@]}"
