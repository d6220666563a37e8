#!/usr/bin/env bash
# The exact commands behind every result in README.md, on the TinyStories excerpt in ../shared.
#   bash experiments.sh data        # tokenize the shared stories into data-shared/
#   bash experiments.sh sweep       # AdamW vs Muon: a learning-rate sweep of each, then equal tokens and equal wall-clock
#   bash experiments.sh small       # the CPU recipe, --preset small: two seeds of 25-30 minutes each on 2 quiet cores
#   bash experiments.sh small-before  # the small preset before the search (21 minutes): the README's older figures
#   bash experiments.sh bench       # python bench.py (speed against transformers)
#   bash experiments.sh baseline    # this gemma.py against the one before the speedups/checkpoint split
#   bash experiments.sh gpu         # the acceptance run on a GPU machine: about ten minutes on one H100
#   bash experiments.sh search      # the small preset's recipe at a fixed wall-clock (MINUTES=5 a run: the cheap pass)
#   MINUTES=10 bash experiments.sh search  # the third pass: the rates and floor of --preset small, 10 minutes each
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
            --warmup_steps 10 --min_lr_ratio 0.1 --dtype float32 --eval_interval 25 --log_interval 25"
    best() {  # the learning rate of the runs/sweep/$1* run that finished with the lowest validation loss
        python -c 'import glob, json, sys
def final(d):
    last = [json.loads(l) for l in open(d + "/metrics.jsonl") if "val_loss" in l][-1]
    return last["val_loss"] if last["step"] == 100 else float("inf")  # a run whose loss diverged stopped early
print(min(glob.glob(f"runs/sweep/{sys.argv[1]}*"), key=final).split(sys.argv[1])[1])' "$1"
    }
    for lr in 1e-3 2e-3 4e-3 8e-3 1.6e-2 3.2e-2 6.4e-2 1.28e-1 2.56e-1 5.12e-1 1.024; do  # doubling until it gets worse
        python gemma.py train $common --optimizer adamw --lr $lr --out_dir runs/sweep/adamw-lr$lr || true  # diverged: go on
    done
    for muon_lr in 0.01 0.02 0.04; do  # Muon for the hidden matrices; AdamW at 4e-3 for the embedding and norms
        python gemma.py train $common --optimizer muon --muon_lr $muon_lr --lr 4e-3 --out_dir runs/sweep/muon-lr$muon_lr
    done
    adamw_lr=$(best adamw-lr) muon_lr=$(best muon-lr)
    # Muon's best rate again, with AdamW's best rate for the embedding and norms
    python gemma.py train $common --optimizer muon --muon_lr $muon_lr --lr $adamw_lr --out_dir runs/sweep/muon+adamw-lr$adamw_lr
    # tokens/s of the two optimizers side by side, in turns, in one process (machine noise hits both alike)
    python - <<'PY'
import json, statistics, time, torch
from gemma import PRESETS, Gemma, TrainConfig, make_optimizers, optimizer_step
torch.manual_seed(0)
x = torch.randint(0, 50257, (8, 257))
runs = {}
for name in ("adamw", "muon"):
    model = Gemma(PRESETS["small"][0])
    runs[name] = (model, make_optimizers(model, TrainConfig(optimizer=name), fused=False))
scaler, times = torch.amp.GradScaler("cpu", enabled=False), {name: [] for name in runs}
for rep in range(12):
    for name, (model, optimizers) in runs.items():
        t0 = time.perf_counter()
        model(x[:, :-1], x[:, 1:])[1].backward()
        optimizer_step(model, optimizers, scaler, 1.0)
        if rep >= 2:  # after two warm-up steps
            times[name].append(time.perf_counter() - t0)
speed = {name: 8 * 256 / statistics.median(t) for name, t in times.items()}
for name, t in times.items():
    print(f"{name}: {speed[name]:,.0f} tokens/s (median of {len(t)} steps of 8 x 256 tokens)")
