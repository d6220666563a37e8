"""
test_prepare.py: prepare.py turns stories into the token files training reads: every story as
ordinary GPT-2 tokens, the end-of-text token between stories, any input format, atomic outputs,
and one clear line for a bad input.

    python -m pytest test_prepare.py
"""
import errno, hashlib, json, os

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from conftest import cli, open_when_read, write_jsonl
from cli import UserError
from prepare import tokenize_stories
from tokenizer import gpt2_tokenizer

EOT = 50256
TRAIN_STORIES = [
    "Once upon a time, there was a little cat named Tom.\n\nTom liked to nap in the sun.",
    'Lily said, "Look! A café, très jolie 🌸" and smiled. 猫 ☀',  # unicode
    "",  # an empty story is skipped
    "This story mentions <|endoftext|> but it is plain text, not the special token.",
    "  Spaces around a story are kept.  ",
    "Line one.\nLine two ends with a newline.\n",
]
VALIDATION_STORIES = ["The dog ran to the park.", "Mom baked a big cake.\n\nThe end."]


def expected_tokens(stories):
    """Each non-empty story encoded as ordinary text, with the end-of-text id between stories."""
    enc = gpt2_tokenizer()
    tokens = []
    for story in (s for s in stories if s):
        tokens += ([EOT] if tokens else []) + enc.encode_ordinary(story)
    return np.array(tokens, dtype=np.uint16)


def run_prepare(*args):
    return cli("prepare.py", *args, check=False)


