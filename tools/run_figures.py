"""
tools/run_figures.py: a finished run of `gemma.py train` in a few figures, from its metrics.jsonl,
printed as one line of JSON for tools/record.py's --set: the last step, the validation losses, the
median tokens/s (the first logged step left out: it compiles, or warms up), whether every loss is
finite and whether the last validation loss is below the first. runs/gpu.sh checks its runs with it.

    python tools/run_figures.py out-runs/gpu-whole --falling   # exit 1: a loss not finite, or not falling
    python tools/run_figures.py out-runs/gpu-float16           # exit 1: a loss not finite
"""
import argparse
import json
import math
import os
import statistics
import sys


def figures(rows):
    """The figures of a run's metrics rows."""
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    losses = [r[k] for r in rows for k in ("train_loss", "val_loss") if k in r]
    return dict(steps=max((r["step"] for r in rows), default=0), val_loss=val,
                tokens_per_s=statistics.median(speed) if speed else None,
                finite=bool(losses) and all(math.isfinite(x) for x in losses),
                loss_falling=len(val) > 1 and val[-1] < val[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("run", help="a run folder (with metrics.jsonl)")
    parser.add_argument("--falling", action="store_true", help="also fail unless the validation loss fell")
    args = parser.parse_args(argv)
    path = os.path.join(args.run, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"run_figures.py: error: {path} does not exist")
    with open(path) as f:
        found = figures([json.loads(line) for line in f])
    print(json.dumps(found))
    return 0 if found["finite"] and (found["loss_falling"] or not args.falling) else 1


if __name__ == "__main__":
    sys.exit(main())
