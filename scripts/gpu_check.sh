#!/usr/bin/env bash
# What holds on one CUDA GPU, in a few minutes: the device and versions,
# compiled stage-1 throughput with compile_mode default and reduce-overhead, exact resume (1 + 1 epochs of
# stage 1 against 2, deterministic True), a stage-2 epoch, and the evaluation of the committed CIFAR-100-LT
# IF=100 weights next to their CPU fp32 figures.
#
#   bash scripts/gpu_check.sh DATA_PATH [OUT]
#
# DATA_PATH: the folder holding CIFAR-100's cifar-100-python/ (the official files; nothing is downloaded).
# OUT (default gpu_check_out): gpu_check.txt (the lines printed) and every log; checkpoints go to a
# temporary folder.
# Environment:
#   DEVICE           cuda (default) or cpu, for a dry run
#   CHECK_OVERRIDES  extra `KEY VALUE` pairs for the training runs (a dry run: "batch_size 16 eval_batch_size 64")
#   BENCH_ARGS       extra benchmarks.throughput flags (a dry run: "--no-compile --steps 2 --repeats 1 --warmup 1")
#   RESUME_COMPILE   True: the exact-resume runs compile the model as the config does (default False:
#                    eager, a shorter check)
#   WHEELS           a folder of wheels to install first (offline)
# A dry run on CPU, with the tiny CIFAR-100 of the tests:
#   python -c "import sys; sys.path.insert(0, 'tests'); import conftest; conftest.write_cifar('/tmp/c100', 'cifar100')"
#   DEVICE=cpu CHECK_OVERRIDES="batch_size 16 eval_batch_size 64" \
#     BENCH_ARGS="--no-compile --steps 2 --repeats 1 --warmup 1" bash scripts/gpu_check.sh /tmp/c100 /tmp/gpu_check_out
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/gpu_check.sh DATA_PATH [OUT]" >&2; exit 2; }
DATA=$(cd "$1" && pwd)
[ -d "$DATA/cifar-100-python" ] \
    || { echo "error: $DATA holds no cifar-100-python/; give the folder that does" >&2; exit 2; }
OUT=${2:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$OUT/site" "$WHEELS"/*.whl
    export PYTHONPATH=$OUT/site:${PYTHONPATH:-}
fi
start=$(date +%s)
summary=$OUT/gpu_check.txt
: > "$summary"
say() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$summary"; }
SAVE=$(mktemp -d)  # run folders and checkpoints; OUT keeps the logs and summaries
trap 'rm -rf "$SAVE"' EXIT
CFG1=config/cifar100/cifar100_imb001_stage1_ce_mixup.yaml
CFG2=config/cifar100/cifar100_imb001_stage2_ce_H2T.yaml
COMMON=(data_path "$DATA" device "$DEVICE" print_freq 1000 ${CHECK_OVERRIDES:-})

"$PY" - "$DEVICE" <<'EOF' | tee -a "$summary"
import sys, torch
device = torch.device(sys.argv[1])
if device.type == 'cuda':
    print(f'device: {torch.cuda.get_device_name(device)}, compute capability '
          f'{".".join(map(str, torch.cuda.get_device_capability(device)))}, '
          f'{torch.cuda.get_device_properties(device).total_memory / 2 ** 30:.0f} GiB')
else:
    print('device: cpu (a dry run)')
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}')
EOF

# 1. compiled stage-1 throughput, per compile_mode (batch 128, after one epoch of warm-up and compiling)
for mode in default reduce-overhead; do
    "$PY" -m benchmarks.throughput --dataset cifar100 --data-path "$DATA" --device "$DEVICE" --stages stage1 \
        --compile-mode "$mode" --steps 50 --repeats 3 ${BENCH_ARGS:-} > "$OUT/throughput_$mode.txt" 2>&1 \
        || { tail -5 "$OUT/throughput_$mode.txt"; say "compile_mode $mode failed (throughput_$mode.txt)"; continue; }
    rates=$(grep -E '^stage1 (fast|reference)' "$OUT/throughput_$mode.txt" | tr -s ' ' | tr '\n' ';')
    say "compile_mode $mode: $rates"
done

