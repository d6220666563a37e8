"""
test_finetune.py: continuing a Hugging Face Gemma 3's training with its own tokenizer, on a tiny
random checkpoint written as google/gemma-3-270m ships (save_pretrained, bfloat16, no lm_head) and a
tokenizer built as Gemma's is: prepare.py --tokenizer, train --init_from, --resume, sample, export,
eval; data from another tokenizer refused; token ids above 65,535 through uint32 files.

    python -m pytest test_finetune.py
"""
import json, re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset import load_tokens, story_starts, story_windows, validation_windows
from tokenizer import HFTokenizer, gpt2_tokenizer, load_tokenizer
from conftest import (FULL, SLIDING, cli, generated_stories, random_transformers_model,
                      tiny_gemma_tokenizer, tiny_model, write_jsonl)
from dataset import get_batch

SETTINGS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=1, head_dim=8, sliding_window=4, query_pre_attn_scalar=32,
                layer_types=(SLIDING, SLIDING, FULL, SLIDING), rope_theta=1e6,
                rope_local_base_freq=1e4, max_position_embeddings=256)
TRAIN, VALIDATION = generated_stories(60), generated_stories(12, seed=1)
BOS, EOS = 2, 1  # tiny_gemma_tokenizer's, as in Gemma's vocabulary


def write_checkpoint(path, tokenizer):
    """A Hugging Face Gemma 3 directory as google/gemma-3-270m is one: config.json, bfloat16
    model.safetensors (no lm_head: tied), tokenizer.json and a tokenizer_config.json."""
    settings = {**SETTINGS, "vocab_size": tokenizer.get_vocab_size()}
    model = random_transformers_model(settings, bos_token_id=BOS, eos_token_id=EOS)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    settings = dict(tokenizer_class="GemmaTokenizer", bos_token="<bos>", eos_token="<eos>",
                    add_bos_token=True)
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return path


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("gemma-3-tiny"), tiny_gemma_tokenizer())


@pytest.fixture(scope="module")
def gemma_data(tmp_path_factory, gemma_dir):
    """The stories, prepared with the checkpoint's own tokenizer."""
    d = tmp_path_factory.mktemp("data-gemma")
    cli("prepare.py", "--train_files", write_jsonl(d / "train.jsonl", TRAIN), "--validation_files",
        write_jsonl(d / "validation.jsonl", VALIDATION), "--data_dir", d, "--tokenizer", gemma_dir)
    return d


def test_prepare_frames_each_story_as_the_tokenizer_frames_a_document(gemma_dir, gemma_data):
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(gemma_dir)
    expected = [i for story in TRAIN for i in theirs(story).input_ids + [EOS]]  # <bos> story <eos>
    assert np.fromfile(gemma_data / "train.bin", np.uint16).tolist() == expected
    assert expected[0] == BOS and expected.count(BOS) == len(TRAIN)
    meta = json.loads((gemma_data / "meta.json").read_text())
    assert meta["tokenizer"] == str(gemma_dir / "tokenizer.json") and meta["dtype"] == "uint16"
    assert (meta["vocab_size"], meta["prefix"], meta["eot_token"]) == (103, [BOS], EOS)
    assert meta["fingerprint"] == HFTokenizer(str(gemma_dir)).fingerprint
    kept = gemma_data / "tokenizer" / "tokenizer.json"  # the copy a run takes with it
    assert kept.read_bytes() == (gemma_dir / "tokenizer.json").read_bytes()


def test_a_story_holding_the_text_of_a_special_token_is_encoded_as_text(gemma_dir):
    tokenizer = HFTokenizer(str(gemma_dir))
    [ids] = tokenizer.encode_documents(["Lily<eos>"])
    assert ids.count(EOS) == 1 and ids[-1] == EOS  # only the framing's own <eos>


