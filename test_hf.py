"""
test_hf.py: exactness. gemma.py and transformers' Gemma 3 give the same logits, loss and gradients on
the same weights; Hugging Face checkpoints load (bfloat16, sharded, multimodal) and trained models
export so that transformers generates what gemma.py does.

    python -m pytest test_hf.py
    python -m pytest test_hf.py -k parity -s     # prints the figures the README quotes
"""
import json, math, os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

import checkpoint
import hf
from cli import UserError
from conftest import FULL, SLIDING, cli, random_transformers_model, tiny_gemma_tokenizer, tiny_model
from gemma import Gemma, GemmaConfig, TrainConfig
from tokenizer import gpt2_tokenizer, load_tokenizer

# Two shapes, so that a parity which holds for one only cannot pass: 4 query heads on 1 key/value head with window 4,
# and 6 query heads on 2 with window 3 over a length that is no multiple of it. Both are longer than the window, and
# scale scores by a query_pre_attn_scalar other than head_dim.
CASES = {
    "mqa_window4": (dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8, sliding_window=4, layer_types=(SLIDING, SLIDING, FULL, SLIDING),
                         query_pre_attn_scalar=32, rope_theta=1e6, rope_local_base_freq=1e4, max_position_embeddings=64),
                    (2, 24)),  # batch, length
    "gqa_window3": (dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=12, sliding_window=3, layer_types=(FULL, SLIDING, SLIDING),
                         query_pre_attn_scalar=20, rope_theta=5e5, rope_local_base_freq=1e3, max_position_embeddings=64),
                    (3, 19)),
}


def gemma_config(d):
    return GemmaConfig(**hf.gemma_settings(d))


def gemma_with_weights_of(hf_model, settings):
    model = Gemma(GemmaConfig(**settings))
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf_model.state_dict().items()
                           if k != "lm_head.weight"})  # strict: every other key is the same module's
    return model.eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# Parity: the same weights give the same numbers


@pytest.mark.parametrize("case", CASES)
def test_parity_logits_loss_and_every_gradient_equal_transformers_gemma3(case):
    settings, (B, T) = CASES[case]
    theirs = random_transformers_model(settings)
    ours = gemma_with_weights_of(theirs, settings)
    idx = torch.randint(0, settings["vocab_size"], (B, T))
    out = theirs(idx, labels=idx)  # transformers shifts the labels itself
    logits = ours(idx)[0]  # with targets, the loss is computed without keeping the logits
    loss = ours(idx, F.pad(idx[:, 1:], (0, 1), value=-100))[1]  # gemma.py takes them shifted; the last has none
    out.loss.backward()
    loss.backward()
    hf_params = dict(theirs.named_parameters())  # the tied lm_head is the embedding: one gradient, both uses
    grads = {name: max_diff(p.grad, hf_params["model." + name].grad) / hf_params["model." + name].grad.abs().max().item()
             for name, p in ours.named_parameters()}
    print(f"\n{case}: logits {max_diff(logits, out.logits):.1e}, loss {abs(loss.item() - out.loss.item()):.1e}, "
          f"gradients {max(grads.values()):.1e} relative ({max(grads, key=grads.get)})")  # README's table: pytest -s
    assert max_diff(logits, out.logits) < 1e-5
    assert abs(loss.item() - out.loss.item()) < 1e-6
    assert all(d <= 1e-5 for d in grads.values()), grads


@pytest.mark.parametrize("mistake", [dict(sliding_window=5), dict(sliding_window=3),
                                     dict(rope_theta=1e4, rope_local_base_freq=1e6)],
                         ids=["window_one_wider", "window_one_narrower", "rope_bases_swapped"])
