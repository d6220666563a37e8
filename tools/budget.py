"""
tools/budget.py: how many optimizer steps of a recipe fill a budget of wall-clock on this machine, so
that a search can give every recipe the same minutes and let each one's schedule decay to its floor
at the end. It trains the recipe for a few steps (a probe, in a folder of its own), takes the median
step time after the first, slower ones, and leaves a share of the budget to start-up and
evaluations.

    steps=$(python tools/budget.py 5 --preset small --data_dir data)   # 5 minutes of this recipe
    python gemma.py train --preset small --data_dir data --max_steps $steps

The flags after the minutes are gemma.py train's, as the run will be given them.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PROBE_STEPS = 14  # the first few steps are slower (allocations, caches): the median of the rest
SPARE = 0.1  # of the budget, for start-up and the evaluations


def steps_for(minutes, flags):
    """The steps of `gemma.py train FLAGS` that fill `minutes`, from a probe of PROBE_STEPS steps."""
    probe = tempfile.mkdtemp(prefix="budget-probe-")
    try:
        command = [sys.executable, "gemma.py", "train", *flags, "--out_dir", probe, "--max_steps",
                   str(PROBE_STEPS), "--eval_interval", str(10 ** 9), "--log_interval", "1"]
        result = subprocess.run(command, cwd=HERE, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"budget.py: error: the probe failed: {result.stderr.strip()[-500:]}")
        with open(os.path.join(probe, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    steps = [r for r in rows if "tokens_per_s" in r]
    tokens_per_step = steps[-1]["tokens"] // steps[-1]["step"]
    seconds_per_step = statistics.median(tokens_per_step / r["tokens_per_s"]
                                         for r in steps if r["step"] > PROBE_STEPS // 2)
    return max(1, int((1 - SPARE) * minutes * 60 / seconds_per_step))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python tools/budget.py MINUTES [gemma.py train flags]")
    print(steps_for(float(sys.argv[1]), sys.argv[2:]))