json.dump(speed, open("runs/sweep/speed.json", "w"))
PY
    # equal wall-clock: AdamW at its best rate for as many more steps as its steps are faster than Muon's
    steps=$(python -c 'import json; s = json.load(open("runs/sweep/speed.json")); print(round(100 * s["adamw"] / s["muon"]))')
    python gemma.py train $common --optimizer adamw --lr $adamw_lr --max_steps $steps --out_dir runs/sweep/wallclock-adamw-lr$adamw_lr
    python - <<'PY'
import glob, json, math, os
print("| run | steps | tokens | validation loss | perplexity |")
print("| --- | --- | --- | --- | --- |")
for d in sorted(glob.glob("runs/sweep/*/")):
    last = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl")) if "val_loss" in l][-1]
    print(f"| {os.path.basename(d[:-1])} | {last['step']} | {last['tokens']:,} | {last['val_loss']:.4f} | {math.exp(last['val_loss']):.1f} |")
PY
    python plot.py runs/sweep/adamw-lr$adamw_lr runs/sweep/muon-lr$muon_lr runs/sweep/muon+adamw-lr$adamw_lr -o assets/adamw_vs_muon.png
    ;;
small)
    # The CPU recipe (--preset small, the search's winner) on both shared training files, twice (seeds 1 and 2),
    # 25-30 minutes each on 2 quiet cores (bfloat16): every evaluation, the tokens, the wall-clock and the settings go to
    # assets/small_30min.json, from which the README's table is made; then the curves and three stories.
    # FLAGS=... NAME=... adds flags and names the JSON assets/small_30min_NAME.json: the README's float32 runs are
    # FLAGS="--dtype float32 --lr 0.256 --min_lr_ratio 0.1 --max_steps 640 --eval_interval 80" NAME=float32 (the first
    # search's recipe); FLAGS="--lr 0.256 --min_lr_ratio 0.1" NAME=lr0.256, the second's
    python prepare.py --train_files $SHARED/train.jsonl $SHARED/train-extra.jsonl \
                      --validation_files $SHARED/validation.jsonl --data_dir data-all
    export SUFFIX=${NAME:+_$NAME}  # runs/small$SUFFIX-seedS, assets/small_30min$SUFFIX*
    python - <<'PY'
import json, os, platform, shutil, subprocess, sys, time
from dataclasses import asdict
import torch
import checkpoint
from gemma import PRESETS
flags, suffix = os.environ.get("FLAGS", "").split(), os.environ["SUFFIX"]
runs = []
for seed in (1, 2):
    out = f"runs/small{suffix}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, "gemma.py", "train", "--preset", "small", "--data_dir", "data-all", "--seed",
                    str(seed), "--out_dir", out, *flags], check=True)
    seconds = time.time() - t0
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    evaluations = [dict(step=r["step"], tokens=r["tokens"], val_loss=round(r["val_loss"], 4)) for r in rows
                   if "val_loss" in r]
    runs.append(dict(seed=seed, wall_clock_s=round(seconds), tokens=evaluations[-1]["tokens"],
                     tokens_per_s=round(evaluations[-1]["tokens"] / seconds), val_loss=evaluations[-1]["val_loss"],
                     evaluations=evaluations))
    print(runs[-1], flush=True)
model, training = PRESETS["small"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
dtype = flags[flags.index("--dtype") + 1] if "--dtype" in flags else "auto"  # the preset leaves it auto
dtype = checkpoint.pick_dtype(dtype, torch.device("cpu"))  # what auto is on this machine
json.dump(dict(command=" ".join(["python gemma.py train --preset small --data_dir data-all --seed SEED", *flags]),
               machine=dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__), dtype=str(dtype)[6:],
               data="train.jsonl + train-extra.jsonl (1,527,733 tokens); validation.jsonl's 64 fixed windows",
               model=asdict(model), training=training, runs=runs),
          open(f"assets/small_30min{suffix}.json", "w"), indent=2)