def test_parity_check_catches_a_window_off_by_one_and_swapped_rope_bases(mistake):
    settings, (B, T) = CASES["mqa_window4"]
    theirs = random_transformers_model(settings)
    ours = gemma_with_weights_of(theirs, {**settings, **mistake})
    idx = torch.randint(0, settings["vocab_size"], (B, T))
    print(f"\n{mistake}: logits differ by {max_diff(ours(idx)[0], theirs(idx).logits):.3f}")
    assert max_diff(ours(idx)[0], theirs(idx).logits) > 1e-3


# -----------------------------------------------------------------------------
# Configurations

GEMMA_3_270M = {  # google/gemma-3-270m's config.json, as on the hub (written by transformers 4.55)
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
    "initializer_range": 0.02, "intermediate_size": 2048, "layer_types": list(GemmaConfig().layer_types),
    "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 18,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 512,
    "torch_dtype": "bfloat16", "transformers_version": "4.55.0.dev0", "use_bidirectional_attention": False,
    "use_cache": True, "vocab_size": 262144}


def test_gemma_3_270m_config_json_reads_as_the_default_config_with_gemma_vocab_in_every_spelling():
    expected = GemmaConfig(vocab_size=262144)
    assert gemma_config(GEMMA_3_270M) == expected
    no_list = {k: v for k, v in GEMMA_3_270M.items() if k != "layer_types"}  # the types from _sliding_window_pattern
    assert gemma_config(no_list) == expected
    v5 = {**no_list, "rope_parameters": Gemma3TextConfig(**GEMMA_3_270M).rope_parameters}  # transformers 5's spelling
    del v5["rope_theta"], v5["rope_local_base_freq"]
    assert gemma_config(v5) == expected
    multimodal = {"model_type": "gemma3", "text_config": GEMMA_3_270M}
    assert gemma_config(multimodal) == expected


@pytest.mark.parametrize("case", CASES)
def test_hf_config_gives_transformers_the_same_architecture_and_reads_back_unchanged(case):
    config = GemmaConfig(**CASES[case][0])
    assert gemma_config(hf.hf_config(config)) == config
    theirs = Gemma3TextConfig.from_dict(json.loads(json.dumps(hf.hf_config(config))))  # as from_pretrained reads it
    assert theirs.rope_parameters["full_attention"]["rope_theta"] == config.rope_theta
    assert theirs.rope_parameters["sliding_attention"]["rope_theta"] == config.rope_local_base_freq
    assert tuple(theirs.layer_types) == config.layer_types and theirs.sliding_window == config.sliding_window
    assert gemma_config(theirs.to_dict()) == config
    assert gemma_config(hf.hf_config(GemmaConfig())) == GemmaConfig()  # 270m's, with its 256.0 scalar


@pytest.mark.parametrize("change,message", [
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 8.0}), "rope scaling on the full layers"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "rope scaling on the sliding layers"),
    (dict(model_type="gemma2"), "model_type"),
    (dict(tie_word_embeddings=False), "lm_head"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_gemma_config_refuses_what_gemma_py_does_not_implement(change, message):
    with pytest.raises(ValueError, match=message):
        gemma_config({**GEMMA_3_270M, **change})


# -----------------------------------------------------------------------------
# Import: a Hugging Face checkpoint directory as a Gemma


def logits_of_transformers_reload(path, idx):
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return theirs(idx).logits


@pytest.mark.parametrize("shards", [False, True], ids=["one_file", "sharded"])
def test_a_bfloat16_transformers_checkpoint_loads_as_a_float32_gemma_with_the_same_logits(tmp_path, shards):
    settings, (B, T) = CASES["mqa_window4"]
    random_transformers_model(settings).to(torch.bfloat16).save_pretrained(  # as google/gemma-3-270m is stored
        tmp_path, safe_serialization=True, **dict(max_shard_size="40KB") if shards else {})
    files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert (len(files) > 1) == shards
    stored = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert not any("lm_head" in k for k in stored) and stored["model.norm.weight"].dtype == torch.bfloat16
    ours = Gemma.from_pretrained(str(tmp_path))
    assert not ours.training and all(p.dtype == torch.float32 for p in ours.parameters())
    idx = torch.randint(0, settings["vocab_size"], (B, T))
    with torch.no_grad():
        assert max_diff(ours(idx)[0], logits_of_transformers_reload(tmp_path, idx)) < 1e-5


def test_a_multimodal_checkpoint_loads_its_language_model_and_leaves_the_vision_tower(tmp_path):
    settings, (B, T) = CASES["gqa_window3"]
    theirs = random_transformers_model(settings)
    tensors = {"model.language_model." + k.removeprefix("model."): v for k, v in theirs.state_dict().items()
               if k != "lm_head.weight"}
    save_file({**tensors, "model.vision_tower.patch.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gemma3", "text_config": hf.hf_config(GemmaConfig(**settings))}, f)
    idx = torch.randint(0, settings["vocab_size"], (B, T))
    with torch.no_grad():
        assert max_diff(Gemma.from_pretrained(str(tmp_path))(idx)[0], theirs(idx).logits) < 1e-5


def test_load_pretrained_names_missing_and_unexpected_weights(tmp_path):
    settings = CASES["mqa_window4"][0]
    random_transformers_model(settings).save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.9.mlp.up_proj.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"missing \['layers.1.mlp.up_proj.weight'\], unexpected \['layers.9"):
        Gemma.from_pretrained(str(tmp_path))


