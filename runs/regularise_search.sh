#!/usr/bin/env bash
# The search in --preset tiny's regime of repetition, found cheaply: a third of the training
# stories for 10 minutes of 2 CPU cores (a third of the 30-minute run's steps) sees each token as
# many times as the 30-minute run sees the whole excerpt (3.7 passes), so what helps against
# memorising there helps at 30 minutes, at a third of the cost. Every recipe is --preset tiny (the
# same 4,096-word BPE) with some flags changed; tools/budget.py gives each the steps that fill 10
# minutes, so a slower shape trains fewer steps. Each scored on every story of validation.jsonl in
# bits per byte -> assets/regularise_search.json.
#   bash runs/regularise_search.sh
#   RECIPES="tiny ff512" bash runs/regularise_search.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=10
declare -A RECIPE=(
    [tiny]=""  # the preset as it is
    [wd0.4]="--weight_decay 0.4"
    [wd1.0]="--weight_decay 1.0"
    [ff512]="--intermediate_size 512"
    [ff2048]="--intermediate_size 2048"
    [head32]="--head_dim 32 --num_attention_heads 8"
    [scale64]="--query_pre_attn_scalar 64"  # scores scaled by head_dim ** -0.5, not 256 ** -0.5
    [window64]="--sliding_window 64"
    [block512]="--block_size 512 --batch_size 8"
    [batch8k]="--total_batch_size 8192"
    [muon0.02]="--muon_lr 0.02"
    [muon0.08]="--muon_lr 0.08"
    [adamw]="--optimizer adamw --lr 0.01"
)
ORDER=${RECIPES:-tiny wd0.4 wd1.0 ff512 scale64 block512 head32 muon0.02 muon0.08 batch8k window64 \
    ff2048 adamw}
full=data/excerpt-bpe4096
third=data/excerpt-third-bpe4096
python prepare.py --excerpt --bpe 4096 --data_dir "$full"
stories=$third-stories.jsonl  # every third story of the two training files
if [ ! -f "$third/meta.json" ]; then
    zcat tinystories/train.jsonl.gz tinystories/train-extra.jsonl.gz | awk 'NR % 3 == 1' > "$stories"
    python prepare.py --train_files "$stories" --validation_files tinystories/validation.jsonl.gz \
        --tokenizer "$full/tokenizer/tokenizer.json" --data_dir "$third"
fi
for name in $ORDER; do
    flags="--preset tiny ${RECIPE[$name]} --seed 1"
    steps=$(python tools/budget.py "$MINUTES" $flags --data_dir "$third")
    out=out-runs/regularise-$name
    rm -rf "$out"
    start=$(date +%s)
    python gemma.py train $flags --max_steps "$steps" --eval_interval $(( steps / 4 )) \
        --data_dir "$third" --out_dir "$out"
    seconds=$(( $(date +%s) - start ))
    python gemma.py eval --out_dir "$out" --files tinystories/validation.jsonl.gz | tee "$out/eval.txt"
    python tools/record.py assets/regularise_search.json --command "bash runs/regularise_search.sh" \
        --run "$name" --set "flags=$flags --max_steps $steps" --set "steps=$steps" \
        --set "seconds=$seconds" --metrics "$out/metrics.jsonl" --eval "validation=$out/eval.txt"
done