PY
    python plot.py runs/small$SUFFIX-seed1 runs/small$SUFFIX-seed2 -o assets/small_30min${SUFFIX}_loss.png
    python gemma.py sample --out_dir runs/small$SUFFIX-seed1 --num_samples 3 --seed 1 --temperature 0.8 --top_k 200 \
        --max_new_tokens 120 "Once upon a time"
    ;;
small-before)
    # The small preset as it was before the search (AdamW, 6 layers of width 128, train.jsonl only): the README's
    # older figures, kept for comparison (21 minutes on 2 quiet cores)
    /usr/bin/time -f "wall clock: %e s" python gemma.py train --preset small --optimizer adamw --lr 0.128 \
        --warmup_steps 25 --min_lr_ratio 0.1 --dtype float32 --max_steps 500 --eval_interval 50 --data_dir $DATA \
        --out_dir runs/small
    python plot.py runs/small -o assets/small_loss.png
    python gemma.py sample --out_dir runs/small --num_samples 3 --seed 1 --temperature 0.8 --top_k 200 \
        --max_new_tokens 120 "Once upon a time"
    ;;
bench)
    python bench.py --compile --out assets/bench_cpu.json
    python bench.py --only decode --preset 270m --out assets/bench_cpu_decode.json  # against the memory bandwidth
    python bench.py --only loss --out assets/bench_cpu_loss.json  # peak memory at 262,144 words: plain and chunked loss
    # the small preset's training step in float32 and in bfloat16 (autocast): what --dtype auto picks on a CPU
    python bench.py --only train --preset small --dtype float32,bfloat16 --out assets/bench_cpu_small.json
    ;;
gpu)
    # everything a user does on a fresh GPU machine: bench.py on the 270M configuration (bfloat16 and float16,
    # compiled, against transformers), 200 training steps on the shared stories (bfloat16, compiled: the defaults
    # on a GPU), the same run stopped with Ctrl-C and resumed (compared row for row), float16 with its gradient
    # scaler, and a story; the figures go to assets/gpu_acceptance.json, from which the README's GPU table is made
    python prepare.py --train_files $SHARED/train.jsonl $SHARED/train-extra.jsonl \
                      --validation_files $SHARED/validation.jsonl --data_dir data-gpu
    python bench.py --acceptance data-gpu --device cuda --out assets/gpu_acceptance.json
    ;;
baseline)
    mkdir -p runs && git show 65969a6:gemma.py > runs/gemma_before.py  # the last one-file gemma.py
    python bench.py --baseline runs/gemma_before.py --out assets/bench_before_after.json
    ;;
search)
    # Each recipe trains for MINUTES of wall-clock on both shared training files: a few steps first measure its
    # tokens/s, which set --max_steps so that the run (its evaluations included) fills the budget and the
    # schedule decays to its floor at the end. Scored by the validation loss on validation.jsonl's fixed windows.
    python prepare.py --train_files $SHARED/train.jsonl $SHARED/train-extra.jsonl \
                      --validation_files $SHARED/validation.jsonl --data_dir data-all
    MINUTES=${MINUTES:-5} python - <<'PY'
import json, os, shutil, statistics, subprocess, sys, time
minutes, out = float(os.environ["MINUTES"]), f"assets/small_search_{os.environ['MINUTES']}min.json"
# the small preset as it was before the search (6 layers, width 128, AdamW lr 0.128, 16 x 256 tokens, decay to 10%,
# float32: what --dtype auto meant on a CPU then)
small = ("--preset small --data_dir data-all --eval_windows 64 --log_interval 10 --optimizer adamw --lr 0.128 "
         "--min_lr_ratio 0.1 --dtype float32").split()
