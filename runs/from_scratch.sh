#!/usr/bin/env bash
# A preset trained from scratch on the TinyStories excerpt, 25-30 minutes a seed on 2 quiet CPU cores
# (bfloat16 where the CPU multiplies it natively): `--preset small` with GPT-2's BPE, or a preset
# whose vocabulary is the stories' own BPE (`--preset tiny`: prepare.py --bpe of its vocab_size).
# Then every story of validation.jsonl scored on its own, in bits per byte, and three stories; the
# figures go to assets/$NAME.json, the curves to assets/${NAME}_loss.png (NAME: the preset's, unless
# FLAGS make a variant of it).
#   bash runs/from_scratch.sh                       # --preset small, seeds 1 and 2
#   PRESET=tiny SEEDS=1 bash runs/from_scratch.sh   # --preset tiny, one seed
#   PRESET=tiny FLAGS="--weight_decay 0.4" NAME=tiny-wd0.4 bash runs/from_scratch.sh  # a variant
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-small}
SEEDS=${SEEDS:-1 2}
FLAGS=${FLAGS:-}       # flags that change the preset (a variant), given to train after it
NAME=${NAME:-$PRESET}  # the name of the variant: its folders, its JSON and its curve
vocab=$(python -c "import presets; print(presets.PRESETS['$PRESET'][0].get('vocab_size', ''))")
if [ -n "$vocab" ]; then  # the stories' own BPE, fitted to the training files
    data=data/excerpt-bpe$vocab
    python prepare.py --excerpt --bpe "$vocab" --data_dir "$data"
else                      # GPT-2's BPE
    data=data/excerpt
    python prepare.py --excerpt --data_dir "$data"
fi
for seed in $SEEDS; do
    out=out-runs/$NAME-seed$seed
    rm -rf "$out"
    start=$(date +%s)
    python gemma.py train --preset "$PRESET" $FLAGS --data_dir "$data" --seed "$seed" --out_dir "$out"
    seconds=$(( $(date +%s) - start ))
    python gemma.py eval --out_dir "$out" --files tinystories/validation.jsonl.gz | tee "$out/eval.txt"
    python gemma.py sample --out_dir "$out" --num_samples 3 --seed 1 --temperature 0.8 --top_k 200 \
        --max_new_tokens 120 "Once upon a time" | tee "$out/stories.txt"
    python tools/record.py "assets/$NAME.json" \
        --command "PRESET=$PRESET FLAGS=\"$FLAGS\" NAME=$NAME bash runs/from_scratch.sh" \
        --run "seed$seed" --set "flags=--preset $PRESET $FLAGS --seed $seed" --set "seconds=$seconds" \
        --metrics "$out/metrics.jsonl" --eval "validation=$out/eval.txt" --text "stories=$out/stories.txt"
done
python plot.py out-runs/$NAME-seed* -o "assets/${NAME}_loss.png"
