"""
plot.py: draw the train and validation loss curves that `python gemma.py train` logs to OUT_DIR/metrics.jsonl.

    python plot.py out                                  # -> out/loss.png
    python plot.py out-adamw out-muon -o compare.png    # several runs on one figure, labelled by folder

matplotlib is optional (pip install matplotlib): it is needed here only.
"""
import argparse, math, os, sys


def read_metrics(out_dir):
    """The rows of out_dir/metrics.jsonl: {"step", "tokens", "train_loss" | "val_loss", ...}."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"plot.py: error: no {path}: train with --out_dir {out_dir} first")
    import checkpoint  # its reader leaves out a torn last line, from a run killed while it wrote
    return checkpoint.read_metrics(path)


def plot(out_dirs, output):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window: works on a server
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot.py: error: matplotlib is not installed: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, out_dir in enumerate(out_dirs):
        rows, colour, name = read_metrics(out_dir), f"C{i}", os.path.basename(os.path.normpath(out_dir))
        train = [(r["tokens"] / 1e6, r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["tokens"] / 1e6, r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=colour, alpha=0.35, linewidth=1, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=colour, marker="o", markersize=3, label=f"{name} validation")
            last = val[-1][1]
            print(f"{out_dir}: final validation loss {last:.4f} nats/token, perplexity {math.exp(last):.2f}")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("Gemma 3 on TinyStories")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("out_dirs", nargs="*", default=["out"], help="training output folders (default: out)")
    parser.add_argument("-o", "--output", help="the PNG to write (default: OUT_DIR/loss.png of the first folder)")
    args = parser.parse_args(argv)
    plot(args.out_dirs, args.output or os.path.join(args.out_dirs[0], "loss.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