def big_vocabulary_tokenizer(size=70_000):
    """A word-level tokenizer whose story words all have ids above 65,535, beyond uint16."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    words = sorted({w for s in TRAIN + VALIDATION for w in re.findall(r"\w+|[^\w\s]+", s)})
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab |= {f"filler{i}": i for i in range(4, size - len(words))}
    vocab |= {w: size - len(words) + i for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                             special_tokens=[("<bos>", BOS)])
    return tokenizer


@pytest.mark.slow
def test_ids_above_65535_go_through_uint32_files_into_training_and_sampling(tmp_path):
    d, out = tmp_path / "data", tmp_path / "out"
    (tmp_path / "big").mkdir()
    big_vocabulary_tokenizer().save(str(tmp_path / "big" / "tokenizer.json"))
    (tmp_path / "big" / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    cli("prepare.py", "--train_files", write_jsonl(tmp_path / "t.jsonl", TRAIN),
        "--validation_files", write_jsonl(tmp_path / "v.jsonl", VALIDATION), "--data_dir", d,
        "--tokenizer", tmp_path / "big" / "tokenizer.json")
    meta = json.loads((d / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    ids = np.fromfile(d / "train.bin", np.uint32)
    assert len(ids) == meta["train"]["tokens"] and ids.max() > 65_535 and ids[0] == BOS
    tokens = load_tokens(d, "train", 16, 70_000)
    x, y = get_batch(tokens, torch.tensor([0, 5]), 16, torch.device("cpu"))
    assert x[0].tolist() == ids[:16].tolist() and y[1].tolist() == ids[6:22].tolist()
    assert x.max() > 65_535  # not wrapped around at 2^16
    model = ["--vocab_size", "70000", "--hidden_size", "16", "--intermediate_size", "32",
             "--num_hidden_layers", "2", "--head_dim", "8", "--sliding_window", "8"]
    cli("gemma.py", "train", "--preset", "small", *model, "--data_dir", d, "--out_dir", out,
        "--block_size", "16", "--batch_size", "2", "--total_batch_size", "32", "--max_steps", "2",
        "--eval_windows", "2", "--eval_interval", "2")
    assert (out / "tokenizer" / "tokenizer.json").exists()  # the run keeps its data's tokenizer
    story = cli("gemma.py", "sample", "--out_dir", out, "--max_new_tokens", "5", "Once").stdout
    assert story.startswith("Once") and "filler" in story  # decoded with the run's tokenizer


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def transformers_loss(model, tokens, block_size, windows):
    """The loss transformers gives on train()'s fixed validation windows (each a story's, from its
    <bos>): the summed nats over the count of targets."""
    nats = count = 0
    for inputs, targets in validation_windows(tokens, block_size, windows):
        logits = model(torch.tensor([inputs])).logits[0]
        nats += F.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum").item()
        count += sum(t != -100 for t in targets)
    return nats / count


@pytest.mark.slow
def test_fine_tune_resume_sample_export_and_transformers_generates_the_same_story(
        tmp_path, gemma_dir, gemma_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, hf_dir = tmp_path / "out", tmp_path / "hf"
    flags = ["--init_from", gemma_dir, "--data_dir", gemma_data, "--out_dir", out, "--lr", "3e-3",
             "--block_size", "64", "--batch_size", "4", "--total_batch_size", "256",
             "--warmup_steps", "2", "--eval_interval", "10", "--eval_windows", "8"]
    cli("gemma.py", "train", *flags, "--max_steps", "10")
    cli("gemma.py", "train", "--resume", "--out_dir", out, "--data_dir", gemma_data,
        "--max_steps", "30")
    losses = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    original = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # step 0's loss is the checkpoint's own: its weights, loaded exactly
        start = transformers_loss(original, load_tokens(gemma_data, "validation", 64, 103),
                                  64, 8)
    assert abs(losses[0] - start) < 1e-4
    assert losses[-1] < losses[0] - 0.5, losses  # and training lowered it

    prompt = "Once upon a time"
    story = cli("gemma.py", "sample", "--out_dir", out, "--temperature", "0", "--max_new_tokens",
                "12", "--dtype", "float32", prompt).stdout
    cli("gemma.py", "export", "--out_dir", out, "--hf_dir", hf_dir)
    ids = AutoTokenizer.from_pretrained(hf_dir)(prompt).input_ids
    ours = load_tokenizer(str(out / "tokenizer"))
    assert ids == ours.encode_ordinary(prompt) and ids[0] == BOS
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    generated = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0].tolist()
    text = b"".join(ours.decode_single_token_bytes(t) for t in generated if t != EOS).decode()
    assert story == text + "\n" + "-" * 40 + "\n"

    before = cli("gemma.py", "eval", "--init_from", gemma_dir, "--files",
                 gemma_data / "validation.jsonl", "--block_size", "64").stdout
    after = cli("gemma.py", "eval", "--out_dir", out, "--files", gemma_data / "validation.jsonl",
                "--block_size", "64").stdout
    loss = [float(re.search(r"loss (\S+) nats/token", s).group(1)) for s in (before, after)]
    assert loss[1] < loss[0] - 0.5, (before, after)


@pytest.mark.slow
def test_eval_of_stories_longer_than_a_window_goes_on_in_windows_that_begin_with_bos(
        tmp_path, gemma_dir):
    from transformers import AutoModelForCausalLM
    files = [write_jsonl(tmp_path / "a.jsonl", VALIDATION[:6]), write_jsonl(tmp_path / "b.jsonl",
                                                                            VALIDATION[6:])]
    result = cli("gemma.py", "eval", "--init_from", gemma_dir, "--files", *files, "--block_size",
                 "32").stdout
    tokenizer = HFTokenizer(str(gemma_dir))
    theirs = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    nats, count, windows = 0.0, 0, 0
    with torch.no_grad():
        for doc in tokenizer.encode_documents(VALIDATION):  # <bos> story <eos>, 40-odd tokens
            assert len(doc) > 33
            # the first window from the story's <bos>; each next one: <bos>, then the last token
            # predicted (its context), then the next 30 tokens, each predicted once
            pieces = [(doc[:33], 1)] + [([BOS] + doc[p - 1:p + 31], 2) for p in range(33, len(doc), 31)]
            for window, context in pieces:
                logits = theirs(torch.tensor([window[:-1]])).logits[0]
                targets = torch.tensor(window[1:])[context - 1:]
                nats += F.cross_entropy(logits[context - 1:], targets, reduction="sum").item()
                count, windows = count + len(targets), windows + 1
    assert count == sum(len(d) - 1 for d in tokenizer.encode_documents(VALIDATION))
    reported = float(re.search(r"loss (\S+) nats/token", result).group(1))
    assert abs(reported - nats / count) < 2e-4
    assert result.endswith(f", {len(VALIDATION)} stories in {windows} windows\n")


@pytest.mark.slow
def test_data_from_another_tokenizer_is_refused_in_one_line_naming_both(tmp_path, gemma_dir,
                                                                        gemma_data, data_dir):
    # GPT-2 data for Gemma's checkpoint: it would silently train on the wrong ids
    result = cli("gemma.py", "train", "--init_from", gemma_dir, "--data_dir", data_dir, "--out_dir",
                 tmp_path / "a", "--block_size", "32", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "was tokenized with gpt2" in result.stderr
    assert str(gemma_dir / "tokenizer.json") in result.stderr
    # Gemma-tokenized data for a model exported from a GPT-2 run (no tokenizer.json: GPT-2's BPE)
    import hf
    hf.export(tiny_model(vocab_size=50257), gpt2_tokenizer(), str(tmp_path / "gpt2-model"))
    result = cli("gemma.py", "train", "--init_from", tmp_path / "gpt2-model", "--data_dir",
                 gemma_data, "--out_dir", tmp_path / "b", "--block_size", "32", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "the model's tokenizer is gpt2" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_the_prompt_pass_computes_logits_for_its_last_position_only():
    model, idx = tiny_model().eval(), torch.randint(0, 101, (2, 9))
    forward, shapes = model.forward, []

    def spy(*args, **kwargs):  # records the shape of the logits of every forward pass
        logits, loss = forward(*args, **kwargs)
        shapes.append(tuple(logits.shape))
        return logits, loss

    with torch.no_grad():
        full = forward(idx)[0]
        assert torch.allclose(forward(idx, last=True)[0], full[:, -1:], atol=1e-6)
        model.forward = spy
        list(model.stream(idx, 3, temperature=0))  # the prompt, then two one-token steps
    assert shapes == [(2, 1, 101)] * 3  # never (2, 9, 101)


# ----- Windows that begin as the model expects, and bits per byte ---------------------------------


@pytest.mark.parametrize("block_size", [2, 5, 8, 40])
def test_story_windows_begin_as_a_document_does_and_predict_every_token_once(block_size):
    start, eot = [BOS], EOS
    documents = [[BOS, *range(10, 10 + n), eot] for n in (0, 1, 3, 7, 20)]
    windows = story_windows(documents, start, block_size)
    for inputs, targets in windows:
        assert len(inputs) == len(targets) <= block_size and inputs[0] == BOS
        for x, y, nxt in zip(inputs, targets, inputs[1:] + [None]):
            assert y == -100 or nxt is None or y == nxt  # a target is the next input
    # every token after each document's start is a target exactly once, in order
    assert [t for _, ts in windows for t in ts if t != -100] == [t for d in documents for t in d[1:]]


def test_validation_windows_of_gpt2_data_are_the_evenly_spread_windows_of_the_file(data_dir):
    tokens = load_tokens(data_dir, "validation", 32, 50257)
    data = np.fromfile(tokens.path, np.uint16).tolist()
    offsets = torch.linspace(0, tokens.size - 33, 5).long().unique().tolist()  # as they always were
    assert validation_windows(tokens, 32, 5) == [(data[o:o + 32], data[o + 1:o + 33])
                                                         for o in offsets]


def test_validation_and_training_windows_of_gemma_data_begin_with_bos(gemma_data):
    tokens = load_tokens(gemma_data, "validation", 16, 103)
    windows = validation_windows(tokens, 16, 1000)
    assert all(x[0] == BOS for x, _ in windows) and len(windows) > len(VALIDATION)  # all of them
    starts = story_starts(tokens, 16)
    data = np.fromfile(tokens.path, np.uint16)
    assert len(starts) > 1 and set(data[starts]) == {BOS}
    x, y = get_batch(tokens, torch.from_numpy(starts[:2]), 16, torch.device("cpu"))
    assert x[:, 0].tolist() == [BOS, BOS] and x[1].tolist() == data[starts[1]:starts[1] + 16].tolist()
    assert y[1].tolist() == data[starts[1] + 1:starts[1] + 17].tolist()


def test_eval_scores_each_story_whole_in_nats_and_bits_per_byte(tmp_path, gemma_dir):
    import math
    from gemma import Gemma
    file = write_jsonl(tmp_path / "v.jsonl", VALIDATION[:3] + ["Lily é"])  # é: byte fallback
    result = cli("gemma.py", "eval", "--init_from", gemma_dir, "--files", file).stdout
    model, tokenizer = Gemma.from_pretrained(str(gemma_dir)), HFTokenizer(str(gemma_dir))
    nats = tokens = 0
    with torch.no_grad():
        for ids in tokenizer.encode_documents(VALIDATION[:3] + ["Lily é"]):
            logits = model(torch.tensor([ids[:-1]]))[0][0]
            nats += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            tokens += len(ids) - 1
    text_bytes = sum(len(s.encode()) for s in VALIDATION[:3] + ["Lily é"])
    loss, bpb = map(float, re.search(r"loss (\S+) nats/token, (\S+) bits/byte", result).groups())
    assert abs(loss - nats / tokens) < 1e-4 and abs(bpb - nats / math.log(2) / text_bytes) < 1e-4


@pytest.mark.slow
def test_a_frozen_embedding_stays_as_it_was_while_the_blocks_learn(tmp_path, gemma_dir, gemma_data):
    from safetensors.torch import load_file
    out = tmp_path / "out"
    flags = ["--init_from", gemma_dir, "--data_dir", gemma_data, "--out_dir", out, "--lr", "3e-3",
             "--block_size", "32", "--batch_size", "2", "--total_batch_size", "64",
             "--warmup_steps", "1", "--eval_interval", "3", "--eval_windows", "4"]
    cli("gemma.py", "train", *flags, "--freeze_embedding", "--max_steps", "3")
    state = torch.load(out / "ckpt.pt", weights_only=True)
    original = {k.removeprefix("model."): v.float()
                for k, v in load_file(gemma_dir / "model.safetensors").items()}
    assert torch.equal(state["model"]["embed_tokens.weight"], original["embed_tokens.weight"])
    assert not torch.equal(state["model"]["layers.0.mlp.up_proj.weight"],
                           original["layers.0.mlp.up_proj.weight"])
    sizes = [len(g["params"]) for g in state["optimizers"][0]["param_groups"]]
    assert sum(sizes) == len(original) - 1  # every parameter but the embedding
    result = cli("gemma.py", "train", "--resume", "--out_dir", out, "--no-freeze_embedding",
                 "--max_steps", "6", check=False)
    assert result.returncode == 1 and "trained with --freeze_embedding" in result.stderr
    assert result.stderr.count("\n") == 1