# 2. exact resume: 2 epochs straight against 1 epoch, then resumed for the second (deterministic True)
RESUME=("${COMMON[@]}" deterministic True compile "${RESUME_COMPILE:-False}" save_dir "$SAVE")
"$PY" train_stage1.py --cfg "$CFG1" "${RESUME[@]}" name straight num_epochs 2 > "$OUT/stage1_straight.log" 2>&1
"$PY" train_stage1.py --cfg "$CFG1" "${RESUME[@]}" name broken num_epochs 1 > "$OUT/stage1_broken.log" 2>&1
broken=$(ls -d "$SAVE"/broken_*)
"$PY" train_stage1.py --cfg "$CFG1" "${RESUME[@]}" name broken num_epochs 2 \
    resume "$broken/ckps/current.pth.tar" auto_resume True >> "$OUT/stage1_broken.log" 2>&1
straight=$(ls -d "$SAVE"/straight_*)
cp "$straight/summary.json" "$OUT/stage1_summary.json"
"$PY" - "$straight/ckps/current.pth.tar" "$broken/ckps/current.pth.tar" "$straight/summary.json" <<'EOF' \
    | tee -a "$summary"
import json, sys, torch
a, b = (torch.load(p, weights_only=True) for p in sys.argv[1:3])
pairs = [(a[part][k], b[part][k]) for part in ('state_dict_model', 'state_dict_classifier') for k in a[part]]
pairs += [(v['momentum_buffer'], b['optimizer']['state'][k]['momentum_buffer'])
          for k, v in a['optimizer']['state'].items()]
differ = [x for x, y in pairs if not torch.equal(x, y)]
worst = max(((x.double() - y.double()).abs().max().item() for x, y in pairs if x.is_floating_point()), default=0)
summary = json.load(open(sys.argv[3]))
print(f'exact resume (deterministic True, {summary["precision"]}): weights and momentum after 1 + 1 epochs '
      f'{"equal" if not differ else "DIFFER from"} 2 epochs straight ({len(pairs)} tensors, {len(differ)} differ, '
      f'largest difference {worst:.3g}); its last epoch {summary["history"][-1]["time_train_s"]} s train + '
      f'{summary["history"][-1]["time_eval_s"]} s eval ({summary["hardware"]})')
EOF
say "exact resume checked"

# 3. one stage-2 epoch (H2T rho 0.25) from that stage-1 checkpoint
"$PY" train_stage2.py --cfg "$CFG2" "${COMMON[@]}" save_dir "$SAVE" num_epochs 1 \
    resume "$straight/ckps/model_best.pth.tar" > "$OUT/stage2.log" 2>&1
cp "$SAVE"/cifar100_imb001_stage2_ce_h2t_*/summary.json "$OUT/stage2_summary.json"
"$PY" - "$OUT/stage2_summary.json" <<'EOF' | tee -a "$summary"
import json, sys
s = json.load(open(sys.argv[1]))
h = s['history'][-1]
print(f'stage-2 epoch ({s["precision"]}, H2T {s["H2T"]}): {h["time_train_s"]} s train + {h["time_eval_s"]} s eval')
EOF
say "stage 2 timed"

# 4. evaluation of the committed weights, against their committed records
for spec in "$CFG1 stage1_ce_mixup_best" "$CFG2 stage2_ce_H2T_rho0.25_best"; do
    set -- $spec
    for precision in fp32 same; do
        "$PY" eval.py --cfg "$1" data_path "$DATA" device "$DEVICE" eval_precision "$precision" ${CHECK_OVERRIDES:-} \
            resume "results/cifar100_imb001/weights/$2.pth.tar" --out "$OUT/eval_$2_$precision.json" \
            > "$OUT/eval_$2_$precision.log" 2>&1
        "$PY" - "$OUT/eval_$2_$precision.json" "results/cifar100_imb001/weights/$2.eval.json" <<'EOF' | tee -a "$summary"
import json, sys
here, cpu = (json.load(open(p)) for p in sys.argv[1:])
print(f'eval {sys.argv[1].rsplit("/", 1)[-1][5:-5]} in {here["precision"]}: top-1 {here["top1"]:.2f} top-5 '
      f'{here["top5"]:.2f} ECE {here["ece"] * 100:.2f}% (committed, CPU {cpu["precision"]}: top-1 {cpu["top1"]:.2f} '
      f'top-5 {cpu["top5"]:.2f} ECE {cpu["ece"] * 100:.2f}%)')
EOF
    done
done
say "done"