recipes = {  # name: flags on top of it
    "preset (AdamW 0.128)": [],
    "Muon 0.02 + AdamW 0.512": "--optimizer muon --muon_lr 0.02 --lr 0.512".split(),
    "Muon 0.04 + AdamW 0.256": "--optimizer muon --muon_lr 0.04 --lr 0.256".split(),
    "AdamW 0.256": "--lr 0.256".split(),
    "batch 2048 tokens": "--batch_size 8 --total_batch_size 2048".split(),
    "width 192": "--hidden_size 192 --intermediate_size 768 --head_dim 48".split(),
    "8 layers": "--num_hidden_layers 8 --sliding_window_pattern 4".split(),
    "4 layers, width 192": "--num_hidden_layers 4 --sliding_window_pattern 4 --hidden_size 192 "
                           "--intermediate_size 768 --head_dim 48".split(),
    "feed-forward 1024": "--intermediate_size 1024".split(),
    "block 128, window 64": "--block_size 128 --batch_size 32 --sliding_window 64".split(),
}
muon = "--optimizer muon --muon_lr 0.04 --lr 0.256".split()  # the first pass's leader, and what it tries next
recipes |= {
    "Muon 0.04 + AdamW 0.256, again": muon,  # the same recipe on the day's machine and code: the control
    "Muon, bfloat16": muon + "--dtype bfloat16".split(),  # autocast: the matrix multiplies in bfloat16
}
muon = muon + "--dtype bfloat16".split()  # the second pass's leader
recipes |= {
    "Muon, bfloat16, compiled": muon + ["--compile"],
    "Muon, bfloat16, warm-up 10, floor 0.0": muon + "--warmup_steps 10 --min_lr_ratio 0.0".split(),
    "Muon, bfloat16, batch 2048 tokens": muon + "--batch_size 8 --total_batch_size 2048".split(),
    "Muon, bfloat16, GQA 4/2": muon + "--num_key_value_heads 2".split(),
    "Muon, bfloat16, head 64 (2 heads)": muon + "--head_dim 64 --num_attention_heads 2".split(),
}
if minutes == 10:  # the third pass, 10 minutes a recipe: the rates and the floor of --preset small as it is
    recipes = {
        "preset small (the control)": muon,
        "AdamW 0.128": muon + "--lr 0.128".split(),
        "Muon 0.08": muon + "--muon_lr 0.08".split(),
        "floor 0.0": muon + "--min_lr_ratio 0.0".split(),
        "AdamW 0.064": muon + "--lr 0.064".split(),  # after AdamW 0.128 won
    }
results = json.load(open(out)) if os.path.exists(out) else {}
for name, flags in recipes.items():
    if name in results:
        continue
    probe = "runs/search/probe"
    shutil.rmtree(probe, ignore_errors=True)
    subprocess.run([sys.executable, "gemma.py", "train", *small, *flags, "--max_steps", "14", "--eval_interval",
                    "1000", "--log_interval", "1", "--out_dir", probe], check=True, capture_output=True)
    rows = [json.loads(l) for l in open(f"{probe}/metrics.jsonl")]  # steps 7-14: past the first, slower ones
    speed = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 6)
    tokens_per_step = rows[-1]["tokens"] // rows[-1]["step"]
    steps = int(0.9 * minutes * 60 * speed / tokens_per_step)  # 10% for start-up and evaluations
    run = f"runs/search/{minutes:g}min/" + name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, "gemma.py", "train", *small, *flags, "--max_steps", str(steps),
                    "--eval_interval", str(max(1, steps // 5)), "--out_dir", run], check=True)
    seconds = time.time() - t0
    last = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if "val_loss" in l][-1]
    results[name] = dict(flags=" ".join(flags), steps=steps, tokens=last["tokens"], seconds=round(seconds),
                         probe_tokens_per_s=round(speed), tokens_per_s=round(last["tokens"] / seconds),
                         val_loss=round(last["val_loss"], 4))
    json.dump(results, open(out, "w"), indent=2)
    print(name, results[name], flush=True)
print("| recipe | flags | steps | tokens | wall-clock | tokens/s | validation loss |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
for name, r in sorted(results.items(), key=lambda x: x[1]["val_loss"]):
    print(f"| {name} | `{r['flags']}` | {r['steps']} | {r['tokens']:,} | {r['seconds']} s | {r['tokens_per_s']:,} | "
          f"{r['val_loss']:.3f} |")
PY
    ;;
*)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