def write_file(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def write_txt(path, stories):
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    return path


def write_parquet(path, stories, column="text"):
    pyarrow.parquet.write_table(pyarrow.table({"id": list(range(len(stories))), column: stories}), path)
    return path


def prepare_ok(tmp_path, train_file, data_dir):
    validation_file = write_jsonl(tmp_path / "validation.jsonl", VALIDATION_STORIES)
    result = run_prepare("--train_files", train_file, "--validation_files", validation_file,
                         "--data_dir", data_dir)
    assert result.returncode == 0, result.stderr
    return data_dir


def test_bin_files_hold_each_story_as_ordinary_tokens_with_end_of_text_between(tmp_path):
    data_dir = prepare_ok(tmp_path, write_jsonl(tmp_path / "train.jsonl", TRAIN_STORIES), tmp_path / "data")
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    validation = np.fromfile(data_dir / "validation.bin", dtype=np.uint16)
    np.testing.assert_array_equal(train, expected_tokens(TRAIN_STORIES))
    np.testing.assert_array_equal(validation, expected_tokens(VALIDATION_STORIES))
    # Decoded, the file is the stories joined by <|endoftext|>: nothing added, nothing lost.
    assert gpt2_tokenizer().decode(train.tolist()) == "<|endoftext|>".join(s for s in TRAIN_STORIES if s)
    assert (train == EOT).sum() == 4  # 5 non-empty stories; the literal "<|endoftext|>" is not EOT
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta == {"tokenizer": "gpt2", "fingerprint": "gpt2", "vocab_size": 50257, "prefix": [],
                    "eot_token": EOT, "dtype": "uint16",
                    "train": {"tokens": len(train), "stories": 5,
                              "fingerprint": file_fingerprint(data_dir / "train.bin")},
                    "validation": {"tokens": len(validation), "stories": 2,
                                   "fingerprint": file_fingerprint(data_dir / "validation.bin")}}


def file_fingerprint(path):
    """What meta.json records of a token file, computed here on its own: the sha256 of its size,
    its first MiB and its last MiB (for a small file, the whole file twice)."""
    data = path.read_bytes()
    return hashlib.sha256(str(len(data)).encode() + data[:2 ** 20] + data[-2 ** 20:]).hexdigest()[:16]


def test_txt_and_parquet_files_give_the_same_train_bin_as_jsonl(tmp_path):
    writers = {"jsonl": write_jsonl, "txt": write_txt, "parquet": write_parquet}
    train_bins = {}
    for extension, write in writers.items():
        train_file = write(tmp_path / f"train.{extension}", TRAIN_STORIES)
        data_dir = prepare_ok(tmp_path, train_file, tmp_path / extension)
        train_bins[extension] = (data_dir / "train.bin").read_bytes()
    assert train_bins["txt"] == train_bins["jsonl"] == train_bins["parquet"]
    assert train_bins["jsonl"] == expected_tokens(TRAIN_STORIES).tobytes()


def test_several_files_are_one_stream_of_stories(tmp_path):
    first = write_jsonl(tmp_path / "part1.jsonl", TRAIN_STORIES[:3])
    second = write_txt(tmp_path / "part2.txt", TRAIN_STORIES[3:])
    validation = write_jsonl(tmp_path / "validation.jsonl", VALIDATION_STORIES)
    result = run_prepare("--train_files", first, second, "--validation_files", validation,
                         "--data_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    np.testing.assert_array_equal(train, expected_tokens(TRAIN_STORIES))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 1000])
def test_tokenize_stories_output_does_not_depend_on_batch_size(tmp_path, batch_size):
    out_path = tmp_path / "out.bin"
    n_tokens, n_stories = tokenize_stories(iter(TRAIN_STORIES), out_path, gpt2_tokenizer(),
                                           num_threads=2, batch_size=batch_size)
    np.testing.assert_array_equal(np.fromfile(out_path, dtype=np.uint16), expected_tokens(TRAIN_STORIES))
    assert (n_tokens, n_stories) == (len(expected_tokens(TRAIN_STORIES)), 5)


def test_gpt2_tokenizer_has_gpt2_ids():
    enc = gpt2_tokenizer()
    assert (enc.n_vocab, enc.eot_token) == (50257, EOT)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" Once upon a time") == [4874, 2402, 257, 640]
    assert enc.encode_ordinary("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert gpt2_tokenizer() is enc  # built once, then cached


def test_importing_prepare_is_cheap_and_loads_no_dataset_library():
    code = "import sys, prepare; print('datasets' in sys.modules, 'pyarrow' in sys.modules)"
    result = cli("-c", code, check=False)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_success_leaves_no_tmp_file_and_replaces_the_old_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.bin").write_bytes(b"old")
    data_dir = prepare_ok(tmp_path, write_jsonl(tmp_path / "train.jsonl", TRAIN_STORIES), tmp_path / "data")
    assert sorted(os.listdir(data_dir)) == ["meta.json", "train.bin", "validation.bin"]
    assert (data_dir / "train.bin").read_bytes() == expected_tokens(TRAIN_STORIES).tobytes()


BAD_TRAIN_FILES = {
    "missing file": lambda tmp_path: tmp_path / "no_such_file.jsonl",
    "empty file": lambda tmp_path: write_jsonl(tmp_path / "empty.jsonl", []),
    "only empty stories": lambda tmp_path: write_txt(tmp_path / "blank.txt", ["", ""]),
    "objects without text": lambda tmp_path: write_file(tmp_path / "bad.jsonl", '{"story": "Once"}\n'),
    "parquet without a text column": lambda tmp_path: write_parquet(tmp_path / "x.parquet", ["Once"], "story"),
    "not JSON": lambda tmp_path: write_file(tmp_path / "bad.jsonl", "Once upon a time\n"),
    "not UTF-8": lambda tmp_path: write_file(tmp_path / "bad.txt", b"Once upon a time \xff\n"),
    "unknown extension": lambda tmp_path: write_file(tmp_path / "stories.csv", "Once upon a time\n"),
    # a file of blank lines holds no story, whatever its format
    "only blank lines (.txt)": lambda tmp_path: write_file(tmp_path / "blank.txt", "\n \n\t\n\n"),
    "only blank lines (.jsonl)": lambda tmp_path: write_file(tmp_path / "blank.jsonl", "\n \n\t\n\n"),
    "only whitespace stories": lambda tmp_path: write_jsonl(tmp_path / "blank.jsonl", [" ", "\n\n"]),
    "parquet text column of integers": lambda tmp_path: write_parquet(tmp_path / "x.parquet", [1, 2]),
    "a folder in place of a file": lambda tmp_path: (tmp_path / "d.jsonl").mkdir() or tmp_path / "d.jsonl",
}


@pytest.mark.parametrize("case", BAD_TRAIN_FILES)
def test_bad_input_is_one_error_line_and_leaves_existing_files_untouched(tmp_path, case):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.bin").write_bytes(b"a good train.bin from an earlier run")
    validation_file = write_jsonl(tmp_path / "validation.jsonl", VALIDATION_STORIES)
    result = run_prepare("--train_files", BAD_TRAIN_FILES[case](tmp_path),
                         "--validation_files", validation_file, "--data_dir", data_dir)
    assert result.returncode == 1
    assert result.stderr.startswith("prepare.py: error: ") and result.stderr.count("\n") == 1, \
        result.stderr
    # Nothing written, nothing half-written: the validation split, already done, was thrown away too.
    assert os.listdir(data_dir) == ["train.bin"]
    assert (data_dir / "train.bin").read_bytes() == b"a good train.bin from an earlier run"


def test_without_hub_or_local_files_one_line_says_to_pass_local_files(tmp_path):
    # Offline mode: fail at once instead of retrying. An empty cache: no earlier download to fall back on.
    cache = str(tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": cache,
           "HF_DATASETS_CACHE": cache, "HF_HUB_CACHE": cache}
    result = cli("prepare.py", "--data_dir", tmp_path / "data", check=False, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.splitlines()[-1]
    assert last_line.startswith("prepare.py: error: could not load roneneldan/TinyStories")
    assert "--train_files" in last_line and "--validation_files" in last_line
    assert not list(tmp_path.glob("data/*"))


def test_the_same_file_in_both_splits_is_noted(tmp_path):
    stories = write_jsonl(tmp_path / "stories.jsonl", TRAIN_STORIES)
    result = run_prepare("--train_files", stories, "--validation_files", tmp_path / "." / "stories.jsonl",
                         "--data_dir", tmp_path / "data")
    assert result.returncode == 0 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"note: {stories} is in both splits")
    result = run_prepare("--train_files", stories, "--validation_files",
                         write_jsonl(tmp_path / "v.jsonl", VALIDATION_STORIES), "--data_dir", tmp_path / "data")
    assert result.returncode == 0 and result.stderr == ""  # the control: two files, no note


@pytest.mark.parametrize("flag", ["--bogus", "--train_file"])  # not even a prefix of --train_files
def test_unknown_flag_is_an_error(flag):
    result = run_prepare(flag, "x.jsonl")
    assert result.returncode != 0 and "unrecognized arguments" in result.stderr


BAD_DATA_DIRS = {  # case: (--data_dir, given tmp_path; what the one line must say)
    "a file": (lambda tmp_path: write_file(tmp_path / "data", "a file"), "is a file, not a folder"),
    "empty": (lambda tmp_path: "", "--data_dir is empty"),
    "under a file": (lambda tmp_path: write_file(tmp_path / "data", "a file") / "sub", "cannot write"),
    "a training run's folder": (lambda tmp_path: run_folder(tmp_path / "out"), "holds a training run (ckpt.pt)"),
}


def run_folder(out):
    """A training run's folder, as far as prepare.py can tell: a checkpoint, and the tokenizer it keeps."""
    (out / "tokenizer").mkdir(parents=True)
    write_file(out / "tokenizer" / "tokenizer.json", "the run's own tokenizer")
    write_file(out / "ckpt.pt", "a checkpoint")
    return out


@pytest.mark.parametrize("case", BAD_DATA_DIRS)
def test_a_data_dir_that_cannot_be_one_is_refused_in_one_line(tmp_path, case):
    make, message = BAD_DATA_DIRS[case]
    data_dir = make(tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run_prepare("--train_files", write_jsonl(tmp_path / "t.jsonl", TRAIN_STORIES),
                         "--validation_files", write_jsonl(tmp_path / "v.jsonl", VALIDATION_STORIES),
                         "--data_dir", data_dir)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("prepare.py: error: ") and message in result.stderr
    assert {p: p.read_bytes() for p in files} == files  # the file given as a folder is unchanged


# ----- A dataset is whole or refused: never half of one and half of another -----------------------

class Killed(BaseException):
    """A kill, as far as data_dir can tell: prepare.py stops at that point (its own `finally`
    still runs here, which a real kill skips: what it leaves is tested with SIGKILL below)."""


def tiny_tokenizer_dir(path):
    """A Hugging Face tokenizer directory (tokenizer.json built as Gemma's is, its <eos> named)."""
    from conftest import tiny_gemma_tokenizer
    path.mkdir()
    tiny_gemma_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return path


def prepare_in_process(tmp_path, data_dir, tokenizer, stories):
    """prepare.py's main, in this process (so that a stage can be made to fail), on `stories`."""
    import prepare
    train = write_jsonl(tmp_path / "t.jsonl", stories)
    validation = write_jsonl(tmp_path / "v.jsonl", VALIDATION_STORIES)
    prepare.main(["--train_files", str(train), "--validation_files", str(validation),
                  "--data_dir", str(data_dir), "--tokenizer", str(tokenizer), "--num_threads", "1"])


def read_dataset(data_dir):
    """What a training reads of data_dir, checked as a training checks it: (its tokenizer's name,
    train.bin's bytes, validation.bin's bytes); a UserError if it refuses the data."""
    import dataset
    meta, _ = dataset.check_tokenizer(str(data_dir), str(data_dir / "no_run"), "", False)
    files = [dataset.load_tokens(str(data_dir), split, 8, 50257, meta)
             for split in ("train", "validation")]
    return (meta["tokenizer"],) + tuple(open(f.path, "rb").read() for f in files)


# old dataset -> new one: GPT-2's, then the brief's case (a model's own tokenizer over it); GPT-2's
# of an older prepare.py (no meta.json); and a model's own tokenizer, then GPT-2's
SWITCHES = {"gpt2 -> own": ("gpt2", "own", False), "gpt2 of an older prepare.py -> own":
            ("gpt2", "own", True), "own -> gpt2": ("own", "gpt2", False)}
FAILURES = ["writing validation.bin", "writing train.bin", "copying the tokenizer",
            "writing meta.json"] + [f"killed before rename {k}" for k in range(6)]


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("switch", SWITCHES)
def test_prepare_failing_at_any_stage_leaves_the_old_dataset_the_new_one_or_one_refused(
        tmp_path, monkeypatch, capsys, switch, failure):
    import prepare
    import tokenizer
    old_tokenizer, new_tokenizer, older_version = SWITCHES[switch]
    own = tiny_tokenizer_dir(tmp_path / "own")
    tokenizers = {"gpt2": "gpt2", "own": own}
    data_dir, fresh = tmp_path / "data", tmp_path / "fresh"
    prepare_in_process(tmp_path, data_dir, tokenizers[old_tokenizer], TRAIN_STORIES[:2])
    if older_version:  # as an older prepare.py left it: the token files alone
        (data_dir / "meta.json").unlink()
    old = read_dataset(data_dir)
    prepare_in_process(tmp_path, fresh, tokenizers[new_tokenizer], TRAIN_STORIES)
    new = read_dataset(fresh)
    assert old != new and new[0] != "gpt2" or new_tokenizer == "gpt2"

    renames, replace = [], os.replace  # the renames into data_dir itself, in order

    def counted_replace(src, dst):
        if os.path.dirname(os.path.abspath(dst)) == str(data_dir):
            renames.append(os.path.basename(dst))
            if failure == f"killed before rename {len(renames) - 1}":
                raise Killed
        return replace(src, dst)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    calls = {"tokenize": 0}
    tokenize = prepare.tokenize_stories

    def tokenize_then_fail(stories, path, *args, **kwargs):  # validation first, then train
        calls["tokenize"] += 1
        if failure == ["writing validation.bin", "writing train.bin"][min(calls["tokenize"], 2) - 1]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return tokenize(stories, path, *args, **kwargs)
    monkeypatch.setattr(os, "replace", counted_replace)
    monkeypatch.setattr(prepare, "tokenize_stories", tokenize_then_fail)
    if failure == "copying the tokenizer":
        monkeypatch.setattr(tokenizer.HFTokenizer, "save", disk_full)
    if failure == "writing meta.json":
        monkeypatch.setattr(prepare, "dataset_meta", disk_full)
    capsys.readouterr()
    try:
        prepare_in_process(tmp_path, data_dir, tokenizers[new_tokenizer], TRAIN_STORIES)
        outcome = "finished"
    except SystemExit as e:  # a failure said in one line
        assert e.code == 1
        err = capsys.readouterr().err
        assert err.startswith("prepare.py: error: could not write the new dataset") and \
            "the disk is full" in err and "the previous one there is intact" in err, err
        outcome = "failed"
    except Killed:
        outcome = "killed"
    monkeypatch.undo()
    try:
        state = read_dataset(data_dir)
    except UserError as e:  # refused: never trained on
        assert "run prepare.py again" in str(e), e
        state = "refused"
    done = renames[:-1] if outcome == "killed" else renames  # the renames that happened
    if "validation.bin" not in done:  # failed or killed before the first token file moved
        assert outcome != "finished" and state == old  # the old dataset, whole
    elif outcome == "killed":  # after it, and before meta.json moved (the last rename)
        assert renames[-1] in ("train.bin", "tokenizer", "meta.json") and state == "refused"
    else:
        assert outcome == "finished" and state == new and renames[-1] == "meta.json"
    leftovers = [n for n in os.listdir(data_dir) if n.startswith(".")]
    assert leftovers == [], leftovers  # (even "killed": its `finally` ran here)
    if state == "refused":  # and running prepare.py again mends it
        prepare_in_process(tmp_path, data_dir, tokenizers[new_tokenizer], TRAIN_STORIES)
        assert read_dataset(data_dir) == new


# ----- prepare.py as a process: Ctrl-C, a kill, a second prepare.py, a full disk (slow) -----------

def dataset_files(data_dir):
    """Every file in data_dir, hidden ones included, with its bytes and modification time."""
    return {p.relative_to(data_dir): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(data_dir.rglob("*")) if p.is_file()}


def start_prepare(tmp_path, data_dir, *extra):
    """prepare.py whose train file is a named pipe: it takes the validation split, then waits for
    the train stories, with its work folder half-written."""
    import subprocess, sys
    from conftest import HERE
    os.mkfifo(tmp_path / "stream.jsonl")
    return subprocess.Popen([sys.executable, "prepare.py", "--train_files", tmp_path / "stream.jsonl",
                             "--validation_files", write_jsonl(tmp_path / "v2.jsonl", VALIDATION_STORIES),
                             "--data_dir", data_dir, *extra], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl_c", "sigkill"])
def test_prepare_stopped_midway_leaves_the_old_dataset_and_the_next_run_clears_its_leftovers(
        tmp_path, how):
    import signal
    data_dir = prepare_ok(tmp_path, write_jsonl(tmp_path / "train.jsonl", TRAIN_STORIES),
                          tmp_path / "data")
    old = dataset_files(data_dir)
    proc = start_prepare(tmp_path, data_dir)
    fd = open_when_read(tmp_path / "stream.jsonl", proc)
    try:
        os.write(fd, (json.dumps({"text": "Once upon a time, a half-read story."}) + "\n").encode())
        # meanwhile a second prepare.py into the same folder is refused, and changes nothing
        result = run_prepare("--train_files", tmp_path / "train.jsonl", "--validation_files",
                             tmp_path / "validation.jsonl", "--data_dir", data_dir)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"{data_dir} is in use by prepare.py (process {proc.pid})" in result.stderr
        work = [n for n in os.listdir(data_dir) if n.startswith(".prepare-")]
        assert len(work) == 1 and os.listdir(data_dir / work[0]) != []  # it is midway
        proc.send_signal(signal.SIGINT if how == "ctrl_c" else signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(fd)
    if how == "ctrl_c":
        assert proc.returncode == 130 and err.count("\n") == 1, err
        assert err.startswith("prepare.py: error: interrupted by Ctrl-C")
        assert dataset_files(data_dir) == old  # and no leftovers: its `finally` cleared them
    else:  # killed: the old dataset is whole and trains; what it was writing is left behind...
        assert {p for p in dataset_files(data_dir) if not str(p).startswith(".")} == set(old)
        assert all(dataset_files(data_dir)[p] == old[p] for p in old)
        assert any(n.startswith(".prepare-") for n in os.listdir(data_dir))
        assert read_dataset(data_dir)[1] == expected_tokens(TRAIN_STORIES).tobytes()
        prepare_ok(tmp_path, write_jsonl(tmp_path / "new.jsonl", TRAIN_STORIES[:2]), data_dir)
        # ...until the next prepare.py, which clears it
        assert sorted(os.listdir(data_dir)) == ["meta.json", "train.bin", "validation.bin"]


@pytest.mark.slow
def test_a_full_disk_while_prepare_writes_leaves_the_old_dataset_and_says_so(tmp_path):
    import resource, subprocess, sys
    from conftest import HERE, generated_stories
    data_dir = prepare_ok(tmp_path, write_jsonl(tmp_path / "train.jsonl", TRAIN_STORIES),
                          tmp_path / "data")
    old = dataset_files(data_dir)
    big = write_jsonl(tmp_path / "big.jsonl", generated_stories(2000))  # ~140 kB of tokens

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
    result = subprocess.run([sys.executable, "prepare.py", "--train_files", big, "--validation_files",
                             tmp_path / "validation.jsonl", "--data_dir", data_dir], cwd=HERE,
                            capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("prepare.py: error: could not write the new dataset in")
    assert "(the disk is full)" in result.stderr and "the previous one there is intact" in result.stderr
    assert dataset_files(data_dir) == old  # nothing left behind either


# ----- The excerpt in tinystories/, gzip-compressed files, and a BPE fitted to the stories --------


def test_a_gzip_compressed_file_gives_the_same_tokens_as_the_file_itself(tmp_path):
    import gzip
    plain = write_jsonl(tmp_path / "train.jsonl", TRAIN_STORIES)
    with open(plain, "rb") as f, gzip.open(tmp_path / "train.jsonl.gz", "wb") as g:
        g.write(f.read())
    bins = [prepare_ok(tmp_path, path, tmp_path / name) / "train.bin"
            for path, name in ((plain, "plain"), (tmp_path / "train.jsonl.gz", "gz"))]
    assert bins[0].read_bytes() == bins[1].read_bytes()


@pytest.mark.slow
def test_the_excerpt_prepares_offline_into_its_stories(tmp_path):
    result = run_prepare("--excerpt", "--data_dir", tmp_path / "data")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert (meta["train"]["stories"], meta["validation"]["stories"]) == (7398, 133)
    result = run_prepare("--excerpt", "--train_files", tmp_path / "x.jsonl", "--data_dir", tmp_path)
    assert result.returncode == 2 and "--excerpt gives the files" in result.stderr


MIXED = "Ça coûte 5 €, naïve café 東京 🙂.\n\n  Two  spaces, a tab\tand <|endoftext|> as text."


@pytest.mark.slow
def test_a_bpe_fitted_to_the_stories_frames_them_as_gpt2_does_and_counts_every_byte(tmp_path):
    from tokenizer import HFTokenizer, token_bytes
    d = tmp_path / "data"
    train = write_jsonl(tmp_path / "t.jsonl", TRAIN_STORIES * 20 + [MIXED])
    result = run_prepare("--train_files", train, "--validation_files",
                         write_jsonl(tmp_path / "v.jsonl", VALIDATION_STORIES), "--data_dir", d,
                         "--bpe", "300")
    assert result.returncode == 0, result.stderr
    meta = json.loads((d / "meta.json").read_text())
    assert (meta["vocab_size"], meta["prefix"], meta["dtype"]) == (300, [], "uint16")
    assert meta["tokenizer"] == str(d / "tokenizer" / "tokenizer.json")
    enc = HFTokenizer(str(d / "tokenizer"))
    assert enc.fingerprint == meta["fingerprint"] and enc.eot_token == meta["eot_token"]
    ids = np.fromfile(d / "validation.bin", np.uint16).tolist()
    stories = [enc.encode_ordinary(s) + [enc.eot_token] for s in VALIDATION_STORIES]
    assert ids == [i for s in stories for i in s]  # each story, then <|endoftext|>
    nbytes = token_bytes(enc)  # every token's bytes, a split character's too: none lost
    for text in (MIXED, *VALIDATION_STORIES):
        assert sum(nbytes[i] for i in enc.encode_ordinary(text)) == len(text.encode())
        assert b"".join(enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(text)) == \
            text.encode()
    assert nbytes[enc.eot_token] == 0
    for flags, message in [(["--bpe", "100"], "257 tokens at least"),
                           (["--bpe", "300", "--tokenizer", d / "tokenizer"], "drop --tokenizer")]:
        result = run_prepare("--train_files", train, "--validation_files", train, "--data_dir",
                             tmp_path / "other", *flags)
        assert result.returncode == 1 and message in result.stderr, result.stderr
