"""
presets.py: the recipes of `gemma.py train --preset NAME`: a model's shape (GemmaConfig's fields)
and the training settings that suit it (TrainConfig's fields). Any flag overrides either.

    python gemma.py train --preset small              # the CPU recipe
    python gemma.py train --preset small --lr 0.064   # the same, one setting changed

Each recipe says where its figures come from; docs/LOG.md holds the runs behind them. This module
never imports gemma.py: gemma.py builds its GemmaConfig from these plain settings.
"""

PRESETS = {
    # Gemma 3 270M itself (GemmaConfig's defaults), with GPT-2's vocabulary: 132M parameters
    "270m": ({}, {}),
    # A few million parameters that two CPU cores train in 25-30 minutes (bfloat16 where the CPU
    # multiplies it natively): 6 layers (5 sliding, 1 full) of width 128, head size 32, a window of
    # 128; Muon for the hidden matrices, AdamW for the embedding and norms, decaying to 0. Found
    # by three passes of a search at a fixed wall-clock (docs/LOG.md, 2026-11).
    "small": (dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, head_dim=32,
                   sliding_window=128),
              dict(block_size=256, batch_size=16, total_batch_size=4096, eval_windows=64,
                   optimizer="muon", muon_lr=0.04, lr=0.128, min_lr_ratio=0.0, warmup_steps=25,
                   max_steps=1000, eval_interval=125)),
    # The small preset's depth and optimizer, twice its width, with a vocabulary of its own: a
    # byte-level BPE of 4,096 words fitted to the training stories (prepare.py --bpe 4096), 3.9
    # bytes a token against GPT-2's 4.0 (on validation.jsonl), with an output layer a twelfth of
    # GPT-2's. 1,400 steps: 29 minutes on 2 CPU cores. The 3-minute search (runs/bpe_search.sh)
    # ranked 4,096 words first among 2,048, 4,096 and 8,192; at 30 minutes this width scored 0.865
    # bits per byte and width 128 (2,500 steps) 0.877; a second seed scored 0.849. A weight decay
    # of 0.4 instead of 0.1 narrowed the gap between training and validation loss but scored
    # 0.864 and 0.860 (runs/regularise_search.sh, runs/from_scratch.sh; docs/LOG.md, 2026-11-30).
    # Head size, feed-forward width, window, block, batch, rates and AdamW alone did no better in a
    # 10-minute copy of its regime (runs/regularise_search.sh; docs/LOG.md, 2026-12-01).
    "tiny": (dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                  head_dim=64, sliding_window=128),
             dict(block_size=256, batch_size=16, total_batch_size=4096, eval_windows=64,
                  optimizer="muon", muon_lr=0.04, lr=0.128, min_lr_ratio=0.0, warmup_steps=25,
                  max_steps=1400, eval_interval=175)),
    # No model of its own (None): settings for fine-tuning a checkpoint given by --init_from, such
    # as Google's Gemma 3 270M, for 30 minutes on two CPU cores. The embedding (168M of 268M
    # parameters, and the output layer too) stays frozen: a step is 4-5x sooner and the stories
    # scored better at every rate tried; 3e-5 was the best of 1e-5 to 3e-4; windows begin at a
    # story's <bos> (runs/finetune_search.sh, docs/LOG.md, 2026-11-30).
    "finetune": (None, dict(block_size=256, batch_size=4, total_batch_size=1024, lr=3e-5,
                            warmup_steps=10, max_steps=300, freeze_embedding=True,
                            eval_interval=300, eval_windows=16, log_interval=10)),
}
