"""
test_gguf.py: a model exported as GGUF runs in llama.cpp itself (through llama-cpp-python) with
gemma.py's numbers: its logits past the sliding window, its greedy tokens and its tokenization, for
GPT-2's BPE and for a byte-level BPE trained with the tokenizers library; and the mistakes a GGUF
writer can make (no per-layer pattern, no query scaling, norms stored as w) are caught.

    python -m pytest test_gguf.py
    python -m pytest test_gguf.py -s -k "logits or q8_0 or mistake"  # the figures the README quotes
"""
import contextlib, copy, math, os, resource, subprocess, sys
from dataclasses import asdict, replace

import gguf
import numpy as np
import pytest
import torch
from llama_cpp import Llama

import checkpoint
import to_gguf
from conftest import FULL, HERE, SLIDING, cli, generated_stories, tiny_gemma_tokenizer, tiny_model
from gemma import TrainConfig
from cli import UserError
from files import write_json
from tokenizer import HFTokenizer, gpt2_tokenizer

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play in the park with"
NEW_TOKENS = 30  # after PROMPT's 21 GPT-2 tokens: 51 positions, more than 12 windows of 4
# A text that GPT-2's split pattern and merges meet in many ways: accents, CJK, emoji joined by
# zero-width joiners, runs of spaces, tabs and newlines, contractions, digits, and GPT-2's
# end-of-text token written as text, which must stay text
MIXED = ("Café naïve résumé — 東京で 🎉👩‍👩‍👧 emoji!  Two  spaces,   three;\n\n\ttab "
         "<|endoftext|> and 'll it's 123 4567 trailing  ")


def gpt2_model():
    """A tiny Gemma (sliding, sliding, full, sliding; window 4; query_pre_attn_scalar 256, head
    size 8) with GPT-2's vocabulary and random norms, its weights 3x their initial size: a greedy
    continuation that varies, not one token repeated."""
    model = tiny_model(vocab_size=50257).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3 if p.dim() == 2 else 1)
    return model


def llama(path):
    return Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False)


def run_both(model, path, ids):
    """llama.cpp's greedy continuation of ids, with its logits at every position on the way (the
    prompt's in one pass, then one token a step against its cache, the sliding layers' included);
    gemma.py's logits over the same tokens, and gemma.py's own greedy continuation. Returns the
    largest |logit difference|, both continuations, and how far below gemma.py's best logit
    llama.cpp's picks are on its own path: 0 where both pick the same token, a near tie where not."""
    with contextlib.closing(llama(path)) as llm:
        llm.eval(ids)
        tokens = []
        for _ in range(NEW_TOKENS):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(tokens[-1:])
        theirs = llm.scores[:llm.n_tokens].copy()
    with torch.no_grad():
        ours = model(torch.tensor([ids + tokens]))[0][0].numpy()
        greedy = model.generate(torch.tensor([ids]), NEW_TOKENS, temperature=0)[0, len(ids):]
    behind = max(row.max() - row[t] for row, t in zip(ours[len(ids) - 1:], tokens))
    return float(np.abs(theirs - ours).max()), tokens, greedy.tolist(), float(behind)


