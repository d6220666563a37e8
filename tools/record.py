"""
tools/record.py: a result of the project as JSON in assets/, stamped with what made it: the command,
the commit (and whether the tree had changes), the date and the machine. The scripts in runs/ call
it once a run is done, so that every figure the README shows names the command and commit behind it.

    python tools/record.py assets/finetune.json --command "bash runs/finetune.sh" --run seed1 \
        --metrics out-ft/metrics.jsonl --eval before=before.txt --eval after=after.txt \
        --text stories=stories.txt --set seconds=1790 --set settings='{"lr": 3e-4}'

Each --run NAME goes under "runs" of the file, beside the runs already there (a search adds one run
at a time), with its own commit and date. --eval reads what `gemma.py eval` printed (its last line
of figures); --metrics, a run's metrics.jsonl; --text, any text file as it is; --set, a value (JSON,
else a string).
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
EVAL_LINE = re.compile(r"loss (?P<loss>[\d.]+) nats/token, (?P<bpb>[\d.]+) bits/byte, perplexity "
                       r"(?P<perplexity>[\d.]+), (?P<stories>\d+) stories in (?P<windows>\d+) windows")


def commit(written=None, repo=HERE):
    """The repository's commit, and whether the tree differs from it (a run of uncommitted code).
    The file the record goes to is not code: a search's earlier runs change it, the run does not."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True).stdout
    own = os.path.relpath(os.path.abspath(written), repo) if written else None
    status = git("status", "--porcelain", "--untracked-files=no").splitlines()
    changed = [line for line in status if line[3:] != own]  # "XY path"
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_changes": bool(changed)}


def machine():
    """The machine by what it is: CPU model, cores, whether it multiplies bfloat16 natively."""
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = names[0] if names else model
    info = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["cpu_bfloat16"] = bool(torch.cpu._is_avx512_bf16_supported()
                                    or torch.cpu._is_amx_tile_supported())
    except ImportError:
        pass
    return info


def read_eval(path):
    """The figures of what `gemma.py eval` printed: loss (nats/token), bpb, perplexity, stories,
    windows."""
    with open(path) as f:
        found = [m for m in map(EVAL_LINE.search, f) if m]
    if not found:
        raise SystemExit(f"record.py: error: {path} holds no line of `gemma.py eval` figures")
    return {k: float(v) if "." in v else int(v) for k, v in found[-1].groupdict().items()}


def read_metrics(path):
    """A run's metrics.jsonl, row by row (a torn last line left out)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def pairs(items):
    """NAME=VALUE arguments as (NAME, VALUE)."""
    for item in items or []:
        name, _, value = item.partition("=")
        if not name or not value:
            raise SystemExit(f"record.py: error: {item!r} is not NAME=VALUE")
        yield name, value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("path", help="the JSON file to write (its other runs are kept)")
    parser.add_argument("--command", required=True, help="the command that made the result")
    parser.add_argument("--run", default="run", help="the run's name within the file")
    parser.add_argument("--metrics", help="a run's metrics.jsonl")
    parser.add_argument("--eval", action="append", metavar="NAME=FILE", help="gemma.py eval's output")
    parser.add_argument("--text", action="append", metavar="NAME=FILE", help="a text file")
    parser.add_argument("--set", action="append", metavar="NAME=VALUE", help="a value")
    args = parser.parse_args(argv)
    run = {**commit(args.path), "date": datetime.date.today().isoformat(), "machine": machine()}
    for name, value in pairs(args.set):
        try:
            run[name] = json.loads(value)
        except ValueError:
            run[name] = value
    for name, path in pairs(args.eval):
        run[name] = read_eval(path)
    for name, path in pairs(args.text):
        with open(path) as f:
            run[name] = f.read()
    if args.metrics:
        run["metrics"] = read_metrics(args.metrics)
    record = {}
    if os.path.exists(args.path):
        with open(args.path) as f:
            record = json.load(f)
    record["command"] = args.command
    record.setdefault("runs", {})[args.run] = run
    with open(args.path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(args.path + ".tmp", args.path)
    print(f"wrote {args.path} (run {args.run})", file=sys.stderr)


if __name__ == "__main__":
    main()
