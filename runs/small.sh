#!/usr/bin/env bash
# The CPU recipe from scratch: `--preset small` on the TinyStories excerpt, 25-30 minutes a seed on 2
# quiet CPU cores (bfloat16 where the CPU multiplies it natively). Then every story of validation.jsonl
# scored on its own, in bits per byte, and three stories; the figures go to assets/small.json, the
# curve to assets/small_loss.png.
#   bash runs/small.sh              # seeds 1 and 2
#   SEEDS=1 bash runs/small.sh      # one seed
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1 2}
python prepare.py --excerpt --data_dir data/excerpt
for seed in $SEEDS; do
    out=out-runs/small-seed$seed
    rm -rf "$out"
    start=$(date +%s)
    python gemma.py train --preset small --data_dir data/excerpt --seed "$seed" --out_dir "$out"
    seconds=$(( $(date +%s) - start ))
    python gemma.py eval --out_dir "$out" --files tinystories/validation.jsonl.gz | tee "$out/eval.txt"
    python gemma.py sample --out_dir "$out" --num_samples 3 --seed 1 --temperature 0.8 --top_k 200 \
        --max_new_tokens 120 "Once upon a time" | tee "$out/stories.txt"
    python tools/record.py assets/small.json --command "bash runs/small.sh" --run "seed$seed" \
        --set "flags=--preset small --seed $seed" --set "seconds=$seconds" \
        --metrics "$out/metrics.jsonl" --eval "validation=$out/eval.txt" --text "stories=$out/stories.txt"
done
python plot.py out-runs/small-seed* -o assets/small_loss.png