def agreement(tokens, greedy, behind):
    """How far the two greedy continuations agree, in words (for the README's table)."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, greedy)) if a != b), len(greedy))
    if same == len(greedy):
        return "greedy tokens equal"
    return f"the first {same} greedy tokens equal, then a near tie ({behind:.4f} apart)"


# -----------------------------------------------------------------------------
# The file: what llama.cpp's gemma3 loader reads


@pytest.mark.slow  # gguf's reader takes 4 s over GPT-2's 50,257 tokens and 50,000 merges
def test_the_gguf_holds_gemma3s_metadata_every_layers_pattern_and_the_shifted_norms(tmp_path):
    model = gpt2_model()
    to_gguf.export(model, gpt2_tokenizer(), tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    c = model.config
    assert field("general.architecture") == "gemma3"
    assert field("gemma3.attention.sliding_window_pattern") == [True, True, False, True]
    assert field("gemma3.attention.sliding_window") == 4 and field("gemma3.block_count") == 4
    assert field("gemma3.rope.freq_base") == c.rope_theta
    assert field("gemma3.rope.freq_base_swa") == c.rope_local_base_freq
    assert field("gemma3.attention.key_length") == field("gemma3.attention.value_length") == 8
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(field("tokenizer.ggml.tokens")) == 50257 and len(field("tokenizer.ggml.merges")) == 50000
    assert field("tokenizer.ggml.token_type")[50256] == gguf.TokenType.CONTROL
    assert field("tokenizer.ggml.add_bos_token") is False

    tensors = {t.name: t for t in reader.tensors}
    names = {gguf.TENSOR_NAMES[t].format(bid=n) + ".weight" for t in
             gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA3] for n in range(4)}  # llama.cpp's names
    assert set(tensors) == names - {"output.weight"}  # the output layer is the embedding
    weights = model.state_dict()
    stored = lambda name: np.asarray(tensors[name].data, np.float32)  # noqa: E731
    assert np.array_equal(stored("output_norm.weight"), 1 + weights["norm.weight"].numpy())
    assert np.array_equal(stored("blk.2.ffn_norm.weight"),
                          1 + weights["layers.2.pre_feedforward_layernorm.weight"].numpy())
    assert np.allclose(stored("blk.1.attn_q_norm.weight"),  # times sqrt(8 / 256)
                       (1 + weights["layers.1.self_attn.q_norm.weight"].numpy()) / math.sqrt(32))
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.slow  # gguf's reader takes 4 s over GPT-2's 50,257 tokens and 50,000 merges
def test_q8_0_stores_rows_that_are_no_whole_number_of_blocks_as_float16(tmp_path):
    model = tiny_model(vocab_size=50257, hidden_size=48)  # 48: Q8_0 takes blocks of 32
    to_gguf.export(model, gpt2_tokenizer(), tmp_path / "m.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of intermediate_size 64


# -----------------------------------------------------------------------------
# llama.cpp against gemma.py

BOUNDS = {"f32": 0.01, "f16": 0.01, "bf16": 0.1, "q8_0": 0.3}  # measured: 0.004, 0.0035, 0.035, 0.11


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16"])
def test_llama_cpp_gives_gemma_pys_logits_past_the_window_and_its_greedy_tokens(tmp_path, gguf_type):
    model = gpt2_model()
    to_gguf.export(model, gpt2_tokenizer(), tmp_path / "m.gguf", gguf_type)
    diff, tokens, greedy, behind = run_both(model, tmp_path / "m.gguf", gpt2_tokenizer().encode_ordinary(PROMPT))
    print(f"\n{gguf_type}: logits differ by {diff:.4f} at most; {agreement(tokens, greedy, behind)}")
    assert diff < BOUNDS[gguf_type] and len(set(greedy)) > 5  # a continuation, not a token repeated
    if gguf_type == "bf16":  # its activations too are rounded to 8 bits: llama.cpp may break a tie
        assert behind < BOUNDS[gguf_type]  # another way (here at token 17 of 30)
    else:
        assert tokens == greedy


def mistake_no_pattern(model):  # llama.cpp then takes every sixth layer as full: here none
    model.config = replace(model.config, layer_types=(SLIDING,) * 4)


def mistake_no_query_scaling(model):  # llama.cpp then scales queries by 1/sqrt(head_dim)
    model.config = replace(model.config, query_pre_attn_scalar=model.config.head_dim)


def mistake_norms_as_w(model):  # llama.cpp then multiplies by w, not 1 + w
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.sub_(1)


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [mistake_no_pattern, mistake_no_query_scaling, mistake_norms_as_w],
                         ids=lambda f: f.__name__.removeprefix("mistake_"))
def test_the_logit_check_catches_a_gguf_without_the_pattern_the_query_scaling_or_1_plus_w(
        tmp_path, mistake):
    model = gpt2_model()
    wrong = copy.deepcopy(model)
    mistake(wrong)  # what the file would hold if the writer made this mistake
    to_gguf.export(wrong, gpt2_tokenizer(), tmp_path / "m.gguf", "f32")
    diff, tokens, greedy, _ = run_both(model, tmp_path / "m.gguf", gpt2_tokenizer().encode_ordinary(PROMPT))
    print(f"\n{mistake.__name__}: logits differ by {diff:.2f}")
    assert diff > 30 * BOUNDS["f32"] and tokens != greedy


@pytest.mark.slow
def test_export_command_writes_a_q8_0_gguf_alone_that_llama_cpp_runs_with_nearly_the_same_logits(
        tmp_path):
    model = gpt2_model()
    save_run(model, tmp_path)
    cli("gemma.py", "export", "--out_dir", tmp_path, "--gguf", tmp_path / "m.gguf", "--gguf_type", "q8_0")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "m.gguf"]  # no Hugging Face directory
    types = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types == {"Q8_0", "F32"}  # matrices in 8 bits, norms in float32
    diff, tokens, greedy, behind = run_both(model, tmp_path / "m.gguf", gpt2_tokenizer().encode_ordinary(PROMPT))
    print(f"\nq8_0: logits differ by {diff:.4f} at most; {agreement(tokens, greedy, behind)}")
    assert diff < BOUNDS["q8_0"] and behind < BOUNDS["q8_0"]  # a different token: a near tie only


def save_run(model, out_dir):
    """A training checkpoint of model in out_dir, as train() writes it."""
    optimizers = {"adamw": torch.optim.AdamW(model.parameters())}
    configs = dict(model_config=asdict(model.config), train_config=asdict(TrainConfig()))
    state = checkpoint.capture(model, optimizers, torch.amp.GradScaler("cpu", enabled=False),
                               torch.Generator(), torch.device("cpu"), step=0, best_val_loss=math.inf,
                               evaluated=True, configs=configs)
    checkpoint.save(str(out_dir / "ckpt.pt"), state)


# -----------------------------------------------------------------------------
# Tokenizers


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_tiktokens_gpt2_with_end_of_text_as_text_unless_parsed_special(tmp_path):
    to_gguf.export(gpt2_model(), gpt2_tokenizer(), tmp_path / "m.gguf", "f16")
    with contextlib.closing(llama(tmp_path / "m.gguf")) as llm:
        ids = llm.tokenize(MIXED.encode(), add_bos=True, special=False)  # add_bos: if the file asks
        assert ids == gpt2_tokenizer().encode_ordinary(MIXED) and 50256 not in ids
        assert llm.detokenize(ids).decode() == MIXED
        assert llm.tokenize(b"<|endoftext|>", add_bos=False, special=True) == [50256]
        assert llm.token_bos() == llm.token_eos() == 50256


def byte_level_tokenizer(directory):
    """A byte-level BPE trained with the tokenizers library on generated stories, with GPT-2's
    <|endoftext|> and a template that puts <s> in front of a text, as an HFTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(generated_stories(200), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    write_json(os.path.join(directory, "tokenizer_config.json"),
               dict(bos_token="<s>", eos_token="<|endoftext|>"))
    return HFTokenizer(str(directory))


@pytest.mark.slow
def test_a_byte_level_bpe_of_the_tokenizers_library_tokenizes_and_runs_in_llama_cpp_as_in_gemma_py(
        tmp_path):
    tokenizer = byte_level_tokenizer(tmp_path / "tokenizer")
    assert tokenizer.prefix == [1] and tokenizer.eot_token == 0
    model = tiny_model(vocab_size=tokenizer.n_vocab + 3).eval()  # rows beyond the tokenizer's
    to_gguf.export(model, tokenizer, tmp_path / "m.gguf", "f32")
    with contextlib.closing(llama(tmp_path / "m.gguf")) as llm:
        for text in [MIXED, PROMPT]:
            ids = tokenizer.encode_ordinary(text)  # <s> in front, as the template puts it
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids
            assert llm.detokenize(ids[1:]).decode() == text
        assert llm.token_bos() == 1 and llm.token_eos() == 0
    story = "Once upon a time, Tom had a boat. Tom loved the boat very much. One day the"  # 21 tokens
    diff, tokens, greedy, behind = run_both(model, tmp_path / "m.gguf", tokenizer.encode_ordinary(story))
    print(f"\nbyte-level BPE, f32: logits differ by {diff:.4f} at most; {agreement(tokens, greedy, behind)}")
    assert diff < BOUNDS["f32"] and tokens == greedy


# -----------------------------------------------------------------------------
# What is refused, in one line


@pytest.mark.parametrize("layers,scalar,fits", [((SLIDING, SLIDING, FULL, SLIDING), 256, False),
                                                ((SLIDING,) * 5 + (FULL,), 8, True)],
                         ids=["other_shape", "gemma_3_270m_shape"])
def test_a_sentencepiece_style_tokenizer_is_refused_with_the_way_through_llama_cpps_converter(
        tmp_path, layers, scalar, fits):
    tiny_gemma_tokenizer().save(str(tmp_path / "tokenizer.json"))  # byte fallback, "▁" for spaces
    write_json(tmp_path / "tokenizer_config.json", dict(bos_token="<bos>", eos_token="<eos>"))
    model = tiny_model(vocab_size=103, num_hidden_layers=len(layers), layer_types=layers,
                       query_pre_attn_scalar=scalar)
    with pytest.raises(UserError, match="convert_hf_to_gguf.py") as error:
        to_gguf.export(model, HFTokenizer(str(tmp_path)), tmp_path / "m.gguf")
    assert ("will not be right" in str(error.value)) != fits
    assert not os.path.exists(tmp_path / "m.gguf")


def test_an_unknown_type_and_a_path_that_cannot_be_written_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="--gguf_type must be one of f32, f16, bf16, q8_0, not q4"):
        to_gguf.export(tiny_model(vocab_size=50257), gpt2_tokenizer(), tmp_path / "m.gguf", "q4")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="could not write .*file/m.gguf"):
        to_gguf.export(tiny_model(vocab_size=50257), gpt2_tokenizer(), tmp_path / "file" / "m.gguf")
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.slow
def test_a_full_disk_leaves_the_previous_gguf_as_it_was_and_stops_with_one_line(tmp_path):
    save_run(tiny_model(vocab_size=50257), tmp_path)
    path = tmp_path / "m.gguf"
    cli("gemma.py", "export", "--out_dir", tmp_path, "--gguf", path, "--gguf_type", "q8_0")
    before = path.read_bytes()
    limit = len(before) + 1000  # the float32 file is more than twice as large

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    result = subprocess.run([sys.executable, "gemma.py", "export", "--out_dir", tmp_path, "--gguf", path,
                             "--gguf_type", "f32"], cwd=HERE, capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"gemma.py: error: could not write {path} (the disk "
                                              "is full): free some space")
    assert path.read_bytes() == before and not os.path.exists(str(path) + ".tmp")
