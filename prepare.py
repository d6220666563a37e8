"""
Prepare TinyStories for gemma.py: tokenize every story with GPT-2's BPE (or a model's own tokenizer)
and write each split's token ids as one flat array of uint16 (uint32 for a larger vocabulary).

    python prepare.py                 # roneneldan/TinyStories from the Hugging Face hub
    python prepare.py --excerpt       # the excerpt in tinystories/, no network needed
    python prepare.py --train_files my_train.jsonl --validation_files my_validation.jsonl
    python prepare.py --tokenizer gemma-3-270m   # Gemma's own tokenizer, to fine-tune Gemma 3 270M
    python prepare.py --help          # every flag with its default

Writes data/train.bin, data/validation.bin and data/meta.json (token and story counts, the tokenizer,
its framing ids and the token dtype). With GPT-2's BPE the end-of-text token 50256 sits between
stories, not before the first or after the last, so a file decodes to exactly
"<|endoftext|>".join(stories); read it with np.memmap(path, np.uint16, mode="r"). With --tokenizer each
story is framed as that tokenizer frames a document (Gemma: <bos> story <eos>), and a copy of the
tokenizer goes to data/tokenizer/, from where a training run keeps it with its checkpoint.
Local files may be JSON lines (.jsonl/.json, one {"text": ...} object a line), parquet (.parquet,
a "text" column) or plain text (.txt, stories separated by lines that are exactly <|endoftext|>),
the text ones gzip-compressed too (.jsonl.gz, .txt.gz); see data.py, which reads them, and
tokenizer.py. Local files may also be named pipes (a stream of stories from another program).

A dataset is whole or it is refused, never half of one and half of another. prepare.py writes the
new dataset (train.bin, validation.bin, tokenizer/, meta.json) into a fresh folder of its own inside
data_dir, .prepare-XXXX, and only once it is complete moves it in with renames: the token files
first, then the tokenizer, meta.json last. meta.json records each split's token count and a
fingerprint of its file (its size, its first and last MiB), and load_tokens checks every token file
against it, so whatever moment a crash, a kill or a full disk stops prepare.py at, data_dir holds
the old dataset whole, or the new one whole, or token files that meta.json does not describe, which
training refuses in one line ("run prepare.py again"); it never trains on a mix. (A data_dir of an
older prepare.py, without meta.json or its fingerprints, gets them for its old files first.) Ctrl-C
and SIGTERM wait for the renames to end. One prepare.py at a time writes to a data_dir: it holds
data_dir/.lock while it works, which the system lets go of if it is killed, and the next one clears
what a killed one left. A training that reads data_dir meanwhile goes on with the files it opened.
"""
import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from cli import UserError, start_command
from dataset import check_files, fingerprint, read_meta, read_stories
from files import FolderLock, signals_held, survive_file_size_limits, sync_folder, why_unwritten
from tokenizer import HFTokenizer, describe, gpt2_tokenizer, hf_tokenizer, token_dtype, train_bpe

HUB_DATASET = "roneneldan/TinyStories"
EXCERPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinystories")  # --excerpt
BATCH_SIZE = 1024  # stories per encode call: few thread start-ups, yet little memory


# ----- Reading stories from the hub, tokenizing them, writing them ---------------------------------
def hub_stories(split):
    """The stories of one split of roneneldan/TinyStories, and their number (for the progress bar)."""
    import datasets  # slow to import, and only needed here
    try:
        dataset = datasets.load_dataset(HUB_DATASET, split=split)  # downloads once, then cached
    except Exception as e:  # no network, hub down, ...: whatever the cause, the way out is the same
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not load {HUB_DATASET} from the Hugging Face hub ({reason}); "
                           "pass local files with --train_files F [F ...] --validation_files F [F ...]")
    # .iter reads the memory-mapped Arrow cache a batch at a time, never the whole split at once.
    return (text for batch in dataset.iter(batch_size=4096) for text in batch["text"]), dataset.num_rows


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


def gpt2_documents(enc, num_threads):
    """GPT-2's framing: <|endoftext|> before each story (the file's first one is dropped)."""
    def encode(stories):
        # encode_ordinary: a story containing the text "<|endoftext|>" is encoded as that plain text
        return [[enc.eot_token, *ids] for ids in enc.encode_ordinary_batch(stories, num_threads=num_threads)]
    return encode


def tokenize_stories(stories, out_path, enc, num_threads=os.cpu_count(), batch_size=BATCH_SIZE,
                     total=None) -> tuple[int, int]:
    """Write the tokens of the stories to out_path, each framed as enc frames a document (GPT-2:
    the end-of-text token between stories), as uint16 while the vocabulary fits, else uint32. A
    story that is empty or only whitespace is none, in every format (a .txt of blank lines holds
    no story, as a .jsonl of blank lines does not). Returns (number of tokens, number of stories)."""
    hf = isinstance(enc, HFTokenizer)
    encode, dtype = enc.encode_documents if hf else gpt2_documents(enc, num_threads), token_dtype(enc.n_vocab)
    n_tokens = n_stories = 0
    desc = os.path.basename(out_path)
    stories = (s for s in stories if s and not s.isspace())
    # the bar on a terminal only (disable=None): in a log or a pipe, stderr is for what went wrong
    with open(out_path, "wb") as f, tqdm(total=total, unit=" stories", desc=desc, disable=None) as bar:
        for token_lists in encode_ahead(batches(stories, batch_size), encode):
            # One array per batch, [eot, story 0..., eot, story 1..., ...] with GPT-2, straight to the
            # file: the corpus is never held as Python ints. GPT-2's first end-of-text is dropped.
            flat = itertools.chain.from_iterable(token_lists)
            tokens = np.fromiter(flat, dtype, count=sum(map(len, token_lists)))
            tokens = tokens if n_stories or hf else tokens[1:]
            f.write(tokens.tobytes())  # not tofile: a failed write keeps its errno (disk full?)
            n_tokens, n_stories = n_tokens + len(tokens), n_stories + len(token_lists)
            bar.update(len(token_lists))
        f.flush()
        os.fsync(f.fileno())  # on disk before it is renamed into data_dir
    return n_tokens, n_stories


def dataset_meta(directory, enc, counts):
    """meta.json's settings for the token files in directory: the tokenizer, and each split's
    counts ({split: {"tokens": n, "stories": n}}) with its file's fingerprint."""
    meta = describe(enc)
    for split, count in counts.items():
        with open(os.path.join(directory, f"{split}.bin"), "rb") as f:
            meta[split] = {**count, "fingerprint": fingerprint(f)}
    return meta


def write_meta(directory, meta):
    """directory/meta.json, atomically and durably: a temporary file, flushed, then renamed."""
    path = os.path.join(directory, "meta.json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# ----- Command line. ------------------------------------------------------------------------------

def prepare(args):
    splits = {"validation": args.validation_files, "train": args.train_files}
    if (args.train_files is None) != (args.validation_files is None):
        raise UserError("pass both --train_files and --validation_files, or neither to use the hub")
    for files in splits.values():
        check_files(files or [])
    both = {os.path.realpath(f) for f in args.train_files or []} & {
        os.path.realpath(f) for f in args.validation_files or []}
    if both:  # allowed (a quick try), but its validation loss measures memory, not learning
        print(f"note: {', '.join(sorted(both))} is in both splits: the validation loss will not "
              "tell learning from memorising", file=sys.stderr)
    data_dir = args.data_dir
    if not data_dir.strip():
        raise UserError("--data_dir is empty: name the folder to write to (default: data)")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir} is a file, not a folder: name a folder")
    if os.path.exists(os.path.join(data_dir, "ckpt.pt")):  # its tokenizer/ would be replaced
        raise UserError(f"--data_dir {data_dir} holds a training run (ckpt.pt), whose tokenizer a "
                        "dataset would replace: choose another --data_dir")
    os.environ["RAYON_NUM_THREADS"] = str(args.num_threads)  # the tokenizers library's threads
    enc = gpt2_tokenizer() if args.tokenizer == "gpt2" else hf_tokenizer(args.tokenizer)
    if args.bpe and args.tokenizer != "gpt2":
        raise UserError("--bpe trains the tokenizer: drop --tokenizer")
    survive_file_size_limits()
    try:
        os.makedirs(data_dir, exist_ok=True)
        lock = FolderLock(data_dir, "prepare.py", "choose another --data_dir")
    except OSError as e:
        raise UserError(f"cannot write to {data_dir} ({e.strerror or e}): choose another "
                        "--data_dir") from None
    with lock:
        clear_leftovers(data_dir)
        work = None
        try:
            work = tempfile.mkdtemp(prefix=".prepare-", dir=data_dir)
            if args.bpe:  # fitted to the training stories, then used as any tokenizer
                train = read_stories(splits["train"]) if splits["train"] else hub_stories("train")[0]
                enc = train_bpe(train, args.bpe, os.path.join(work, "bpe"))
                enc.name = os.path.join(data_dir, "tokenizer", "tokenizer.json")  # its home
            counts = write_dataset(work, splits, enc, args.num_threads)
        except OSError as e:
            what, fix = why_unwritten(e)
            raise UserError(f"could not write the new dataset in {data_dir} ({what}); the previous "
                            f"one there is intact: {fix}, then run prepare.py again") from None
        else:
            switch(work, data_dir)
        finally:  # after a failure or an interrupt too: nothing half-written is left
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
    for split, count in counts.items():
        print(f"{os.path.join(data_dir, split)}.bin: {count['tokens']:,} tokens, "
              f"{count['stories']:,} stories")


def write_dataset(work, splits, enc, num_threads):
    """The whole new dataset in the folder work: train.bin, validation.bin, the tokenizer (a
    Hugging Face one's files) and, last, meta.json. Returns each split's counts."""
    counts = {}
    for split, files in splits.items():  # validation first: a bad file then fails in seconds
        stories, total = hub_stories(split) if files is None else (read_stories(files), None)
        n_tokens, n_stories = tokenize_stories(stories, os.path.join(work, f"{split}.bin"), enc,
                                               num_threads, total=total)
        if n_stories == 0:
            raise UserError(f"no stories in the {split} data ({' '.join(files or [HUB_DATASET])}); "
                               "check that it holds non-empty text")
        counts[split] = {"tokens": n_tokens, "stories": n_stories}
    if isinstance(enc, HFTokenizer):
        enc.save(os.path.join(work, "tokenizer"))
        for name in os.listdir(os.path.join(work, "tokenizer")):  # on disk before the renames
            with open(os.path.join(work, "tokenizer", name), "rb+") as f:
                os.fsync(f.fileno())
    write_meta(work, dataset_meta(work, enc, counts))
    return counts


def switch(work, data_dir):
    """Move the complete dataset in work into data_dir: the token files, the tokenizer, then
    meta.json, last. Until meta.json moves, the new token files do not match the old meta.json,
    and load_tokens refuses them; a data_dir without fingerprints gets them first (record_old)."""
    try:
        with signals_held():  # Ctrl-C and SIGTERM wait: the renames take milliseconds
            record_old(data_dir)
            for name in ("validation.bin", "train.bin"):
                os.replace(os.path.join(work, name), os.path.join(data_dir, name))
            tokenizer = os.path.join(data_dir, "tokenizer")
            if os.path.lexists(tokenizer):  # the old one goes with work, when it is deleted
                os.replace(tokenizer, os.path.join(work, "old-tokenizer"))
            if os.path.isdir(os.path.join(work, "tokenizer")):
                os.replace(os.path.join(work, "tokenizer"), tokenizer)
            os.replace(os.path.join(work, "meta.json"), os.path.join(data_dir, "meta.json"))
            sync_folder(data_dir)
    except OSError as e:
        raise UserError(f"could not move the new dataset into {data_dir} ({e.strerror or e}): "
                        "run prepare.py again") from None


def record_old(data_dir):
    """Make data_dir/meta.json describe the token files there with their fingerprints, before new
    files replace them: an older prepare.py wrote no meta.json (GPT-2's tokens), or one without
    fingerprints, under which a new file of the same length would pass. A file that already
    disagrees with meta.json is left as it is: it is refused either way."""
    try:
        meta = read_meta(data_dir)
    except UserError:
        return  # a damaged meta.json: its files are refused either way
    changed = not os.path.isfile(os.path.join(data_dir, "meta.json"))
    for split in ("train", "validation"):
        path, recorded = os.path.join(data_dir, f"{split}.bin"), meta.get(split)
        recorded = recorded if isinstance(recorded, dict) else {}
        if not os.path.isfile(path) or "fingerprint" in recorded:
            continue
        with open(path, "rb") as f:
            n = os.fstat(f.fileno()).st_size // np.dtype(meta["dtype"]).itemsize
            if recorded.get("tokens", n) == n:
                meta[split] = {**recorded, "tokens": n, "fingerprint": fingerprint(f)}
                changed = True
    if changed:
        write_meta(data_dir, meta)


def clear_leftovers(data_dir):
    """What a killed prepare.py left in data_dir: its work folder, or an older version's .tmp files.
    Called with data_dir's lock held: no other prepare.py is at work there."""
    for name in os.listdir(data_dir):
        path = os.path.join(data_dir, name)
        if name.startswith(".prepare-") and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name in ("train.bin.tmp", "validation.bin.tmp", "meta.json.tmp"):
            os.remove(path)


def main(argv=None):
    # allow_abbrev=False: a misspelt flag such as --train_file is an error, not a silent prefix match.
    parser = argparse.ArgumentParser(description="Tokenize TinyStories into train.bin and validation.bin.",
                                     allow_abbrev=False)
    parser.add_argument("--train_files", nargs="+", metavar="F",
                        help=f"local .jsonl/.json/.parquet/.txt files for the train split "
                             f"(default: none, {HUB_DATASET} from the Hugging Face hub)")
    parser.add_argument("--validation_files", nargs="+", metavar="F",
                        help="local files for the validation split, same formats (default: none, the hub)")
    parser.add_argument("--excerpt", action="store_true",
                        help="the TinyStories excerpt in tinystories/ (7,398 training stories, 133 "
                             "for validation): no network needed")
    parser.add_argument("--data_dir", default="data",
                        help="where train.bin, validation.bin and meta.json go (default: %(default)s)")
    parser.add_argument("--tokenizer", default="gpt2", metavar="PATH",
                        help="gpt2 (tiktoken's GPT-2 BPE), or a Hugging Face tokenizer: a tokenizer.json "
                             "or a model directory with one, such as google/gemma-3-270m's "
                             "(default: %(default)s)")
    parser.add_argument("--bpe", type=int, metavar="SIZE",
                        help="train a byte-level BPE of SIZE tokens on the training stories and "
                             "tokenize with it (a vocabulary fitted to TinyStories, such as 4096)")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count(),
                        help="tokenizer threads (default: %(default)s, the number of cores)")
    args = parser.parse_args(argv)
    if args.num_threads < 1:
        parser.error("--num_threads must be at least 1")
    if args.excerpt and (args.train_files or args.validation_files):
        parser.error("--excerpt gives the files: drop --train_files and --validation_files")
    if args.excerpt:
        args.train_files = [os.path.join(EXCERPT, f) for f in ("train.jsonl.gz", "train-extra.jsonl.gz")]
        args.validation_files = [os.path.join(EXCERPT, "validation.jsonl.gz")]
    try:
        prepare(args)
    except UserError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    start_command("prepare.py")
    main()
