"""
checkpoint.py: the state of a training run, so that it can stop at any moment and go on as if it
had not: weights, optimizers, gradient scaler, every random-number generator, the position in the
stream of batches, and the metrics logged so far; and what a machine does to a run: a signal to
stop, a full disk, a second run in its folder.

    python gemma.py train --resume      # continue from out/ckpt.pt, exactly where it stopped
    python -m pytest test_runs.py       # kills, resumes, bad input (slow: subprocesses)

It also turns the command line into a run's settings (run_configs), merging a preset, the
checkpoint of a resumed run and the flags.

A checkpoint is written to a temporary file, flushed to disk and renamed over the old one, so a
crash, a kill or a full disk at any moment leaves the old checkpoint or the new one, whole. It holds
only tensors and plain values: torch.load(..., weights_only=True) reads it. One folder, one run: a
training holds out_dir/.lock (rank 0, from before it reads the checkpoint until it exits), which the
system lets go of if it is killed, and a second training there is refused in one line while the
first runs. This module never imports gemma.py.
"""
import json, os, signal, sys
from dataclasses import asdict, fields, replace

import torch

import hf  # a Hugging Face checkpoint's settings, for --init_from
from cli import UserError
from files import FolderLock, signals_held, survive_file_size_limits, why_unwritten

# fields of the model's configuration that a resumed run may change: they hold no weights
ARCHITECTURE_FREE = {"max_position_embeddings"}


def save(path, state):
    """Write `state` to `path` atomically: a temporary file, flushed to disk, then renamed."""
    tmp = path + ".tmp"
    survive_file_size_limits()  # over a file-size limit: fail the write, not the process
    file = None
    try:
        with open(tmp, "wb") as f:
            file = WriteErrors(f)
            torch.save(state, file)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        e = file.error if file and file.error else e  # the write's own error, with its errno
        what, fix = why_unwritten(e)
        raise UserError(f"could not write {path} ({what}); the previous checkpoint there is "
                        f"intact: {fix}, then continue with --resume") from None
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


class WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write, which torch.save itself
    reports only as a RuntimeError about positions, so that a full disk can be told (see
    prepare.why_unwritten)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def load(out_dir):
    """out_dir/ckpt.pt as a dict, or a UserError that says what to do."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        if os.path.isfile(os.path.join(out_dir, "config.json")):  # an export, or a download
            raise UserError(f"no checkpoint at {path}: {out_dir} holds a Hugging Face model; pass "
                            f"it as --init_from {out_dir}")
        raise UserError(f"no checkpoint at {path}: train first (python gemma.py train), "
                        "or pass --out_dir")
    try:  # plain tensors and Python values only: weights_only refuses anything that runs code
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(state, dict) and {"model", "model_config"} <= state.keys()
    except Exception as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}): it is damaged or truncated; "
                        "delete it and train again") from None
    state["model"] = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    return state


def rng_states(data_rng, device):
    """Every random-number generator a run draws from."""
    return dict(torch=torch.get_rng_state(), data=data_rng.get_state(),
                cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                mps=[torch.mps.get_rng_state()] if device.type == "mps" else [])


def capture(model, optimizers, scaler, data_rng, device, step, best_val_loss, evaluated, configs):
    """Everything a run needs to go on: `evaluated` says that this step's evaluation is done and
    logged, so that a resumed run does not repeat it. configs: plain dicts of the two settings."""
    return dict(model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers.values()],
                scaler=scaler.state_dict(), step=step, best_val_loss=best_val_loss,
                evaluated=evaluated, rng=rng_states(data_rng, device), **configs)


def run_configs(args, GemmaConfig, TrainConfig, presets):
    """A run's settings from the command line's args: the preset's (or --init_from's model), on
    --resume overridden by the checkpoint's, then by the flags', and a resume checked against the
    checkpoint (check_resumable, nothing_to_do). -> (TrainConfig, GemmaConfig, the checkpoint to
    resume or None)."""
    model_flags = {f.name: args.pop(f.name) for f in fields(GemmaConfig) if f.name in args}
    if args.get("preset", "270m") not in presets:
        raise UserError(f"--preset must be one of {', '.join(presets)}, not {args['preset']}")
    for flag in ("out_dir", "data_dir"):  # "" would be the current folder, by accident
        if not args.get(flag, "default").strip():
            raise UserError(f"--{flag} is empty: name a folder")
    out_dir = args.get("out_dir", "out")
    if os.path.realpath(out_dir) == os.path.realpath(args.get("data_dir", "data")):
        raise UserError(f"--out_dir and --data_dir are one folder ({out_dir}): a run and a dataset "
                        "each keep a tokenizer/ there; train into another --out_dir")
    lock_run(out_dir)  # one folder, one run: before its checkpoint is read
    ckpt = load(out_dir) if args.get("resume") else must_be_new(out_dir)  # never overwritten
    if ckpt is not None:
        model_config = GemmaConfig(**ckpt["model_config"])
        c = TrainConfig(**ckpt["train_config"])
        if args.get("preset", c.preset) != c.preset:  # another preset's model: refused in train()
            model_config = presets[args["preset"]][0] or model_config  # (None: a checkpoint's)
    else:
        model_config, defaults = presets[args.get("preset", "270m")]
        c = replace(TrainConfig(), **defaults)
    c = replace(c, **args)
    c.check()
    if model_config is None and not c.init_from:  # a preset of settings for fine-tuning
        raise UserError(f"--preset {c.preset} continues a checkpoint's training: give --init_from "
                        "(a download of google/gemma-3-270m, say)")
    if c.init_from and ckpt is None:  # the checkpoint's model, whose weights have their shapes
        try:
            model_config = GemmaConfig(**hf.pretrained_settings(c.init_from))
        except ValueError as e:  # a shape that cannot make a model, such as an odd head_dim
            raise UserError(f"--init_from {c.init_from}: its config.json makes no model "
                            f"({str(e).replace('--', '')})") from None
        if model_flags:
            raise UserError(f"--init_from gives the model: drop --{' --'.join(model_flags)}")
    try:  # a model that cannot be made: GemmaConfig says why
        if model_flags:
            model_config = replace(model_config, layer_types=None, **model_flags)
        context = model_config.max_position_embeddings if c.init_from else c.block_size
        model_config = replace(model_config, max_position_embeddings=context)
    except ValueError as e:
        raise UserError(str(e)) from None
    if ckpt is not None:  # before any work: a resume that cannot be, or that has nothing to do
        check_resumable(ckpt, asdict(model_config), asdict(c), out_dir)
        nothing_to_do(ckpt["step"], ckpt.get("evaluated"), c)
    return c, model_config, ckpt


def nothing_to_do(step, evaluated, c):
    """A resume with no step left says where the run stands instead of nothing: done (its last step
    evaluated and saved: exit 0), or --max_steps below the saved step (a mistake: refused)."""
    if step > c.max_steps:
        raise UserError(f"the run in {c.out_dir} is at step {step}, beyond --max_steps "
                        f"{c.max_steps}: nothing to do; pass --max_steps above {step} to train on")
    if step == c.max_steps and evaluated:
        print(f"the run in {c.out_dir} is done: step {step} of --max_steps {c.max_steps}, "
              "evaluated and saved; nothing to do (pass a higher --max_steps to train on)")
        sys.exit(0)


def check_resumable(state, model_config, train_config, out_dir):
    """Refuse, in one line, a resume that cannot give back the saved run: another architecture
    (the fields named), another optimizer or another frozen embedding (the state would not fit)."""
    saved = state["model_config"]
    changed = [k for k, v in model_config.items()
               if k not in ARCHITECTURE_FREE and saved.get(k) != v]
    if changed:
        raise UserError(f"the checkpoint in {out_dir} has another architecture "
                        f"({', '.join(changed)} differ): resume with its settings, "
                        "or train into a new --out_dir")
    for flag in ("optimizer", "freeze_embedding"):  # the optimizers' state would not fit
        was = state.get("train_config", {}).get(flag, train_config[flag])
        if was != train_config[flag]:
            given = f"--{'' if was else 'no-'}{flag}" if was in (True, False) else f"--{flag} {was}"
            raise UserError(f"the checkpoint in {out_dir} was trained with {given}: resume with "
                            "it, or train into a new --out_dir")


def restore(state, model, optimizers, scaler, data_rng, device):
    """Load a captured state into a new run's objects; returns (step, best_val_loss, evaluated)."""
    model.load_state_dict(state["model"])
    for opt, saved in zip(optimizers.values(), state["optimizers"]):  # in make_optimizers' order
        opt.load_state_dict(saved)
    # a float16 run resumed from a float32 or bfloat16 one starts a fresh gradient scaler; the
    # other way round the scaler is off and its saved state is not needed
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    data_rng.set_state(rng["data"])
    if device.type == "cuda":  # as many GPUs as both machines have: fewer here is fine
        for i, s in enumerate(rng.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if device.type == "mps" and rng.get("mps"):
        torch.mps.set_rng_state(rng["mps"][0])
    return state["step"], state["best_val_loss"], state.get("evaluated", False)


def read_metrics(path):
    """The rows of a metrics.jsonl; a torn last line (a run killed while appending) is left out."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


RUN_LOCKS = {}  # out_dir: the FolderLock this process holds there, until it exits


def lock_run(out_dir):
    """One folder, one run: hold out_dir/.lock (see prepare.FolderLock) from before anything there
    is read or written until the process exits; a second training there is refused in one line
    while the first runs. Under torchrun rank 0 alone writes, so it alone holds it. A folder that
    does not exist yet is locked once start_run has made it."""
    if os.environ.get("RANK", "0") != "0" or out_dir in RUN_LOCKS or not os.path.isdir(out_dir):
        return
    try:
        RUN_LOCKS[out_dir] = FolderLock(out_dir, "a training", "train into another --out_dir")
    except OSError as e:
        raise UserError(f"cannot write to {out_dir} ({e.strerror or e}): choose another "
                        "--out_dir") from None


def start_run(c, tokenizer, step, evaluated, master):
    """The run's folder before training writes there (rank 0: master): made, locked (lock_run:
    a folder made since run_configs looked is looked at again, locked), with the data's tokenizer
    for a new run (None: GPT-2's, nothing to keep) and metrics.jsonl (start_metrics). Ctrl-C
    waits for it. -> the paths of the checkpoint and of metrics.jsonl."""
    ckpt_path, metrics = (os.path.join(c.out_dir, name) for name in ("ckpt.pt", "metrics.jsonl"))
    if not master:
        return ckpt_path, metrics
    with signals_held():
        try:
            os.makedirs(c.out_dir, exist_ok=True)
            if c.out_dir not in RUN_LOCKS:
                lock_run(c.out_dir)
                if not c.resume:  # another run may have made it and saved there meanwhile
                    must_be_new(c.out_dir)
            if tokenizer is not None and not c.resume:
                tokenizer.save(os.path.join(c.out_dir, "tokenizer"))
        except OSError as e:
            raise UserError(f"cannot write to {c.out_dir} ({e.strerror or e}): choose another "
                            "--out_dir") from None
        start_metrics(metrics, step, evaluated)
    return ckpt_path, metrics


def must_be_new(out_dir):
    """A new run (no --resume) into a folder that holds a checkpoint would overwrite it: refused."""
    path = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(path):
        raise UserError(f"{path} holds a run: continue it with --resume, or train into another "
                        "--out_dir (or delete it)")


def start_metrics(path, step, evaluated):
    """Make the run's folder and its metrics.jsonl. On resume, keep the rows logged up to the
    checkpoint's step (its evaluation only if it was done) and forget the rest, which the resumed
    run is about to log again; a new run starts an empty file."""
    def kept(row):
        return row["step"] < step or (row["step"] == step and ("val_loss" not in row or evaluated))
    rows = [r for r in read_metrics(path) if kept(r)]
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):  # half-written, on a full disk: not left behind
            os.remove(path + ".tmp")
        what, fix = why_unwritten(e)
        raise UserError(f"cannot write {path} ({what}): {fix}, or choose another --out_dir") from None


def log_metrics(path, step, tokens_per_step, **row):
    """One JSON line of metrics.jsonl: the step, the tokens seen by then, and what was measured. A
    full disk stops the run in one line (a torn last line is skipped on resume)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(dict(step=step, tokens=step * tokens_per_step, **row)) + "\n")
    except OSError as e:
        what, fix = why_unwritten(e)
        raise UserError(f"could not write {path} ({what}); the last checkpoint in "
                        f"{os.path.dirname(path) or '.'} is intact: {fix}, then continue with "
                        "--resume") from None


STOPS = []  # the signals received since stop_on_signals


def stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM, which SLURM, Kubernetes and preemptible machines send before
    they kill, no longer stop the process at once: training asks stop_requested() after each step,
    saves, and exits."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: STOPS.append(signum))


def stop_requested():
    """0 while no signal came; else the exit status that reports it: 128 + its number."""
    if not STOPS:
        return 0
    return 128 + (signal.SIGTERM if signal.SIGTERM in STOPS else signal.SIGINT)


def save_and_exit(path, state, world):
    """After a signal, every process at the same step: rank 0 saves (state None elsewhere), the
    others wait for it, and all exit with the signal's status (130 for Ctrl-C, 143 for SIGTERM)."""
    if state is not None:
        save(path, state)
        print(f"stopped: saved step {state['step']} to {path}; continue with --resume",
              file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
    sys.exit(stop_requested() or 130)
