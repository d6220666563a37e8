"""
test_prepare.py: prepare.py turns stories into the token files training reads: every story as
ordinary GPT-2 tokens, the end-of-text token between stories, any input format, atomic outputs,
and one clear line for a bad input.

    python -m pytest test_prepare.py
"""
import json, os

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from conftest import cli, write_jsonl
from prepare import gpt2_tokenizer, tokenize_stories

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
                    "train": {"tokens": len(train), "stories": 5},
                    "validation": {"tokens": len(validation), "stories": 2}}


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
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and error_lines[0].startswith("prepare.py: error: "), result.stderr
    assert result.stderr.splitlines()[-1] == error_lines[0]
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


@pytest.mark.parametrize("flag", ["--bogus", "--train_file"])  # not even a prefix of --train_files
def test_unknown_flag_is_an_error(flag):
    result = run_prepare(flag, "x.jsonl")
    assert result.returncode != 0 and "unrecognized arguments" in result.stderr
