"""
test_gemma3_270m.py: Google's own Gemma 3 270M (its Q4_K_M weights, dequantized: conftest.py's
gemma3_270m fixture) against transformers, the reference, through gemma.py's command line: the
logits past the sliding window, greedy sampling, `eval` in nats and bits per byte, a few steps of
fine-tuning, and the export back to transformers. Slow: a 268M-parameter model on a CPU.

    python -m pytest test_gemma3_270m.py
"""
import json, math, re

import pytest
import torch
import torch.nn.functional as F

from tokenizer import HFTokenizer, gpt2_tokenizer, token_bytes
from conftest import cli, generated_stories, write_jsonl

pytestmark = pytest.mark.slow

STORIES = generated_stories(40)


@pytest.fixture(scope="module")
def theirs(gemma3_270m):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gemma3_270m, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(gemma3_270m):
    return HFTokenizer(str(gemma3_270m))


def test_logits_equal_transformers_past_1024_tokens_in_float32(gemma3_270m, theirs, tokenizer):
    from gemma import Gemma
    ids = [i for ids in tokenizer.encode_documents(STORIES) for i in ids][:1100]
    assert len(ids) == 1100  # two sliding windows of 512 and more: every layer's mask bites
    ours = Gemma.from_pretrained(str(gemma3_270m))
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits
        got = ours(torch.tensor([ids]))[0]
    assert (got - expected).abs().max() < 1e-4, (got - expected).abs().max()  # 2.3e-5 measured


def test_greedy_sample_equals_transformers_generate_for_64_tokens(gemma3_270m, theirs, tokenizer):
    prompt = "The capital of France is"
    story = cli("gemma.py", "sample", "--init_from", gemma3_270m, "--temperature", "0",
                "--dtype", "float32", "--max_new_tokens", "64", prompt).stdout
    ids = tokenizer.encode_ordinary(prompt)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64)[0].tolist()
    text = b"".join(tokenizer.decode_single_token_bytes(i) for i in out).decode()
    assert len(out) == len(ids) + 64  # no end-of-text: all 64 tokens compared
    assert story == text + "\n" + "-" * 40 + "\n"


def test_eval_gives_the_nats_and_bits_per_byte_transformers_gives_each_story_from_bos(
        tmp_path, gemma3_270m, theirs, tokenizer):
    stories = STORIES[:6] + ["Ça coûte 5 €: naïve café 東京 🙂, and  two spaces."]
    result = cli("gemma.py", "eval", "--init_from", gemma3_270m, "--files",
                 write_jsonl(tmp_path / "s.jsonl", stories), "--block_size", "1024").stdout
    nats = tokens = 0
    with torch.no_grad():
        for ids in tokenizer.encode_documents(stories):  # <bos> story <eos>: scored whole
            assert ids[0] == 2 and ids[-1] == 1
            logits = theirs(torch.tensor([ids[:-1]])).logits[0]
            nats += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            tokens += len(ids) - 1
    text_bytes = sum(len(s.encode()) for s in stories)  # <bos> and <eos> are no text
    loss, bpb = map(float, re.search(r"loss (\S+) nats/token, (\S+) bits/byte", result).groups())
    assert abs(loss - nats / tokens) < 2e-4, (result, nats / tokens)
    assert abs(bpb - nats / (math.log(2) * text_bytes)) < 1e-4, result
    assert result.endswith(f"{len(stories)} stories in {len(stories)} windows\n")


def test_gpt2_and_gemmas_tokenizer_count_the_same_bytes_for_the_same_text(tokenizer):
    text = "Once upon a time,  Zoë saw 東京 and 🙂🚀!\n\nThe end. <|endoftext|> <bos>"
    for enc in (gpt2_tokenizer(), tokenizer):
        nbytes = token_bytes(enc)
        ids = (enc.encode_ordinary(text) if enc is tokenizer else enc.encode_ordinary(text))
        counted = [i for i in ids if i not in getattr(enc, "prefix", [])]
        assert sum(nbytes[i] for i in counted) == len(text.encode()), enc
        assert nbytes[enc.eot_token] == 0


def test_a_few_fine_tuning_steps_lower_the_loss_and_the_export_loads_back_with_its_logits(
        tmp_path, gemma3_270m, tokenizer):
    from transformers import AutoModelForCausalLM
    data, out, hf_dir = tmp_path / "data", tmp_path / "out", tmp_path / "hf"
    cli("prepare.py", "--train_files", write_jsonl(tmp_path / "t.jsonl", STORIES),
        "--validation_files", write_jsonl(tmp_path / "v.jsonl", generated_stories(4, seed=1)),
        "--data_dir", data, "--tokenizer", gemma3_270m)
    cli("gemma.py", "train", "--init_from", gemma3_270m, "--data_dir", data, "--out_dir", out,
        "--block_size", "64", "--batch_size", "2", "--total_batch_size", "128", "--lr", "1e-4",
        "--warmup_steps", "1", "--max_steps", "4", "--eval_interval", "4", "--eval_windows", "4",
        timeout=900)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [(r["val_loss"], r["val_bpb"]) for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[1][0] < val[0][0] - 0.1 and val[1][1] < val[0][1], val
    cli("gemma.py", "export", "--out_dir", out, "--hf_dir", hf_dir)
    exported = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    from gemma import load_model
    model = load_model(str(out))[0].eval()
    ids = torch.tensor([tokenizer.encode_ordinary(STORIES[0])])
    with torch.no_grad():
        assert (exported(ids).logits - model(ids)[0]).abs().max() < 1e-3
