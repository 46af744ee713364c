#!/usr/bin/env bash
# Reproduce one row: stage 1, then stage 2 from that checkpoint for each rho, eval, and a summary.
#
#   scripts/reproduce.sh config/cifar10/cifar10_imb001 [RHO ...]        (default rhos: 0 0.25 0.5 1.0)
#   SEEDS="0 1 2" FROM="best last" scripts/reproduce.sh config/cifar100/cifar100_imb001 0 0.25
#   METHOD=reslt scripts/reproduce.sh config/cifar100/cifar100_imb001 0 config
#
# A rho of `config` is the H2T value the stage-2 config sets (0.25; 0.4 for RIDE and ResLT, their authors').
#
# Uses ${PREFIX}_stage1_ce_mixup.yaml and ${PREFIX}_stage2_ce_H2T.yaml (METHOD=ce, the default);
# METHOD=mislas: ..._stage1_ce_mixup.yaml and ..._stage2_mislas_H2T.yaml (rho 0 is MiSLAS itself);
# METHOD=ldam_drw: ..._stage1_ldam_drw.yaml and ..._stage2_ldam_drw_H2T.yaml; METHOD=ride:
# ..._stage1_ride.yaml and ..._stage2_ride_H2T.yaml; METHOD=reslt: ..._stage1_reslt.yaml and
# ..._stage2_reslt_H2T.yaml; METHOD=gcl: ..._stage1_gcl.yaml and ..._stage2_gcl_H2T.yaml (rho 0 is the
# method's stage 2 alone). Environment:
#   STAGE1_OVERRIDES / STAGE2_OVERRIDES  extra `KEY VALUE` pairs (e.g. "num_epochs 2")
#   STAGE1_CKPT                          skip stage 1 and start stage 2 from this checkpoint (a run's
#                                        ckps/model_best.pth.tar, or model-zoo weights under results/)
#   STAGE1_LAST                          with STAGE1_CKPT: the last-epoch checkpoint for FROM=last
#                                        (default: ckps/current.pth.tar beside STAGE1_CKPT)
#   FROM                                 which stage-1 checkpoints stage 2 starts from: best (model_best,
#                                        the authors' protocol, or STAGE1_CKPT) and/or last (the last
#                                        epoch); default best
#   SEEDS                                stage-2 seeds, each a run per rho (default 0)
#   JOBS                                 stage-2 runs at a time (default 1); each parallel run logs to
#                                        $SAVE_DIR/<run name>.log. On a GPU several share it well; on
#                                        CPU give each OMP_NUM_THREADS=cores/JOBS
#   CONTINUE=1                           keep what an earlier call left in SAVE_DIR: a finished stage 1 is
#                                        reused, an unfinished one continues from its ckps/current.pth.tar,
#                                        finished stage-2 runs (summary and eval written) are not run again
#   SAVE_DIR (saved), RESULTS (results/<name of PREFIX>)
#   PYTHON                               the interpreter to run (default: python on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/reproduce.sh CONFIG_PREFIX [RHO ...]" >&2; exit 2; }
prefix=$1; shift
rhos=("$@"); [ ${#rhos[@]} -gt 0 ] || rhos=(0 0.25 0.5 1.0)
case ${METHOD:-ce} in
    ce) stage1=stage1_ce_mixup; stage2=stage2_ce_H2T ;;
    mislas) stage1=stage1_ce_mixup; stage2=stage2_mislas_H2T ;;
    ldam_drw) stage1=stage1_ldam_drw; stage2=stage2_ldam_drw_H2T ;;
    ride) stage1=stage1_ride; stage2=stage2_ride_H2T ;;
    reslt) stage1=stage1_reslt; stage2=stage2_reslt_H2T ;;
    gcl) stage1=stage1_gcl; stage2=stage2_gcl_H2T ;;
    *) echo "error: METHOD $METHOD is unknown; use ce, mislas, ldam_drw, ride, reslt or gcl" >&2; exit 2 ;;
esac
cfg1=${prefix}_${stage1}.yaml
cfg2=${prefix}_${stage2}.yaml
for f in "$cfg1" "$cfg2"; do
    [ -f "$f" ] || { echo "error: config $f not found; give a prefix like config/cifar10/cifar10_imb001" >&2; exit 2; }
done
for from in ${FROM:-best}; do
    [[ $from == best || $from == last ]] || { echo "error: FROM takes best and/or last, not $from" >&2; exit 2; }
done
name=$(basename "$prefix")
save=${SAVE_DIR:-saved}
results=${RESULTS:-results/$name}
py=${PYTHON:-python}
for i in "${!rhos[@]}"; do
    if [ "${rhos[$i]}" = config ]; then
        rhos[$i]=$("$py" -c 'import sys; from utils.config import load_config; print(load_config(sys.argv[1]).H2T)' \
            "$cfg2") || { echo "error: cannot read H2T from $cfg2" >&2; exit 2; }
    fi
    awk -v r="${rhos[$i]}" 'BEGIN { exit !(r ~ /^([0-9]*[.])?[0-9]+$/ && r + 0 <= 1) }' || {
        echo "error: rho ${rhos[$i]} is not a fraction from 0 to 1; give rhos like 0 0.25, or config" >&2; exit 2; }
