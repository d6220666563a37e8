"""
tools/compare_revisions.py: this gemma.py against another revision's, before and after a change: the
other file is loaded as a module of its own, both models get the same weights, and a training step
(forward + backward) and greedy generation with the cache are timed in turns, in one process (with
bench.py's in_turns), so that other work on the machine slows both alike. The logits and the greedy
tokens must be equal.

    git show 65969a6:gemma.py > /tmp/gemma_before.py   # the last one-file gemma.py
    python tools/compare_revisions.py /tmp/gemma_before.py --out assets/bench_before_after.json
    python tools/compare_revisions.py /tmp/gemma_before.py --quick --preset small   # a short run

The JSON keeps bench.py's layout: the command, the commit, the machine, and the figures under
"baseline", one entry a preset.
"""
import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import torch  # noqa: E402

import bench  # noqa: E402
from gemma import PRESETS, Gemma  # noqa: E402
from tools import record  # noqa: E402


def load_revision(path):
    """Another revision's gemma.py (from `git show REV:gemma.py > FILE`), as a module of its own."""
    spec = importlib.util.spec_from_file_location("gemma_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(baseline, presets, reps, new_tokens):
    """A training step (forward + backward) and greedy generation with the cache, for this gemma.py and
    the module `baseline` with the same weights, taken in turns; the outputs must be equal."""
    results = []
    for preset in presets:
        B, T = bench.SHAPES[preset]
        torch.manual_seed(0)
        ours = Gemma(PRESETS[preset][0]).train()
        theirs = baseline.Gemma(baseline.PRESETS[preset][0]).train()
        theirs.load_state_dict(ours.state_dict())  # the same module names: the same weights
        x, y = torch.randint(0, ours.config.vocab_size, (2, B, T))
        with torch.no_grad():
            same_logits = (ours(x)[0] - theirs(x)[0]).abs().max().item()
        prompt = x[:1, :16]
        outputs = {}

        def step(m):
            def run():
                m(x, y)[1].backward()
                m.zero_grad(set_to_none=True)
            return run

        def generate(name, m):
            def run():
                outputs[name] = m.generate(prompt, new_tokens, temperature=0)
            return run
        train_times = bench.in_turns({"after": step(ours), "before": step(theirs)}, warmup=1, reps=reps)
        ours.eval(), theirs.eval()
        generate_times = bench.in_turns({"after": generate("after", ours), "before": generate("before", theirs)},
                                        warmup=1, reps=reps)
        result = dict(preset=preset, batch=B, tokens=T, new_tokens=new_tokens, max_logit_difference=same_logits,
                      greedy_tokens_equal=torch.equal(outputs["after"], outputs["before"]))
        for what, times, work in (("train", train_times, B * T), ("generate", generate_times, new_tokens)):
            for name, t in times.items():
                result[f"{what} {name}"] = dict(tokens_per_s=work / statistics.median(t), all_seconds=t)
            result[f"{what} after / before"] = (result[f"{what} after"]["tokens_per_s"]
                                                / result[f"{what} before"]["tokens_per_s"])
        results.append(result)
    return results


def report(results):
    for r in results:
        bench.table([f"{r['preset']}, before and after (tokens/s, median of {len(r['train after']['all_seconds'])})",
                     "before", "after", "after / before"],
                    [[label, f"{r[what + ' before']['tokens_per_s']:,.1f}",
                      f"{r[what + ' after']['tokens_per_s']:,.1f}", f"{r[what + ' after / before']:.2f} x"]
                     for what, label in (("train", f"training step, {r['batch']} x {r['tokens']} tokens"),
                                         ("generate", f"greedy generation with the cache, {r['new_tokens']} new "
                                                      "tokens"))],
                    f"max |logits difference| {r['max_logit_difference']:.1e}; greedy tokens equal: "
                    f"{r['greedy_tokens_equal']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("file", help="the other revision's gemma.py (git show REV:gemma.py > FILE)")
    parser.add_argument("--preset", choices=list(PRESETS), help="this preset only (default: 270m and small)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and new tokens: a short run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--out", help="also write the measured numbers to this JSON file")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = dict(command=shlex.join(["python", "tools/compare_revisions.py", *argv]), **record.commit(),
                   machine=bench.machine())
    t0 = time.time()
    results["baseline"] = compare(load_revision(args.file), [args.preset] if args.preset else ["270m", "small"],
                                  reps=2 if args.quick else 6, new_tokens=16 if args.quick else 64)
    results["seconds"], results["load_average_after"] = time.time() - t0, os.getloadavg()[0]
    report(results["baseline"])
    print(f"({results['seconds']:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
