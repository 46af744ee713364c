#!/usr/bin/env bash
# Reproduce the whole CIFAR table: CIFAR-100-LT IF 200 / 100 / 50 and CIFAR-10-LT IF 100 / 50 / 10, each with
#   ce        CE + mixup stage 1, then stage 2 at rho 0 (class-balanced re-training) and rho 0.25 (H2T)
#   mislas    MiSLAS's stage 2 from that same CE + mixup stage 1, without and with H2T
#   ldam_drw  LDAM-DRW's own stage 1, then its stage 2 without and with H2T
#   gcl, ride, reslt   likewise, each with its own stage 1 (GCL, RIDE's 3 experts, ResLT's branches;
#                      RIDE's and ResLT's H2T fuse at their authors' rho 0.4)
# and every stage-2 setting for each seed. Each (IF, stage 1) is one job of scripts/reproduce.sh calls (the
# MiSLAS runs follow the CE runs, which share their stage 1); JOBS jobs run side by side on one device.
#
#   scripts/reproduce_table.sh                           everything, one job at a time
#   JOBS=4 BUDGET=11h scripts/reproduce_table.sh         4 at a time; stop after 11 hours
#   PREFIXES="cifar100_imb001" METHODS="ce" SEEDS=0 scripts/reproduce_table.sh
#
# Environment (all optional):
#   PREFIXES   config prefixes, dataset and IF (default: the six above, e.g. cifar100_imb0005 for IF 200)
#   METHODS    rows (default: ce mislas ldam_drw)      SEEDS   stage-2 seeds (default: 0 1 2); also gcl ride reslt
#   RHOS       stage-2 rhos (default: 0 config, i.e.    FROM    stage-1 checkpoint(s) stage 2 starts from
#              0 and the stage-2 config's own H2T,     (best and/or last, default best; see reproduce.sh)
#              0.25; ResLT's 0.4)
#   JOBS       jobs at a time (default 1). On CPU each gets OMP_NUM_THREADS = cores / JOBS unless it is set
#   BUDGET     wall-clock limit, e.g. 3h, 90m, 1h30m, 5400 (seconds); default none. At the limit every process
#              this script started is stopped (their process groups, nothing else), and it prints how to go on
#   SAVE_DIR   run folders and each job's log (default saved/table); RESULTS_DIR (default $SAVE_DIR/results):
#              one results folder per (prefix, method) as in results/, e.g. cifar100_imb001, cifar100_imb001_mislas,
#              and table.md, the top-1 of them all (also printed at the end)
#   STAGE1_OVERRIDES / STAGE2_OVERRIDES / PYTHON   as for scripts/reproduce.sh
#
# Stopped by BUDGET, Ctrl-C or a batch system's SIGTERM, nothing is lost that a run had saved: run the same
# command again (same SAVE_DIR) and finished runs are kept, unfinished stage 1s continue exactly from their last
# epoch and unfinished stage-2 runs (10 epochs) start again. The resume command of each unfinished stage 1 is
# printed too, to continue it by hand elsewhere. Exit status: 0 all finished, 1 a job failed (see its log),
# 2 bad input, 3 stopped at BUDGET (or by a signal) with runs left to do.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --job ]; then  # one job, in its own process group: --job PREFIX METHOD...
    prefix=$2; shift 2
    for method in "$@"; do
        results=$RESULTS_DIR/$(basename "$prefix")$([ "$method" = ce ] || echo "_$method")
        METHOD=$method RESULTS=$results CONTINUE=1 JOBS=1 bash scripts/reproduce.sh "$prefix" $RHOS || exit 1
    done
    exit 0
fi

