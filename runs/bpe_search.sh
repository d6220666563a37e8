#!/usr/bin/env bash
# The search behind --preset tiny: a vocabulary fitted to TinyStories and the model it frees, each
# recipe given the same minutes of wall-clock on 2 quiet CPU cores (tools/budget.py sets its steps
# from a probe, so that its schedule decays to its floor at the end), then scored in bits per byte
# on every story of validation.jsonl. One record a recipe in assets/bpe_search_${MINUTES}min.json.
#   bash runs/bpe_search.sh                 # every recipe, 5 minutes each
#   MINUTES=10 bash runs/bpe_search.sh      # the same at 10 minutes
#   RECIPES="v4096-w256" bash runs/bpe_search.sh   # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${MINUTES:-5}
# the shape of --preset small, the optimizer of --preset small; each recipe changes some of it
BASE="--preset small --eval_windows 64 --eval_interval 100000 --log_interval 20"
W256="--hidden_size 256 --intermediate_size 1024 --head_dim 64"
declare -A RECIPE=(
    [v4096-w128]="--vocab_size 4096"
    [v4096-w256]="--vocab_size 4096 $W256"
    [v4096-w256-l8]="--vocab_size 4096 $W256 --num_hidden_layers 8 --sliding_window_pattern 4"
    [v4096-w384]="--vocab_size 4096 --hidden_size 384 --intermediate_size 1536 --head_dim 96"
    [v512-w256]="--vocab_size 512 $W256"
    [v2048-w256]="--vocab_size 2048 $W256"
    [v8192-w256]="--vocab_size 8192 $W256"
)
ORDER=${RECIPES:-v4096-w128 v4096-w256 v2048-w256 v8192-w256 v512-w256 v4096-w256-l8 v4096-w384}
for name in $ORDER; do
    flags="$BASE ${RECIPE[$name]}"
    vocab=$(echo "$flags" | sed -E 's/.*--vocab_size ([0-9]+).*/\1/')
    data=data/excerpt-bpe$vocab
    [ -f "$data/meta.json" ] || python prepare.py --excerpt --bpe "$vocab" --data_dir "$data"
    steps=$(python tools/budget.py "$MINUTES" $flags --data_dir "$data")
    out=out-runs/bpe-search-${MINUTES}min/$name
    rm -rf "$out"
    start=$(date +%s)
    python gemma.py train $flags --data_dir "$data" --max_steps "$steps" --out_dir "$out"
    seconds=$(( $(date +%s) - start ))
    python gemma.py eval --out_dir "$out" --files tinystories/validation.jsonl.gz | tee "$out/eval.txt"
    python tools/record.py "assets/bpe_search_${MINUTES}min.json" --command "bash runs/bpe_search.sh" \
        --run "$name" --set "flags=$flags --max_steps $steps" --set "steps=$steps" \
        --set "seconds=$seconds" --metrics "$out/metrics.jsonl" --eval "validation=$out/eval.txt"
done
