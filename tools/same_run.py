"""
tools/same_run.py: whether two runs of `gemma.py train` logged the same metrics.jsonl, row for row,
the speed aside (tokens_per_s differs from run to run): a run stopped with Ctrl-C and resumed must log
exactly what the same run logs uninterrupted. runs/gpu.sh checks its resumed run with it.

    python tools/same_run.py out-runs/gpu-whole out-runs/gpu-split   # exit 0: the same rows; 1: not

It prints how many rows agree, or the first row that differs (in both runs) and the largest loss
difference between rows of the same step.
"""
import argparse
import json
import os
import sys

LOSSES = ("train_loss", "val_loss")


def rows(run):
    """The rows of a run folder's metrics.jsonl, without tokens_per_s."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"same_run.py: error: {path} does not exist")
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


def first_difference(a, b):
    """The index of the first row where the lists a and b differ (a row one lacks counts), else None."""
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or a[i] != b[i]:
            return i
    return None


def largest_loss_difference(a, b):
    """The largest |difference| of a loss logged at the same step in both, None if none is."""
    losses = {(r["step"], k): r[k] for r in b for k in LOSSES if k in r}
    found = [abs(r[k] - losses[r["step"], k]) for r in a for k in LOSSES if k in r and (r["step"], k) in losses]
    return max(found, default=None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("run_a", help="a run folder (with metrics.jsonl)")
    parser.add_argument("run_b", help="another")
    args = parser.parse_args(argv)
    a, b = rows(args.run_a), rows(args.run_b)
    i = first_difference(a, b)
    if i is None and a:
        print(f"the same: the {len(a)} rows of {args.run_a} and {args.run_b} are equal (tokens_per_s aside)")
        return 0
    if i is None:
        print(f"not the same: {args.run_a} and {args.run_b} logged no rows")
        return 1
    print(f"not the same: row {i + 1} differs (the largest loss difference at one step: "
          f"{largest_loss_difference(a, b)})")
    for run, r in ((args.run_a, a), (args.run_b, b)):
        print(f"  {run}: {r[i] if i < len(r) else 'no such row'}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