done
echo "== $cfg2: rhos ${rhos[*]}"
export PYTHONUNBUFFERED=1
mkdir -p "$save"

# the newest run folder NAME_<YYYYmmddHHMM> (not NAME_seed1_...), or nothing
newest_run() { { ls -dt "$save/$1"_[0-9]*/ 2>/dev/null || true; } | head -1 | sed "s:/$::"; }

if [ -n "${STAGE1_CKPT:-}" ]; then
    [ -f "$STAGE1_CKPT" ] || {
        echo "error: STAGE1_CKPT $STAGE1_CKPT not found; give a stage-1 checkpoint file" >&2; exit 2; }
    run1=$(dirname "$(dirname "$STAGE1_CKPT")")
    last=${STAGE1_LAST:-$(dirname "$STAGE1_CKPT")/current.pth.tar}
else
    run1=''
    [ "${CONTINUE:-0}" != 1 ] || run1=$(newest_run "${name}_${stage1}")
    if [ -n "$run1" ] && [ -f "$run1/summary.json" ]; then
        echo "== stage 1: kept $run1"
    elif [ -n "$run1" ] && [ -f "$run1/ckps/current.pth.tar" ]; then
        echo "== stage 1: continuing $run1"
        "$py" train_stage1.py --cfg "$cfg1" save_dir "$save" ${STAGE1_OVERRIDES:-} \
            resume "$run1/ckps/current.pth.tar" auto_resume True
    else
        echo "== stage 1: $cfg1"
        "$py" train_stage1.py --cfg "$cfg1" save_dir "$save" ${STAGE1_OVERRIDES:-}
        run1=$(newest_run "${name}_${stage1}")
    fi
    last=$run1/ckps/current.pth.tar
fi
if [[ " ${FROM:-best} " == *" last "* ]] && [ ! -f "$last" ]; then
    echo "error: FROM=last needs the last stage-1 epoch, $last not found; set STAGE1_LAST or use FROM=best" >&2; exit 2
fi

stage2_run() {  # CKPT RHO SEED RUN_NAME: train, then evaluate its model_best
    "$py" train_stage2.py --cfg "$cfg2" save_dir "$save" ${STAGE2_OVERRIDES:-} resume "$1" H2T "$2" seed "$3" name "$4"
    local best; best=$(newest_run "$4")/ckps/model_best
    "$py" eval.py --cfg "$cfg2" save_dir "$save" ${STAGE2_OVERRIDES:-} resume "$best.pth.tar" --out "$best.eval.json"
}

names=(); pids=()
for from in ${FROM:-best}; do
    case $from in
        best) ckpt=${STAGE1_CKPT:-$run1/ckps/model_best.pth.tar}; tag='' ;;
        last) ckpt=$last; tag=_fromlast ;;
    esac
    # a stage-1 checkpoint evaluated before keeps its record (the zoo's committed eval.json is not rewritten)
    [ -f "${ckpt%.pth.tar}.eval.json" ] ||
        "$py" eval.py --cfg "$cfg1" save_dir "$save" ${STAGE1_OVERRIDES:-} resume "$ckpt" --out "${ckpt%.pth.tar}.eval.json"
    for seed in ${SEEDS:-0}; do
        for rho in "${rhos[@]}"; do
            run_name=${name}_${stage2%_H2T}${tag}_rho${rho}$([ "$seed" = 0 ] || echo "_seed$seed")
            names+=("$run_name")
            done_run=$(newest_run "$run_name")
            if [ "${CONTINUE:-0}" = 1 ] && [ -f "$done_run/summary.json" ] &&
                    [ -f "$done_run/ckps/model_best.eval.json" ]; then
                echo "== stage 2 from $from: rho $rho, seed $seed: kept $done_run"
                continue
            fi
            echo "== stage 2 from $from: rho $rho, seed $seed"
            if [ "${JOBS:-1}" -le 1 ]; then
                stage2_run "$ckpt" "$rho" "$seed" "$run_name"
            else
                while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
                stage2_run "$ckpt" "$rho" "$seed" "$run_name" > "$save/$run_name.log" 2>&1 &
                pids+=($!)
            fi
        done
    done
done
failed=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "error: stage-2 run ${names[$i]} failed; see $save/${names[$i]}.log" >&2; failed=1; }
done
[ $failed = 0 ] || exit 1
runs=()
[ ! -f "$run1/summary.json" ] || runs+=("$run1")  # model-zoo weights have no stage-1 run to collect
for n in "${names[@]}"; do runs+=("$(newest_run "$n")"); done
"$py" -m scripts.collect_results --out "$results" "${runs[@]}"