def test_sample_with_init_from_a_checkpoint_and_its_tokenizer_continues_as_transformers_generate(tmp_path):
    tokenizer = tiny_gemma_tokenizer()
    settings = {**CASES["mqa_window4"][0], "vocab_size": tokenizer.get_vocab_size()}
    random_transformers_model(settings, bos_token_id=2, eos_token_id=1).to(torch.bfloat16).save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "GemmaTokenizer"}, f)
    ours = load_tokenizer(str(tmp_path))
    prompt = "Once upon a time there was a little girl named Lily. Café!"
    ids = AutoTokenizer.from_pretrained(tmp_path)(prompt).input_ids
    assert ours.encode_ordinary(prompt) == ids and ids[0] == 2 and ours.eot_token == 1
    assert b"".join(map(ours.decode_single_token_bytes, ids)).decode() == prompt  # é is two byte tokens

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8)[0].tolist()
    text = b"".join(ours.decode_single_token_bytes(t) for t in expected if t != 1).decode(errors="replace")
    result = cli("gemma.py", "sample", "--init_from", tmp_path, "--temperature", "0", "--max_new_tokens", "8",
                 "--dtype", "float32", prompt)  # float32 weights, as transformers has them here
    assert result.stdout == text + "\n" + "-" * 40 + "\n"


# -----------------------------------------------------------------------------
# Export: a model trained here as a Hugging Face directory


