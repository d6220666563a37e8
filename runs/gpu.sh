#!/usr/bin/env bash
# The GPU acceptance run: what a user does on a fresh GPU machine (some ten to fifteen minutes on one
# H100, an estimate: it has not run on a GPU yet).
#  1. bench.py on the 270M configuration: a training step in bfloat16 and float16, eager and compiled,
#     against transformers (tokens/s, MFU of the measured and of the datasheet peak, peak memory); a
#     sliding layer from 1,024 to 8,192 tokens, blocked and with FlexAttention; generation with the
#     cache, eager and compiled, against transformers' generate; into assets/gpu_bench.json.
#  2. 200 training steps of 270m on the TinyStories excerpt, in bfloat16 and compiled (the defaults
#     on CUDA): the validation loss must fall.
#  3. The same run stopped with Ctrl-C (SIGINT) once it has logged step 100, then continued with
#     --resume: its metrics.jsonl must equal the uninterrupted run's, row for row (tokens/s aside).
#  4. 10 steps in float16, with its gradient scaler: every loss finite.
#  5. A story sampled from the run of 2.
# The figures go to assets/gpu_acceptance.json under the run's name (RUN: the device by default), the
# bench's whole JSON with them; the script exits 1 if a check failed. The variables below run it
# anywhere, e.g. on a CPU with a tiny model (as test_runs_scripts.py does):
#   bash runs/gpu.sh
#   DEVICE=cpu STEPS=8 MODEL_FLAGS="--preset small --hidden_size 32 ..." \
#       BENCH_FLAGS="--quick --only sliding --preset small" bash runs/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
RUN=${RUN:-$DEVICE}  # the run's name in assets/gpu_acceptance.json, e.g. RUN=h100
MODEL_FLAGS=${MODEL_FLAGS:---preset 270m}  # gemma.py train's flags for steps 2-4
STEPS=${STEPS:-200}
BENCH_FLAGS=${BENCH_FLAGS:---preset 270m --compile --dtype bfloat16,float16}
DATA=${DATA:-data/excerpt}
OUT=${OUT:-out-runs}
ASSETS=${ASSETS:-assets}
stop_at=$(( STEPS / 2 ))
whole=$OUT/gpu-whole split=$OUT/gpu-split float16=$OUT/gpu-float16

python prepare.py --excerpt --data_dir "$DATA"
mkdir -p "$ASSETS"

# 1. the benchmark
start=$(date +%s)
python bench.py --device "$DEVICE" $BENCH_FLAGS --out "$ASSETS/gpu_bench.json"
bench_seconds=$(( $(date +%s) - start ))

# 2. training; every step logged, so that the interrupted run's rows line up with these
rm -rf "$whole" "$split" "$float16"
train=(python gemma.py train $MODEL_FLAGS --data_dir "$DATA" --device "$DEVICE" --max_steps "$STEPS"
       --eval_interval $(( STEPS >= 4 ? STEPS / 4 : 1 )) --log_interval 1)
start=$(date +%s)
"${train[@]}" --out_dir "$whole"
train_seconds=$(( $(date +%s) - start ))
if train_figures=$(python tools/run_figures.py "$whole" --falling); then train_ok=true; else train_ok=false; fi
echo "$train_figures"

# 3. Ctrl-C once step $stop_at is logged, then --resume
last_step() {  # the last step logged in $1/metrics.jsonl, 0 before any
    grep -o '"step": [0-9]*' "$1/metrics.jsonl" 2>/dev/null | tail -n 1 | grep -o '[0-9]*$' || echo 0
}
"${train[@]}" --out_dir "$split" &
pid=$!
while kill -0 "$pid" 2>/dev/null && [ "$(last_step "$split")" -lt "$stop_at" ]; do
    sleep 0.1
done
interrupted_after=$(last_step "$split")
kill -INT "$pid" 2>/dev/null || true  # the step under way finishes and is saved, then the run exits 130
interrupted_status=0
wait "$pid" || interrupted_status=$?
"${train[@]}" --out_dir "$split" --resume
if python tools/same_run.py "$whole" "$split"; then same_rows=true; else same_rows=false; fi

# 4. float16 and its gradient scaler
"${train[@]}" --out_dir "$float16" --dtype float16 --max_steps 10 --eval_interval 10
if float16_figures=$(python tools/run_figures.py "$float16"); then float16_ok=true; else float16_ok=false; fi
echo "$float16_figures"

# 5. a story
if python gemma.py sample --out_dir "$whole" --device "$DEVICE" --max_new_tokens 100 --seed 1 \
    | tee "$whole/sample.txt"; then sample_ok=true; else sample_ok=false; fi

passed=false
if $train_ok && [ "$interrupted_status" = 130 ] && $same_rows && $float16_ok && $sample_ok; then passed=true; fi
python tools/record.py "$ASSETS/gpu_acceptance.json" --command "bash runs/gpu.sh" --run "$RUN" \
    --set "flags=$MODEL_FLAGS" --set "steps=$STEPS" --set "passed=$passed" \
    --set "bench=$(cat "$ASSETS/gpu_bench.json")" --set "bench_seconds=$bench_seconds" \
    --set "train=$train_figures" --set "train_seconds=$train_seconds" --metrics "$whole/metrics.jsonl" \
    --set "interrupted_after=$interrupted_after" --set "interrupted_status=$interrupted_status" \
    --set "resumed_same_rows=$same_rows" --set "float16=$float16_figures" --text "sample=$whole/sample.txt"
echo "acceptance run on $DEVICE: passed $passed (loss falling and finite: $train_ok; Ctrl-C after step" \
     "$interrupted_after, exit $interrupted_status; resumed, the same rows: $same_rows; float16:" \
     "$float16_ok; a story: $sample_ok)"
[ "$passed" = true ]  # else exit 1
