"""
plot.py: draw the train and validation loss curves that `python gemma.py train` logs to OUT_DIR/metrics.jsonl,
in bits per byte of text (a unit that compares across tokenizers), or in nats per token for runs logged without it.

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
    runs = [(out_dir, read_metrics(out_dir)) for out_dir in out_dirs]
    # bits per byte compare across tokenizers; runs logged before it was measured have nats only
    bits = all(any("val_bpb" in r for r in rows) for _, rows in runs)
    train_key, val_key = ("train_bpb", "val_bpb") if bits else ("train_loss", "val_loss")
    for i, (out_dir, rows) in enumerate(runs):
        colour, name = f"C{i}", os.path.basename(os.path.normpath(out_dir))
        train = [(r["tokens"] / 1e6, r[train_key]) for r in rows if train_key in r]
        val = [(r["tokens"] / 1e6, r[val_key]) for r in rows if val_key in r]
        if train:
            ax.plot(*zip(*train), color=colour, alpha=0.35, linewidth=1, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), color=colour, marker="o", markersize=3, label=f"{name} validation")
            last = [r for r in rows if "val_loss" in r][-1]
            in_bits = f", {last['val_bpb']:.4f} bits/byte" if "val_bpb" in last else ""
            print(f"{out_dir}: final validation loss {last['val_loss']:.4f} nats/token{in_bits}, "
                  f"perplexity {math.exp(min(last['val_loss'], 700)):.2f}")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("bits per byte of text" if bits else "cross-entropy (nats per token)")
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