die() { echo "error: $*" >&2; exit 2; }
seconds() {  # 3h, 90m, 1h30m, 45s or plain seconds
    local text=$1 total=0
    [[ $text =~ ^([0-9]+[hms])*[0-9]*$ && -n $text ]] || return 1
    while [[ $text =~ ^([0-9]+)([hms]?)(.*)$ ]]; do
        case ${BASH_REMATCH[2]} in
            h) total=$((total + BASH_REMATCH[1] * 3600)) ;;
            m) total=$((total + BASH_REMATCH[1] * 60)) ;;
            *) total=$((total + BASH_REMATCH[1])) ;;
        esac
        text=${BASH_REMATCH[3]}
    done
    echo "$total"
}

export PYTHON=${PYTHON:-python} PYTHONUNBUFFERED=1 RHOS=${RHOS:-0 config} SEEDS=${SEEDS:-0 1 2} FROM=${FROM:-best}
export SAVE_DIR=${SAVE_DIR:-saved/table}
export RESULTS_DIR=${RESULTS_DIR:-$SAVE_DIR/results}
export STAGE1_OVERRIDES=${STAGE1_OVERRIDES:-} STAGE2_OVERRIDES=${STAGE2_OVERRIDES:-}
prefixes=${PREFIXES:-cifar100_imb0005 cifar100_imb001 cifar100_imb002 cifar10_imb001 cifar10_imb002 cifar10_imb01}
methods=${METHODS:-ce mislas ldam_drw}
jobs_at_once=${JOBS:-1}
[[ $jobs_at_once =~ ^[1-9][0-9]*$ ]] || die "JOBS $jobs_at_once is not a positive whole number"
budget=''
if [ -n "${BUDGET:-}" ]; then
    budget=$(seconds "$BUDGET") || die "BUDGET $BUDGET is not a duration; write e.g. 3h, 90m, 1h30m or 5400 (seconds)"
fi
command -v setsid > /dev/null || die "setsid not found; install util-linux (each job runs in its own process group)"
own_stage1='ldam_drw gcl ride reslt'  # the methods with a stage 1 of their own: each its own job
for method in $methods; do
    [[ $method =~ ^(ce|mislas|ldam_drw|gcl|ride|reslt)$ ]] ||
        die "METHODS takes ce, mislas, ldam_drw, gcl, ride and reslt, not $method"
done
[ -n "${OMP_NUM_THREADS:-}" ] || export OMP_NUM_THREADS=$(( $(nproc) / jobs_at_once > 0 ? $(nproc) / jobs_at_once : 1 ))

# the jobs: per prefix, the CE + mixup stage 1 with its rows (ce, then mislas), and each own stage 1 with its row
queue=()
for name in $prefixes; do
    prefix=config/${name%%_*}/$name
    [ -f "${prefix}_stage1_ce_mixup.yaml" ] ||
        die "no configs for $name under config/${name%%_*}/; use prefixes like cifar100_imb001"
    ce_rows=$(for m in $methods; do [[ " $own_stage1 " == *" $m "* ]] || echo -n "$m "; done)
    [ -z "$ce_rows" ] || queue+=("$prefix ${ce_rows% }")
    for m in $methods; do [[ " $own_stage1 " != *" $m "* ]] || queue+=("$prefix $m"); done
done
mkdir -p "$SAVE_DIR"
start=$SECONDS
declare -A job_of=()  # process-group id -> job
finished=(); failed=(); unfinished=(); stopped=0

stop_jobs() {  # every process group this script started, and nothing else
    local pgid
    for pgid in "${!job_of[@]}"; do kill -TERM -- "-$pgid" 2> /dev/null; done
    for _ in $(seq 30); do
        local alive=0
        for pgid in "${!job_of[@]}"; do kill -0 -- "-$pgid" 2> /dev/null && alive=1; done
        [ $alive = 1 ] || break
        sleep 1
    done
    for pgid in "${!job_of[@]}"; do kill -KILL -- "-$pgid" 2> /dev/null; unfinished+=("${job_of[$pgid]}"); done
    wait 2> /dev/null
    job_of=()
    stopped=1
}
trap 'echo "signal received: stopping this table'\''s runs"; stop_jobs; report; exit 3' INT TERM