def test_an_exported_model_loads_in_transformers_with_gpt2_tokenizer_and_generates_the_same_tokens(tmp_path):
    model = tiny_model(vocab_size=50257).eval()  # random norms; GPT-2's vocabulary, the rest tiny
    with torch.no_grad():  # weights 3x their initial size: a greedy continuation that varies, not one token repeated
        for p in model.parameters():
            p.mul_(3 if p.dim() == 2 else 1)
    hf.export(model, gpt2_tokenizer(), tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert theirs.dtype == torch.float32 and theirs.model.embed_tokens.padding_idx is None
    assert theirs.config.rope_parameters["sliding_attention"]["rope_theta"] == model.config.rope_local_base_freq
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    prompt = gpt2_tokenizer().encode_ordinary("Once upon a time")
    assert tokenizer.encode("Once upon a time") == prompt and tokenizer.eos_token_id == 50256

    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        assert max_diff(model(idx)[0], theirs(idx).logits) < 1e-5
    prompt = torch.tensor([prompt])
    expected = theirs.generate(prompt, do_sample=False, max_new_tokens=20)  # 24 tokens: six times the window
    assert torch.equal(model.generate(prompt, 20, temperature=0, eot_token=50256), expected)


def test_to_transformers_gives_a_gemma3_for_causal_lm_with_the_same_weights_and_logits():
    model = tiny_model().eval()
    theirs = hf.to_transformers(model)
    assert isinstance(theirs, Gemma3ForCausalLM) and not theirs.training
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight and theirs.model.embed_tokens.padding_idx is None
    idx = torch.randint(0, 101, (2, 21))
    with torch.no_grad():
        assert max_diff(model(idx)[0], theirs(idx).logits) < 1e-5


def test_export_checkpoint_writes_the_model_of_a_training_checkpoint(tmp_path):
    model = tiny_model(vocab_size=50257)
    optimizers = {"adamw": torch.optim.AdamW(model.parameters())}
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    configs = dict(model_config=asdict(model.config), train_config=asdict(TrainConfig()))
    state = checkpoint.capture(model, optimizers, scaler, torch.Generator(), torch.device("cpu"), step=0,
                               best_val_loss=math.inf, evaluated=True, configs=configs)  # as train() writes it
    checkpoint.save(str(tmp_path / "ckpt.pt"), state)
    cli("gemma.py", "export", "--out_dir", tmp_path, "--hf_dir", tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "merges.txt",
                                                   "model.safetensors", "tokenizer_config.json", "vocab.json"]
    loaded = Gemma.from_pretrained(str(tmp_path / "hf"))
    assert loaded.config == model.config
    idx = torch.randint(0, 50257, (1, 12))
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])


GPT2_EXPORT = ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer_config.json",
               "vocab.json"]


def test_export_refuses_another_models_folder_and_replaces_an_earlier_export_with_nothing_of_it_left(tmp_path):
    model = tiny_model(vocab_size=50257)
    downloaded = tmp_path / "gemma-3-270m"  # what matters of a download of google/gemma-3-270m: its names
    downloaded.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "special_tokens_map.json",
                 "tokenizer_config.json", "generation_config.json"):
        (downloaded / name).write_text(json.dumps({"model_type": "gemma3_text"}) if name == "config.json" else "{}")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in downloaded.iterdir()}
    with pytest.raises(UserError, match=r"holds files that are not an export of gemma.py \(config.json, "):
        hf.export(model, gpt2_tokenizer(), downloaded)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in downloaded.iterdir()} == before

    # an export with a model's own tokenizer, then one with GPT-2's over it: nothing of the first is left
    (tmp_path / "own").mkdir()
    tiny_gemma_tokenizer().save(str(tmp_path / "own" / "tokenizer.json"))
    (tmp_path / "own" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    hf.export(tiny_model(vocab_size=103), load_tokenizer(str(tmp_path / "own")), tmp_path / "hf")
    assert "tokenizer.json" in os.listdir(tmp_path / "hf")
    hf.export(model, gpt2_tokenizer(), tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == GPT2_EXPORT  # no tokenizer.json of the first
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode("Once upon a time") == [7454, 2402, 257, 640]
    assert Gemma.from_pretrained(str(tmp_path / "hf")).config == model.config
    assert sorted(os.listdir(tmp_path)) == ["gemma-3-270m", "hf", "own"]  # no temporary folder left
    (tmp_path / "made").mkdir()  # and readable as any folder made here is, not private to its maker
    assert os.stat(tmp_path / "hf").st_mode == os.stat(tmp_path / "made").st_mode

    (tmp_path / "hf" / "notes.txt").write_text("the user's")  # an earlier export and something else
    with pytest.raises(UserError, match=r"not an export of gemma.py \(notes.txt\)"):
        hf.export(model, gpt2_tokenizer(), tmp_path / "hf")
    assert (tmp_path / "hf" / "notes.txt").read_text() == "the user's"
    (tmp_path / "file").write_text("a file")
    with pytest.raises(UserError, match="is a file, not a folder"):
        hf.export(model, gpt2_tokenizer(), tmp_path / "file")
