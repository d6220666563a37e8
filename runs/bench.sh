#!/usr/bin/env bash
# The speed figures the docs quote: bench.py on a CPU, gemma.py against transformers with the same
# weights, about 10 minutes on 2 CPU cores; run it on a quiet machine (the load average goes with the
# figures). The acceptance run on a GPU is runs/gpu.sh; before and after a change,
# tools/compare_revisions.py.
#   bash runs/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# training step, generation, a sliding layer, decoding, the loss's memory, prepare.py
python bench.py --compile --only train,generate,sliding,decode,loss,prepare --out assets/bench_cpu.json
# greedy generation against the memory bandwidth, float32 and bfloat16 weights
python bench.py --only decode --preset 270m --out assets/bench_cpu_decode.json
# the peak memory of a step at 262,144 words: the plain loss and the chunked one
python bench.py --only loss --out assets/bench_cpu_loss.json
# the small preset's training step in float32 and in bfloat16 (autocast): what --dtype auto picks on a CPU
python bench.py --only train --preset small --dtype float32,bfloat16 --out assets/bench_cpu_small.json
# a fine-tuning step of Gemma 3 270M (262,144 words), the embedding trained and frozen: tokens/s, memory
python bench.py --only finetune --out assets/bench_cpu_finetune.json