log_of() { echo "$SAVE_DIR/$(basename "${1%% *}")_$(echo "${1#* }" | tr ' ' '+').log"; }

report() {
    local job name kind run folders=()
    for run in "$RESULTS_DIR"/*/metrics.json; do [ ! -f "$run" ] || folders+=("$(dirname "$run")"); done
    if [ ${#folders[@]} -gt 0 ]; then  # the rows finished so far, mean ± sd over seeds
        "$PYTHON" -m scripts.collect_results --table "${folders[@]}" > "$RESULTS_DIR/table.md" &&
            echo "== top-1 (%), best epoch ($RESULTS_DIR/table.md):" && cat "$RESULTS_DIR/table.md"
    fi
    echo "== jobs finished: ${#finished[@]}, failed: ${#failed[@]}, stopped: ${#unfinished[@]}," \
         "not started: ${#queue[@]}"
    for job in "${failed[@]}"; do echo "failed: $job (log: $(log_of "$job"))"; done
    for job in "${unfinished[@]}"; do echo "stopped: $job (log: $(log_of "$job"))"; done
    for job in "${queue[@]}"; do echo "not started: $job"; done
    [ $stopped = 1 ] || [ ${#queue[@]} -gt 0 ] || return 0
    for name in $prefixes; do
        for kind in ce_mixup $own_stage1; do
            run=$({ ls -dt "$SAVE_DIR/${name}_stage1_${kind}"_[0-9]*/ 2> /dev/null || true; } | head -1 | sed 's:/$::')
            [ -n "$run" ] && [ ! -f "$run/summary.json" ] || continue
            if [ -f "$run/ckps/current.pth.tar" ]; then
                echo "unfinished stage 1, to continue it alone: $PYTHON train_stage1.py --cfg" \
                     "config/${name%%_*}/${name}_stage1_${kind}.yaml save_dir $SAVE_DIR $STAGE1_OVERRIDES" \
                     "resume $run/ckps/current.pth.tar auto_resume True"
            else
                echo "unfinished stage 1 $run stopped in its first epoch: it starts again"
            fi
        done
    done
    echo "to go on with everything, run the same command again (SAVE_DIR=$SAVE_DIR): finished runs are kept," \
         "unfinished stage 1s continue, unfinished stage-2 runs start again"
}

echo "== ${#queue[@]} job(s), $jobs_at_once at a time${budget:+, budget ${budget} s}; logs in $SAVE_DIR/"
while :; do
    running=" $(jobs -rp | tr '\n' ' ') "
    for pgid in "${!job_of[@]}"; do
        [[ $running == *" $pgid "* ]] && continue
        job=${job_of[$pgid]}
        unset "job_of[$pgid]"
        if wait "$pgid"; then finished+=("$job"); echo "[$((SECONDS - start)) s] done: $job"
        else failed+=("$job"); echo "[$((SECONDS - start)) s] FAILED: $job (log: $(log_of "$job"))"; fi
    done
    if [ -n "$budget" ] && [ $((SECONDS - start)) -ge "$budget" ] && [ $(( ${#queue[@]} + ${#job_of[@]} )) -gt 0 ]; then
        echo "[$((SECONDS - start)) s] budget of $budget s reached: stopping this table's runs"
        stop_jobs
        break
    fi
    while [ ${#job_of[@]} -lt "$jobs_at_once" ] && [ ${#queue[@]} -gt 0 ]; do
        job=${queue[0]}
        queue=("${queue[@]:1}")
        # setsid: the job leads a new process group (its pid), which stop_jobs can end whole
        setsid bash scripts/reproduce_table.sh --job $job > "$(log_of "$job")" 2>&1 &
        job_of[$!]=$job
        echo "[$((SECONDS - start)) s] started: $job (pid $!)"
    done
    [ ${#job_of[@]} -gt 0 ] || break
    sleep 1
done
trap - INT TERM
report
[ $stopped = 0 ] || exit 3
[ ${#failed[@]} = 0 ] || exit 1
