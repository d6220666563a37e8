#!/usr/bin/env bash
# The exact commands behind every result in README.md, on the TinyStories excerpt in ../shared.
#   bash experiments.sh data        # tokenize the shared stories into data-shared/
#   bash experiments.sh sweep       # AdamW vs Muon: a learning-rate sweep of each at an equal token budget
#   bash experiments.sh small       # the CPU recipe (about 30 minutes on 2 quiet cores): the small preset, its curve and three stories
#   bash experiments.sh bench       # python bench.py (speed against transformers)
# Outputs go under runs/ (ignored by git). Each step prints what the README quotes.
set -euo pipefail
cd "$(dirname "$0")"
SHARED=../shared/data/tinystories
DATA=data-shared

case "${1:-}" in
data)
    python prepare.py --train_files $SHARED/train.jsonl --validation_files $SHARED/validation.jsonl --data_dir $DATA
    ;;
sweep)
    # 100 steps of 8 x 256 tokens (204,800 tokens) each; the same seed, batches and validation windows for all.
    common="--preset small --data_dir $DATA --max_steps 100 --batch_size 8 --total_batch_size 2048
            --warmup_steps 10 --eval_interval 25 --log_interval 25"
    for lr in 1e-3 2e-3 4e-3 8e-3 1.6e-2; do
        python gemma.py train $common --optimizer adamw --lr $lr --out_dir runs/sweep/adamw-lr$lr
    done
    for muon_lr in 0.01 0.02 0.04; do
        python gemma.py train $common --optimizer muon --muon_lr $muon_lr --lr 4e-3 --out_dir runs/sweep/muon-lr$muon_lr
    done
    python - <<'PY'
import glob, json, os
print("| run | validation loss at 204,800 tokens | mean tokens/s |")
print("| --- | --- | --- |")
for d in sorted(glob.glob("runs/sweep/*")):
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    val = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    print(f"| {os.path.basename(d)} | {val:.4f} | {sum(speed) / len(speed):,.0f} |")
PY
    python plot.py runs/sweep/adamw-lr4e-3 runs/sweep/muon-lr0.02 -o assets/adamw_vs_muon.png
    # tokens/s of the two optimizers side by side, in turns, in one process (machine noise hits both alike)
    python - <<'PY'
import statistics, time, torch
from gemma import PRESETS, Gemma, TrainConfig, make_optimizers, optimizer_step
torch.manual_seed(0)
x = torch.randint(0, 50257, (8, 257))
runs = {}
for name in ("adamw", "muon"):
    model = Gemma(PRESETS["small"][0])
    runs[name] = (model, make_optimizers(model, TrainConfig(optimizer=name), fused=False))
scaler, times = torch.amp.GradScaler("cpu", enabled=False), {name: [] for name in runs}
for rep in range(8):
    for name, (model, optimizers) in runs.items():
        t0 = time.perf_counter()
        model(x[:, :-1], x[:, 1:])[1].backward()
        optimizer_step(model, optimizers, scaler, 1.0)
        if rep >= 2:  # after two warm-up steps
            times[name].append(time.perf_counter() - t0)
for name, t in times.items():
    print(f"{name}: {8 * 256 / statistics.median(t):,.0f} tokens/s (median of {len(t)} steps of 8 x 256 tokens)")
PY
    ;;
small)
    /usr/bin/time -f "wall clock: %e s" python gemma.py train --preset small --data_dir $DATA --out_dir runs/small
    python plot.py runs/small -o assets/small_loss.png
    python gemma.py sample --out_dir runs/small --num_samples 3 --seed 1 --temperature 0.8 --top_k 200 \
        --max_new_tokens 120 "Once upon a time"
    ;;
bench)
    python bench.py --compile --out assets/bench_cpu.json
    ;;
*)
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac
