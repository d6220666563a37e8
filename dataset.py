"""
dataset.py: stories in, windows out. It reads stories from files (JSON lines, parquet, plain text),
reads the token files prepare.py wrote back, each checked against meta.json, and cuts what the
model reads at once: training's and validation's windows, each beginning as the model expects, and
batches of them. It imports torch only where it needs it: prepare.py reads stories through it.

    python gemma.py train --data_dir data       # reads data/train.bin, validation.bin, meta.json
    python gemma.py eval --files stories.jsonl  # each story scored on its own (story_windows)
"""
import gzip
import hashlib
import itertools
import json
import os
import sys
from typing import NamedTuple

import numpy as np

from cli import UserError
from files import read_json
from tokenizer import EOT_TEXT, HFTokenizer, describe, gpt2_tokenizer, load_tokenizer, token_bytes


# ----- Reading stories. Every reader streams, so memory does not grow with the corpus. ------------
def open_text(path):
    """A text file for reading, gzip-compressed where its name ends in .gz (tinystories/'s). newline=""
    keeps line endings as written: the text is tokenized exactly as it is in the file."""
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_jsonl(path):
    with open_text(path) as f:
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
    kind = parquet.schema_arrow.field("text").type
    if not is_text(kind):
        raise UserError(f'{path}: its "text" column holds {kind}, not strings; put the stories '
                        'there as text')
    for batch in parquet.iter_batches(batch_size=4096, columns=["text"]):
        yield from batch.column(0).to_pylist()


def is_text(kind):
    """Whether a parquet column of this Arrow type holds strings (plain, large, views, dictionary)."""
    import pyarrow.types as types
    kind = kind.value_type if types.is_dictionary(kind) else kind
    views = getattr(types, "is_string_view", lambda kind: False)  # pyarrow 16 and later
    return types.is_string(kind) or types.is_large_string(kind) or views(kind)


def read_txt(path):
    with open_text(path) as f:
        lines = []
        for line in itertools.chain(f, [EOT_TEXT]):  # as if a separator followed the last story
            if line.rstrip("\r\n") != EOT_TEXT:
                lines.append(line)
                continue
            # The line break just before a separator belongs to the separator, not to the story.
            story = "".join(lines)
            yield story[:-2] if story.endswith("\r\n") else story.removesuffix("\n")
            lines = []


READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".parquet": read_parquet, ".txt": read_txt,
           ".jsonl.gz": read_jsonl, ".json.gz": read_jsonl, ".txt.gz": read_txt}


def file_type(path):
    """The type a story file is read as: its extension, with .gz (.jsonl.gz, .txt.gz)."""
    stem, extension = os.path.splitext(path.lower())
    return os.path.splitext(stem)[1] + extension if extension == ".gz" else extension


def check_files(paths):
    """Fail on a file that cannot be read before any work, and before anything is written."""
    for path in paths:
        extension = file_type(path)
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder: name the files in it")
        if extension not in READERS:
            raise UserError(f"{path}: unknown file type {extension!r}; use .jsonl/.json, .parquet "
                            "or .txt (.jsonl.gz and .txt.gz too)")
        if not os.path.exists(path):  # a named pipe is fine: stories streamed by another program
            raise UserError(f"{path}: no such file; check the path")


def read_stories(paths):
    for path in paths:
        try:
            yield from READERS[file_type(path)](path)
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError) as e:  # no permission, a vanished file, a truncated .gz
            why = getattr(e, "strerror", None) or e
            raise UserError(f"cannot read {path} ({why}); check the file") from None


# ----- Reading the token files back, checked against meta.json ------------------------------------
MIB = 2 ** 20


def fingerprint(f):
    """A token file's fingerprint, cheap at any size: the sha256 of its size and its first and last
    MiB. meta.json records it and load_tokens compares it, so that a file of another run of
    prepare.py cannot pass for the one meta.json describes, even at the same length."""
    size = os.fstat(f.fileno()).st_size
    digest = hashlib.sha256(str(size).encode())
    for offset in (0, max(0, size - MIB)):
        f.seek(offset)
        digest.update(f.read(MIB))
    return digest.hexdigest()[:16]


class TokenFile(NamedTuple):
    """A split's token file, as load_tokens checked it: gemma.py memory-maps it a batch at a time."""
    path: str
    dtype: str
    size: int  # tokens
    meta: dict  # meta.json's record: the tokenizer, its framing ids, the counts
    file: object = None  # the open file that load_tokens checked (None: open path)

    def tokens(self):
        """The file's tokens, mapped afresh (a map kept for a whole run leaks) from the file that was
        checked: if prepare.py replaces it meanwhile, the run reads on from the old one, which the
        system keeps while it is open. A file rewritten in place to another size stops the run."""
        if self.file is None:
            return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.size,))
        if os.fstat(self.file.fileno()).st_size != self.size * np.dtype(self.dtype).itemsize:
            raise UserError(f"{self.path} changed size while training read it (rewritten in place?):"
                            " training stopped, its last checkpoint intact; make the data whole "
                            "(prepare.py), then continue with --resume")
        return np.memmap(self.file, dtype=self.dtype, mode="r", shape=(self.size,))


def read_meta(data_dir):
    """data_dir/meta.json; a directory without one holds GPT-2 uint16 tokens, as prepare.py wrote
    before it recorded them."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        return describe(gpt2_tokenizer())
    try:
        meta = {**describe(gpt2_tokenizer()), **read_json(path)}
        splits = [v for v in meta.values() if isinstance(v, dict)]
        if (meta["dtype"] not in ("uint16", "uint32") or type(meta["vocab_size"]) is not int
                or not all(type(s.get("tokens", 0)) is int for s in splits)):
            raise ValueError("a value of the wrong kind")
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({str(e).splitlines()[0]}): run prepare.py "
                        "again") from None
    return meta


def load_tokens(data_dir, split, block_size, vocab_size, meta=None):
    """Check data_dir/split.bin once, thoroughly, so that a bad file fails before training starts,
    with a hint, not mid-run: against meta.json (meta: as read once for all of a run's files), its
    count of tokens and its fingerprint, then its tokens. Returns its TokenFile, whose file stays
    open: the run reads the file it checked."""
    path, meta = os.path.join(data_dir, f"{split}.bin"), meta or read_meta(data_dir)
    if not os.path.isfile(path):
        raise UserError(f"no {path}: run `python prepare.py --data_dir {data_dir}` first "
                           "(or pass --data_dir)")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    dtype = np.dtype(meta["dtype"])
    size = os.fstat(f.fileno()).st_size
    if size % dtype.itemsize:
        raise UserError(f"{path} is not a whole number of {dtype} tokens: it is truncated; "
                           "run prepare.py again")
    n = size // dtype.itemsize
    recorded = meta.get(split) if isinstance(meta.get(split), dict) else {}
    again = "run prepare.py again (or let the prepare.py that writes there finish)"
    if recorded.get("tokens", n) != n:
        raise UserError(f"{path} holds {n:,} tokens, but {data_dir}/meta.json records "
                        f"{recorded['tokens']:,}: it is truncated, or another dataset's; {again}")
    if "fingerprint" in recorded and recorded["fingerprint"] != fingerprint(f):
        raise UserError(f"{path} is not the file that {data_dir}/meta.json describes (another "
                        f"dataset's?): {again}")
    data = np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
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
    return TokenFile(path, dtype.name, n, meta, f)


class RunData(NamedTuple):
    """What a training run reads, checked once (load_data)."""
    train: TokenFile  # train.bin, read a batch at a time
    validation: list  # the fixed validation windows, in batches of (inputs, targets)
    starts: object    # where train.bin's windows may begin (story_starts), or None: anywhere
    nbytes: object    # each token id's bytes of text, a tensor on the run's device
    tokenizer: object    # the data's own tokenizer, for the run to keep; None for GPT-2's


def load_data(c, vocab_size, device):
    """A training's data (c: its TrainConfig), checked once and thoroughly: the tokenizer (see
    check_tokenizer), then train.bin and validation.bin, both against one reading of meta.json, so
    that they are one dataset's. Where its stories are framed with a start (Gemma's <bos>), every
    window begins with it at a story's start, as in the model's own training. GPT-2's data keeps its
    windows anywhere: its stories run on from one another."""
    import torch
    meta, tokenizer = check_tokenizer(c.data_dir, c.out_dir, c.init_from, c.resume)
    train, validation = (load_tokens(c.data_dir, split, c.block_size, vocab_size, meta)
                         for split in ("train", "validation"))
    windows = validation_windows(validation, c.block_size, c.eval_windows)
    batches = batches_of(windows, c.batch_size, pad=meta["eot_token"])
    starts = story_starts(train, c.block_size) if meta["prefix"] else None
    nbytes = torch.from_numpy(token_bytes(tokenizer or gpt2_tokenizer())).to(device)
    return RunData(train, batches, starts, nbytes, tokenizer)


def check_tokenizer(data_dir, out_dir, init_from, resume):
    """A run's tokenizer is its data's. Refuse data made with another tokenizer than the model's
    (init_from's, or on --resume the run's own), or a data_dir whose tokenizer/ is not the one its
    meta.json names. -> (meta.json's settings, the data's own tokenizer, None for GPT-2's), which
    a new run keeps in out_dir/tokenizer, where sample, export and --resume find it."""
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
    if meta["tokenizer"] == "gpt2":
        return meta, None
    path = os.path.join(data_dir, "tokenizer")
    tokenizer = HFTokenizer(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    if tokenizer is None or tokenizer.fingerprint != meta["fingerprint"]:
        raise UserError(f"{path} is not the tokenizer that {data_dir}/meta.json names: run "
                        "prepare.py again (or let the prepare.py that writes there finish)")
    return meta, tokenizer


# ----- Windows: what the model reads at once, cut so that each begins as the model expects --------
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


def story_documents(paths, tokenizer):
    """The stories of the files at paths (the formats of read_stories), each as a list of ids framed
    as a document: its start (document_start: Gemma's <bos>; GPT-2's end-of-text), the story, and
    the end-of-text token, which the model predicts too."""
    check_files(paths)
    stories = [s for s in read_stories(paths) if s and not s.isspace()]
    if not stories:
        raise UserError(f"no stories in {' '.join(paths)}: check that it holds non-empty text")
    start, eot = document_start(describe(tokenizer)), tokenizer.eot_token
    return [start + ids + [eot] for ids in tokenizer.encode_ordinary_batch(stories)]


def get_batch(tokens, offsets, block_size, device):
    """Inputs and targets (the inputs shifted by one) of the windows starting at `offsets`, read
    through a memory map of prepare.py's file (a TokenFile), so the corpus never sits in RAM."""
    import torch
    ids = tokens.tokens()  # the file checked at the start, even if prepare.py replaced it since
    rows = np.stack([ids[o:o + block_size + 1] for o in offsets.tolist()]).astype(np.int64)
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:].copy())  # (B, T) each
    cuda = device.type == "cuda"
    if cuda:  # pinned memory: the copy to the GPU overlaps with the work
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)


def draw_offsets(tokens, starts, block_size, micro_steps, batch_size, generator):
    """Where one optimizer step's windows begin, (micro_steps, batch_size): anywhere in the file, or,
    given starts (story_starts), at a story's start. Every process draws the same offsets for the
    whole step and reads its own share, so n processes x k micro-steps see exactly the windows
    that 1 process x n k micro-steps would."""
    import torch
    shape = (micro_steps, batch_size)
    if starts is None:  # GPT-2's data: anywhere, stories run on from one another
        return torch.randint(tokens.size - block_size, shape, generator=generator)
    return torch.from_numpy(starts)[torch.randint(len(starts), shape, generator=generator)]


def fit_context(ids, new, context):
    """A prompt's ids and the number of new tokens to generate after it, fitted to the model's
    context: the new tokens take at most half of it when the prompt is long, the prompt loses its
    start if it must, and a note on stderr says so. -> (ids, new)"""
    fitted = min(new, context - min(len(ids), context // 2))
    if fitted < new or len(ids) + fitted > context:  # fewer new tokens, or less prompt
        print(f"note: the model's context is {context} tokens: {fitted} new tokens after the "
              f"prompt's last {min(len(ids), context - fitted)}", file=sys.stderr)
        ids = ids[-(context - fitted):]
    return ids, fitted


def story_batches(paths, tokenizer, block_size, batch_size):
    """The stories of the files at paths, each on its own from its start (story_documents), in
    windows that each begin with that start (story_windows), as batches (batches_of). -> (batches,
    the number of stories, the number of windows)"""
    documents = story_documents(paths, tokenizer)
    windows = story_windows(documents, document_start(describe(tokenizer)), block_size)
    return batches_of(windows, batch_size, pad=tokenizer.eot_token), len(documents), len(windows)


def file_documents(tokens):
    """The documents of a token file framed with a prefix (prefix, story, end-of-text each), as
    lists of ids: cut after every end-of-text."""
    meta, data = tokens.meta, np.asarray(tokens.tokens(), dtype=np.int64)
    ends = np.flatnonzero(data == meta["eot_token"]) + 1
    return [d.tolist() for d in np.split(data, ends) if len(d)]


def story_starts(tokens, block_size):
    """Where the stories of a token file begin (after each end-of-text, and at 0) that have a whole
    window of block_size + 1 tokens ahead of them: the offsets of windows that begin as a
    document does."""
    data = tokens.tokens()
    starts = np.concatenate([[0], np.flatnonzero(data == tokens.meta["eot_token"]) + 1])
    return starts[starts <= tokens.size - block_size - 1]


def validation_windows(tokens, block_size, count):
    """The fixed validation windows, the same in every run, so that runs compare. GPT-2 data:
    `count` windows of block_size evenly spread over the file, as they always were. Data framed
    with a prefix (Gemma's <bos>): the stories' windows (story_windows), `count` of them evenly
    spread, so that the model is scored from the start it always sees. A note (rank 0) where the
    file holds fewer. -> [(inputs, targets)]"""
    import torch  # imported here: prepare.py's own commands never need it
    if tokens.meta["prefix"]:
        every = story_windows(file_documents(tokens), tokens.meta["prefix"], block_size)
        distinct, what = len(every), "stories' windows"
    else:
        distinct, what = tokens.size - block_size, "distinct windows"  # a window's starts
    if distinct < count and os.environ.get("RANK", "0") == "0":
        print(f"note: {tokens.path} holds {distinct:,} {what} of {block_size} tokens: the "
              f"validation loss is measured on those, not on --eval_windows {count}", file=sys.stderr)
    picks = torch.linspace(0, distinct - 1, min(count, distinct)).long().unique().tolist()
    if tokens.meta["prefix"]:
        return [every[i] for i in picks]
    data = tokens.tokens()  # offsets 0 .. size - block_size - 1, as torch.linspace always gave
    return [(data[o:o + block_size].tolist(), data[o + 1:o + block_size + 1].tolist()) for o in picks]


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
