"""
test_gemma.py: the specification of gemma.py, as tests. CPU only, no network, seconds each.

    python -m pytest            # everything
    python -m pytest -k mask    # a subset

Each test's name states the property it checks, on a tiny configuration unless the property is about the real one.
"""
import json, math, os, subprocess, sys
from dataclasses import asdict

os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"  # before transformers loads: never the network

import numpy as np
import pyarrow
import pyarrow.parquet
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

import gemma
import hf
from gemma import (Gemma, GemmaConfig, KVCache, TrainConfig, attention, blocked_sliding_attention, make_optimizers,
                   optimizer_step, save_checkpoint)
from prepare import gpt2_tokenizer, tokenize_stories

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_config(**overrides):
    """Two sliding layers around one full layer, a window of 4 and two query heads per key/value head."""
    settings = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, sliding_window=4,
                    layer_types=("sliding_attention", "sliding_attention", "full_attention", "sliding_attention"),
                    max_position_embeddings=64)
    return GemmaConfig(**{**settings, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Gemma(tiny_config(**overrides))
    with torch.no_grad():  # norms start at zero; random ones exercise the (1 + w)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    return model


def run(*args, cwd=HERE, check=True):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


# -----------------------------------------------------------------------------
# The architecture


def test_default_config_is_gemma3_270m_with_gpt2_vocab_and_has_132490496_parameters():
    c = GemmaConfig()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (18, 640, 4, 1, 256)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    with torch.device("meta"):
        model = Gemma(c)
    assert sum(p.numel() for p in model.parameters()) == 132_490_496
    assert all(not isinstance(m, torch.nn.Linear) or m.bias is None for m in model.modules())


def test_every_block_keeps_the_residual_shape_and_the_model_returns_logits_for_every_position():
    model = tiny_model()
    idx = torch.randint(0, 101, (3, 11))
    shapes = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    logits, loss = model(idx)
    assert shapes == [(3, 11, 32)] * 4 and logits.shape == (3, 11, 101) and loss is None
    _, loss = model(idx, idx)
    assert loss.shape == ()


def test_output_layer_is_tied_to_the_embedding():
    model = tiny_model()
    assert "lm_head.weight" not in model.state_dict()
    with torch.no_grad():
        model.embed_tokens.weight[7] += 1.0  # moving one embedding row moves that token's logit
    idx = torch.randint(0, 101, (1, 5))
    before = tiny_model()(idx)[0]
    assert (model(idx)[0] - before)[..., 7].abs().min() > 0


def test_norm_scales_by_one_plus_weight_in_float32():
    from gemma import RMSNorm
    norm = RMSNorm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6)
    assert torch.allclose(norm(x), x / rms)  # weight zero: a scale of one
    norm.weight.data.fill_(0.5)
    assert torch.allclose(norm(x), 1.5 * x / rms)
    assert norm(x.half()).dtype == torch.float16


def outputs_with_key_value_changed_at(layer, x, j):
    """The attention layer's output before and after the keys and values (not the query) at position j change."""
    attn = layer.self_attn
    before = attn(x, *rotations(layer, x.size(1)))
    bump = torch.zeros(x.size(1), 1)
    bump[j] = 1.0
    hooks = [proj.register_forward_hook(lambda m, i, o: o + bump) for proj in (attn.k_proj, attn.v_proj)]
    after = attn(x, *rotations(layer, x.size(1)))
    for h in hooks:
        h.remove()
    return (after - before).abs().amax(-1)[0]  # (T,): how much each query's output moved


def rotations(layer, T, model=None):
    from gemma import RotaryEmbedding
    base = 1e6 if layer.layer_type == "full_attention" else 1e4
    return RotaryEmbedding(layer.self_attn.head_dim, base)(torch.arange(T))


@pytest.mark.parametrize("j", [0, 3, 6, 11])
def test_sliding_layer_query_i_sees_exactly_keys_j_with_i_minus_j_below_the_window(j):
    model, T = tiny_model(), 12
    x = torch.randn(1, T, 32)
    moved = outputs_with_key_value_changed_at(model.layers[0], x, j) > 0
    assert moved.tolist() == [j <= i < j + 4 for i in range(T)]  # window 4: queries j, j+1, j+2, j+3


@pytest.mark.parametrize("j", [0, 3, 6, 11])
def test_full_layer_query_i_sees_every_key_j_up_to_i(j):
    model, T = tiny_model(), 12
    x = torch.randn(1, T, 32)
    moved = outputs_with_key_value_changed_at(model.layers[2], x, j) > 0
    assert moved.tolist() == [i >= j for i in range(T)]


def test_changing_token_t_changes_no_logits_before_t():
    model, T = tiny_model(), 16
    idx = torch.randint(0, 101, (2, T))
    logits = model(idx)[0]
    for t in (0, 5, 9, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 101
        diff = (model(changed)[0] - logits).abs().amax(-1)
        assert (diff[:, :t] == 0).all() and (diff[:, t] > 0).all()


def test_loss_at_initialisation_is_close_to_ln_vocab():
    torch.manual_seed(0)
    model = Gemma(tiny_config(vocab_size=2000, hidden_size=64))
    idx = torch.randint(0, 2000, (4, 32))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(2000)) < 0.3


# -----------------------------------------------------------------------------
# Attention kernels and generation


def reference_attention(q, k, v, window, scale):
    """The plain definition: a dense T x T mask, allowed iff 0 <= i - j < window."""
    i = torch.arange(q.size(2))
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < (window or q.size(2)))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("T,window,heads,kv_heads", [(10, 4, 4, 1), (24, 8, 4, 2), (13, 5, 3, 1), (7, 7, 2, 1), (40, 3, 2, 2)])
def test_blocked_sliding_attention_equals_the_dense_mask(T, window, heads, kv_heads):
    torch.manual_seed(T)
    q, k, v = torch.randn(2, heads, T, 16), torch.randn(2, kv_heads, T, 16), torch.randn(2, kv_heads, T, 16)
    expected = reference_attention(q, k, v, window, 0.25)
    assert torch.allclose(blocked_sliding_attention(q, k, v, window, 0.25), expected, atol=1e-6)
    assert torch.allclose(attention(q, k, v, window, 0.25), expected, atol=1e-6)
    assert torch.allclose(attention(q, k, v, None, 0.25), reference_attention(q, k, v, None, 0.25), atol=1e-6)


def test_flex_attention_path_equals_the_dense_mask():
    from gemma import sliding_block_mask
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
    with torch.no_grad():  # FlexAttention has no backward on the CPU; CUDA training uses it compiled
        out = torch.compile(attention)(q, k, v, 48, 0.25, block_mask=sliding_block_mask(256, 48, q.device))
    assert torch.allclose(out, reference_attention(q, k, v, 48, 0.25), atol=1e-5)


def test_compiled_model_uses_flex_attention_with_one_cached_block_mask_per_length():
    from gemma import sliding_block_mask
    cache = sliding_block_mask.__wrapped__  # the lru_cache under torch.compiler.disable
    model = tiny_model(sliding_window=48).eval()
    idx = torch.randint(0, 101, (2, 200))  # longer than the window: the sliding layers slide
    compiled = torch.compile(model)
    cache.cache_clear()
    with torch.no_grad():
        expected = model(idx)[0]  # eager: the blocked fallback, no block mask
        assert cache.cache_info().misses == 0
        outputs = [compiled(idx)[0] for _ in range(3)]
    # built once, then looked up on every call (inside the graph, torch.compile would ignore the cache and rebuild it)
    assert cache.cache_info().misses == 1 and cache.cache_info().hits == 2
    assert all(torch.allclose(out, expected, atol=1e-5) for out in outputs)


def test_gemma_py_stays_under_800_lines():  # the core issue's ceiling, comments included
    assert len(open(gemma.__file__).read().splitlines()) < 800


def test_compiled_one_token_steps_generate_what_the_eager_model_does():
    model = tiny_model()
    prompt = torch.randint(0, 101, (2, 9))  # 9 + 20 tokens: the ring buffers of the sliding layers wrap around
    eager = model.generate(prompt, 20, temperature=0)
    assert torch.equal(model.generate(prompt, 20, temperature=0, compile=True), eager)


def test_sliding_layer_key_value_cache_is_a_ring_of_the_last_window_positions():
    cache = KVCache(4)
    for pos in range(7):
        k = torch.full((1, 1, 1, 2), float(pos))
        keys, _ = cache.update(pos, k, k)
    assert sorted(keys[0, 0, :, 0].tolist()) == [3.0, 4.0, 5.0, 6.0]


def test_greedy_generation_with_the_cache_equals_generation_without_it_well_past_the_window():
    model = tiny_model()
    prompt = torch.randint(0, 101, (2, 9))  # 9 + 30 tokens: ten times the window of 4
    with_cache = model.generate(prompt, 30, temperature=0, use_cache=True)
    without = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 39) and torch.equal(with_cache, without)


def test_sampling_is_reproducible_by_seed_and_stops_at_end_of_text():
    model = tiny_model()
    prompt = torch.randint(0, 101, (1, 3))
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, seed=7)
    assert torch.equal(a, model.generate(prompt, 20, temperature=1.0, top_k=10, seed=7))
    assert not torch.equal(a, model.generate(prompt, 20, temperature=1.0, top_k=10, seed=8))
    eot = a[0, 5].item()  # pretend the 3rd generated token is end-of-text: generation stops right there
    stopped = model.generate(prompt, 20, temperature=1.0, top_k=10, seed=7, eot_token=eot)
    first = (a[0, 3:] == eot).nonzero()[0].item() + 3
    assert stopped.shape[1] == first + 1 and stopped[0, -1] == eot


# -----------------------------------------------------------------------------
# Training


def test_a_tiny_model_overfits_one_batch():
    model = tiny_model()
    c = TrainConfig(lr=3e-3, weight_decay=0.0)
    optimizers = make_optimizers(model, c, fused=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1)
    idx = torch.randint(0, 101, (4, 17))
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer_step(model, optimizers, scaler, 1.0)
    assert loss.item() < 0.05


def test_weight_decay_applies_to_weight_matrices_and_never_to_norms():
    model = tiny_model()
    for optimizer_name in ("adamw", "muon"):
        optimizers = make_optimizers(model, TrainConfig(optimizer=optimizer_name), fused=False)
        groups = [g for opt in optimizers for g in opt.param_groups]
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        for g in groups:
            assert all(p.dim() >= 2 for p in g["params"]) == (g["weight_decay"] > 0)


def test_float16_with_gradient_scaler_learns_on_the_cpu_and_skips_a_step_with_infinite_gradients():
    model = tiny_model()
    optimizers = make_optimizers(model, TrainConfig(lr=3e-3), fused=False)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 10)
    idx = torch.randint(0, 101, (4, 17))
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.float16):
            logits, loss = model(idx[:, :-1], idx[:, 1:])
        assert logits.dtype == torch.float16 and loss.dtype == torch.float32
        scaler.scale(loss).backward()
        optimizer_step(model, optimizers, scaler, 1.0)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    scale = scaler.get_scale()
    with torch.autocast("cpu", dtype=torch.float16):
        _, loss = model(idx[:, :-1], idx[:, 1:])
    scaler.scale(loss).backward()
    model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("inf")
    optimizer_step(model, optimizers, scaler, 1.0)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # nothing applied
    assert scaler.get_scale() == scale / 2  # and the scale backs off


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    from gemma import lr_factor
    c = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.55) and lr_factor(110, c) == pytest.approx(0.1)
    assert all(lr_factor(s, c) >= lr_factor(s + 1, c) for s in range(10, 120))


# -----------------------------------------------------------------------------
# The command line, end to end


def write_stories(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    names, things = ["Lily", "Tom", "Mia", "Ben"], ["ball", "cat", "tree", "boat", "cake"]
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.choice(names), rng.choice(things)
            f.write(json.dumps({"text": f"Once upon a time, {a} had a {b}. {a} loved the {b} very much. "
                                        f"One day the {b} was lost, and {a} was sad. Then {a} found it!"}) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_stories(d / "train.jsonl", 200)
    write_stories(d / "validation.jsonl", 20, seed=1)
    run("prepare.py", "--train_files", str(d / "train.jsonl"), "--validation_files", str(d / "validation.jsonl"),
        "--data_dir", str(d))
    return d


FAST = ["--preset", "small", "--block_size", "64", "--batch_size", "4", "--total_batch_size", "512",
        "--eval_windows", "4", "--log_interval", "1", "--warmup_steps", "2"]


def test_prepare_train_and_sample_from_the_command_line(data_dir, tmp_path):
    out = tmp_path / "out"
    result = run("gemma.py", "train", *FAST, "--max_steps", "6", "--eval_interval", "3",
                 "--data_dir", str(data_dir), "--out_dir", str(out))
    assert "step 6/6" in result.stdout and "validation loss" in result.stdout
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3 and val[-1] < val[0]  # steps 0, 3, 6
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["model_config"]["hidden_size"] == 128
    result = run("gemma.py", "sample", "--out_dir", str(out), "--max_new_tokens", "12", "--num_samples", "2",
                 "--seed", "3", "Once upon a time")
    stories = result.stdout.split("-" * 40)
    assert len(stories) == 3 and all(s.strip().startswith("Once upon a time") for s in stories[:2])


def test_help_lists_every_option_with_its_default_and_an_unknown_flag_is_an_error():
    result = run("gemma.py", "train", "--help")
    for f in ("--block_size", "--total_batch_size", "--dtype", "--hidden_size", "--sliding_window", "--optimizer"):
        assert f in result.stdout
    assert "(default: 1024)" in result.stdout
    result = run("gemma.py", "train", "--no_such_flag", "3", check=False)
    assert result.returncode != 0 and "unrecognized arguments: --no_such_flag" in result.stderr


# -----------------------------------------------------------------------------
# Training that survives: resume, crashes, bad input, several processes

TINY_FLAGS = FAST + ["--hidden_size", "64", "--intermediate_size", "128", "--head_dim", "16", "--sliding_window", "16"]


def train_cli(data_dir, out, *flags, check=True, env=None):
    return subprocess.run([sys.executable, "gemma.py", "train", *TINY_FLAGS, "--data_dir", str(data_dir),
                           "--out_dir", str(out), *flags], cwd=HERE, capture_output=True, text=True, timeout=300,
                          env=env, check=False) if not check else run("gemma.py", "train", *TINY_FLAGS,
                                                                       "--data_dir", str(data_dir), "--out_dir", str(out), *flags)


def losses(out):
    """step -> train loss, and step -> validation loss, as logged in metrics.jsonl."""
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return ({r["step"]: r["train_loss"] for r in rows if "train_loss" in r},
            {r["step"]: r["val_loss"] for r in rows if "val_loss" in r})


def start_training(data_dir, out, *flags):
    return subprocess.Popen([sys.executable, "gemma.py", "train", *TINY_FLAGS, "--data_dir", str(data_dir),
                             "--out_dir", str(out), *flags], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_step(out, step, proc, timeout=120):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(
                json.loads(line)["step"] >= step for line in open(out / "metrics.jsonl") if line.strip()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


def test_a_run_interrupted_with_ctrl_c_and_resumed_gives_bit_identical_losses(data_dir, tmp_path):
    import signal
    steps = ["--max_steps", "10", "--eval_interval", "4"]
    train_cli(data_dir, tmp_path / "whole", *steps)
    proc = start_training(data_dir, tmp_path / "split", *steps)
    wait_for_step(tmp_path / "split", 3, proc)
    proc.send_signal(signal.SIGINT)  # finishes the step under way, saves, exits
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted: saved step" in err
    stopped_at = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 10
    train_cli(data_dir, tmp_path / "split", "--resume")  # the flags come back from the checkpoint
    whole_train, whole_val = losses(tmp_path / "whole")
    split_train, split_val = losses(tmp_path / "split")
    assert split_train == whole_train and split_val == whole_val  # every step, bit for bit
    assert sorted(split_train) == list(range(1, 11))


def test_resume_may_change_the_step_count_but_refuses_another_architecture_naming_the_fields(data_dir, tmp_path):
    out = tmp_path / "out"
    train_cli(data_dir, out, "--max_steps", "2", "--eval_interval", "2")
    before = (out / "ckpt.pt").read_bytes()
    result = train_cli(data_dir, out, "--resume", "--hidden_size", "96", "--num_hidden_layers", "3", check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "hidden_size" in result.stderr and "num_hidden_layers" in result.stderr and "layer_types" in result.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    result = train_cli(data_dir, out, "--resume", "--max_steps", "4")
    assert "resuming at step 2" in result.stdout and "step 4/4" in result.stdout


def test_checkpoints_hold_only_tensors_and_plain_values(data_dir, tmp_path):
    train_cli(data_dir, tmp_path, "--max_steps", "1", "--optimizer", "muon", "--dtype", "float16")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # refuses anything else
    assert set(ckpt) == {"model", "optimizers", "scaler", "model_config", "train_config", "step", "best_val_loss", "rng"}
    assert len(ckpt["optimizers"]) == 2 and ckpt["scaler"]["scale"] > 0 and not any(k.startswith("_orig_mod") for k in ckpt["model"])


def test_killing_training_at_random_moments_always_leaves_a_checkpoint_that_loads_and_resumes(data_dir, tmp_path):
    import random, signal, time
    rng, out = random.Random(0), tmp_path / "out"
    flags = ["--max_steps", "400", "--eval_interval", "1", "--eval_windows", "1"]  # a save every step
    proc = start_training(data_dir, out, *flags)
    wait_for_step(out, 1, proc)
    for kill in range(6):
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = torch.load(out / "ckpt.pt", weights_only=True)["step"]  # whole, whatever the kill interrupted
        proc = start_training(data_dir, out, *flags, "--resume")
        wait_for_step(out, step + 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_loss_that_stops_being_finite_in_float32_stops_training_and_keeps_the_last_checkpoint(data_dir, tmp_path):
    out = tmp_path / "out"
    train_cli(data_dir, out, "--max_steps", "1", "--eval_interval", "1")
    result = train_cli(data_dir, out, "--resume", "--max_steps", "30", "--lr", "1e12", "--grad_clip", "0",
                       "--warmup_steps", "0", check=False)
    assert result.returncode == 1 and "the loss became" in result.stderr and "Traceback" not in result.stderr
    last = torch.load(out / "ckpt.pt", weights_only=True)  # the last checkpoint written before the loss broke
    assert all(t.isfinite().all() for t in last["model"].values())


def write_tokens(path, tokens):
    np.asarray(tokens, dtype=np.uint16).tofile(path)


@pytest.mark.parametrize("case,expected", [
    ("missing_train", "no "), ("odd_size", "odd number of bytes"), ("too_short", "fewer than one block"),
    ("beyond_vocab", "beyond the vocabulary"), ("block_zero", "--block_size must be positive"),
    ("batch_not_dividing", "is not a multiple"), ("unknown_preset", "--preset must be one of"),
    ("resume_truncated", "damaged or truncated"), ("resume_nothing", "no checkpoint")])
def test_bad_training_input_ends_in_one_clear_line_and_a_nonzero_exit(case, expected, data_dir, tmp_path):
    d, out = tmp_path / "data", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    for split in ("train", "validation"):
        (d / f"{split}.bin").write_bytes((data_dir / f"{split}.bin").read_bytes())
    flags = []
    if case == "missing_train":
        (d / "train.bin").unlink()
    elif case == "odd_size":
        (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-1])
    elif case == "too_short":
        write_tokens(d / "validation.bin", range(10))
    elif case == "beyond_vocab":
        write_tokens(d / "train.bin", [1, 2, 60000] * 100)
    elif case == "block_zero":
        flags = ["--block_size", "0"]
    elif case == "batch_not_dividing":
        flags = ["--total_batch_size", "1000"]
    elif case == "unknown_preset":
        flags = ["--preset", "huge"]
    elif case == "resume_truncated":
        train_cli(d, out, "--max_steps", "1")
        data = (out / "ckpt.pt").read_bytes()
        (out / "ckpt.pt").write_bytes(data[:len(data) // 2])
        flags = ["--resume"]
    elif case == "resume_nothing":
        flags = ["--resume"]
    files = {p: p.read_bytes() for p in list(d.iterdir()) + list(out.iterdir())}
    result = train_cli(d, out, *flags, check=False)
    assert result.returncode == 1 and result.stderr.startswith("gemma.py: error:") and expected in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in list(d.iterdir()) + list(out.iterdir())} == files  # nothing overwritten


def test_bad_sampling_input_ends_in_one_clear_line_and_a_long_prompt_is_cropped_with_a_notice(data_dir, tmp_path):
    result = run("gemma.py", "sample", "--out_dir", str(tmp_path / "nothing"), check=False)
    assert result.returncode == 1 and "no checkpoint" in result.stderr and result.stderr.count("\n") == 1
    out = tmp_path / "out"
    train_cli(data_dir, out, "--max_steps", "1")
    result = run("gemma.py", "sample", "--out_dir", str(out), "--temperature", "-1", check=False)
    assert result.returncode == 1 and "--temperature" in result.stderr and result.stderr.count("\n") == 1
    result = run("gemma.py", "sample", "--out_dir", str(out), "--max_new_tokens", "64", check=False)
    assert result.returncode == 1 and "context of 64" in result.stderr
    long_prompt = "Once upon a time " * 40  # 160 tokens, the context is 64
    result = run("gemma.py", "sample", "--out_dir", str(out), "--max_new_tokens", "10", long_prompt)
    assert "keeping its last 54" in result.stderr and result.stdout.count("-" * 40) == 1


def test_two_processes_give_the_losses_of_one_process_with_twice_the_accumulation(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ["--max_steps", "3", "--eval_interval", "3", "--total_batch_size", "512", "--batch_size", "4"]
    one = train_cli(data_dir, tmp_path / "one", *flags, check=False, env=env)  # 2 micro-steps of 4 x 64
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "gemma.py", "train", *TINY_FLAGS, "--data_dir", str(data_dir), "--out_dir",
                          str(tmp_path / "two"), *flags], cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    assert "2 process(es) x 1 micro-steps" in two.stdout and two.stdout.count("step 3/3") == 1  # rank 0 alone logs
    (train1, val1), (train2, val2) = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert train1.keys() == train2.keys() == {1, 2, 3}
    assert all(abs(train1[s] - train2[s]) < 1e-5 for s in train1) and abs(val1[3] - val2[3]) < 1e-5


# -----------------------------------------------------------------------------
# Learning you can see


def test_training_logs_metrics_that_plot_draws_as_a_png(data_dir, tmp_path):
    out = tmp_path / "run"
    train_cli(data_dir, out, "--max_steps", "4", "--eval_interval", "2")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {"step", "tokens", "train_loss", "lr", "tokens_per_s"} <= set(rows[1])
    assert {"step", "tokens", "val_loss", "val_perplexity"} <= set(rows[0])
    result = run("plot.py", str(out), "-o", str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "final validation loss" in result.stdout

# -----------------------------------------------------------------------------
# Data preparation: prepare.py

EOT = 50256
TRAIN_STORIES = [
    "Once upon a time, there was a little cat named Tom.\n\nTom liked to nap in the sun.",
    'Lily said, "Look! A café, très jolie 🌸" and smiled. 猫 ☀',  # unicode
    "",  # an empty story is skipped
    "This story mentions <|endoftext|> but it is plain text, not the special token.",
    "  Spaces around a story are kept.  ",
    "Line one.\nLine two ends with a newline.\n",
]
VALIDATION_STORIES = ["The dog ran to the park.", "Mom baked a big cake.\n\nThe end."]


def expected_tokens(stories):
    """Each non-empty story encoded as ordinary text, with the end-of-text id between stories."""
    enc = gpt2_tokenizer()
    tokens = []
    for story in (s for s in stories if s):
        tokens += ([EOT] if tokens else []) + enc.encode_ordinary(story)
    return np.array(tokens, dtype=np.uint16)


def write_file(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def write_jsonl(path, stories):
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")
    return path


def write_txt(path, stories):
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n", encoding="utf-8")
    return path


def write_parquet(path, stories, column="text"):
    pyarrow.parquet.write_table(pyarrow.table({"id": list(range(len(stories))), column: stories}), path)
    return path


def run_prepare(*args):
    return subprocess.run([sys.executable, "prepare.py", *map(str, args)], cwd=HERE,
                          capture_output=True, text=True, timeout=120)


def prepare_ok(tmp_path, train_file, data_dir):
    validation_file = write_jsonl(tmp_path / "validation.jsonl", VALIDATION_STORIES)
    result = run_prepare("--train_files", train_file, "--validation_files", validation_file,
                         "--data_dir", data_dir)
    assert result.returncode == 0, result.stderr
    return data_dir


def test_bin_files_hold_each_story_as_ordinary_tokens_with_end_of_text_between(tmp_path):
    data_dir = prepare_ok(tmp_path, write_jsonl(tmp_path / "train.jsonl", TRAIN_STORIES), tmp_path / "data")
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    validation = np.fromfile(data_dir / "validation.bin", dtype=np.uint16)
    np.testing.assert_array_equal(train, expected_tokens(TRAIN_STORIES))
    np.testing.assert_array_equal(validation, expected_tokens(VALIDATION_STORIES))
    # Decoded, the file is the stories joined by <|endoftext|>: nothing added, nothing lost.
    assert gpt2_tokenizer().decode(train.tolist()) == "<|endoftext|>".join(s for s in TRAIN_STORIES if s)
    assert (train == EOT).sum() == 4  # 5 non-empty stories; the literal "<|endoftext|>" is not EOT
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta == {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": EOT, "dtype": "uint16",
                    "train": {"tokens": len(train), "stories": 5},
                    "validation": {"tokens": len(validation), "stories": 2}}


def test_txt_and_parquet_files_give_the_same_train_bin_as_jsonl(tmp_path):
    writers = {"jsonl": write_jsonl, "txt": write_txt, "parquet": write_parquet}
    train_bins = {}
    for extension, write in writers.items():
        train_file = write(tmp_path / f"train.{extension}", TRAIN_STORIES)
        data_dir = prepare_ok(tmp_path, train_file, tmp_path / extension)
        train_bins[extension] = (data_dir / "train.bin").read_bytes()
    assert train_bins["txt"] == train_bins["jsonl"] == train_bins["parquet"]
    assert train_bins["jsonl"] == expected_tokens(TRAIN_STORIES).tobytes()


def test_several_files_are_one_stream_of_stories(tmp_path):
    first = write_jsonl(tmp_path / "part1.jsonl", TRAIN_STORIES[:3])
    second = write_txt(tmp_path / "part2.txt", TRAIN_STORIES[3:])
    validation = write_jsonl(tmp_path / "validation.jsonl", VALIDATION_STORIES)
    result = run_prepare("--train_files", first, second, "--validation_files", validation,
                         "--data_dir", tmp_path)
    assert result.returncode == 0, result.stderr
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    np.testing.assert_array_equal(train, expected_tokens(TRAIN_STORIES))


@pytest.mark.parametrize("batch_size", [1, 2, 3, 1000])
def test_tokenize_stories_output_does_not_depend_on_batch_size(tmp_path, batch_size):
    out_path = tmp_path / "out.bin"
    n_tokens, n_stories = tokenize_stories(iter(TRAIN_STORIES), out_path, gpt2_tokenizer(),
                                           num_threads=2, batch_size=batch_size)
    np.testing.assert_array_equal(np.fromfile(out_path, dtype=np.uint16), expected_tokens(TRAIN_STORIES))
    assert (n_tokens, n_stories) == (len(expected_tokens(TRAIN_STORIES)), 5)


def test_gpt2_tokenizer_has_gpt2_ids():
    enc = gpt2_tokenizer()
    assert (enc.n_vocab, enc.eot_token) == (50257, EOT)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" Once upon a time") == [4874, 2402, 257, 640]
    assert enc.encode_ordinary("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert gpt2_tokenizer() is enc  # built once, then cached


def test_importing_prepare_is_cheap_and_loads_no_dataset_library():
    code = "import sys, prepare; print('datasets' in sys.modules, 'pyarrow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_success_leaves_no_tmp_file_and_replaces_the_old_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.bin").write_bytes(b"old")
    data_dir = prepare_ok(tmp_path, write_jsonl(tmp_path / "train.jsonl", TRAIN_STORIES), tmp_path / "data")
    assert sorted(os.listdir(data_dir)) == ["meta.json", "train.bin", "validation.bin"]
    assert (data_dir / "train.bin").read_bytes() == expected_tokens(TRAIN_STORIES).tobytes()


BAD_TRAIN_FILES = {
    "missing file": lambda tmp_path: tmp_path / "no_such_file.jsonl",
    "empty file": lambda tmp_path: write_jsonl(tmp_path / "empty.jsonl", []),
    "only empty stories": lambda tmp_path: write_txt(tmp_path / "blank.txt", ["", ""]),
    "objects without text": lambda tmp_path: write_file(tmp_path / "bad.jsonl", '{"story": "Once"}\n'),
    "parquet without a text column": lambda tmp_path: write_parquet(tmp_path / "x.parquet", ["Once"], "story"),
    "not JSON": lambda tmp_path: write_file(tmp_path / "bad.jsonl", "Once upon a time\n"),
    "not UTF-8": lambda tmp_path: write_file(tmp_path / "bad.txt", b"Once upon a time \xff\n"),
    "unknown extension": lambda tmp_path: write_file(tmp_path / "stories.csv", "Once upon a time\n"),
}


@pytest.mark.parametrize("case", BAD_TRAIN_FILES)
def test_bad_input_is_one_error_line_and_leaves_existing_files_untouched(tmp_path, case):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.bin").write_bytes(b"a good train.bin from an earlier run")
    validation_file = write_jsonl(tmp_path / "validation.jsonl", VALIDATION_STORIES)
    result = run_prepare("--train_files", BAD_TRAIN_FILES[case](tmp_path),
                         "--validation_files", validation_file, "--data_dir", data_dir)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and error_lines[0].startswith("prepare.py: error: "), result.stderr
    assert result.stderr.splitlines()[-1] == error_lines[0]
    # Nothing written, nothing half-written: the validation split, already done, was thrown away too.
    assert os.listdir(data_dir) == ["train.bin"]
    assert (data_dir / "train.bin").read_bytes() == b"a good train.bin from an earlier run"


def test_without_hub_or_local_files_one_line_says_to_pass_local_files(tmp_path):
    # Offline mode: fail at once instead of retrying. An empty cache: no earlier download to fall back on.
    cache = str(tmp_path / "hf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": cache,
           "HF_DATASETS_CACHE": cache, "HF_HUB_CACHE": cache}
    result = subprocess.run([sys.executable, "prepare.py", "--data_dir", tmp_path / "data"], cwd=HERE,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.splitlines()[-1]
    assert last_line.startswith("prepare.py: error: could not load roneneldan/TinyStories")
    assert "--train_files" in last_line and "--validation_files" in last_line
    assert not list(tmp_path.glob("data/*"))


@pytest.mark.parametrize("flag", ["--bogus", "--train_file"])  # not even a prefix of --train_files
def test_unknown_flag_is_an_error(flag):
    result = run_prepare(flag, "x.jsonl")
    assert result.returncode != 0 and "unrecognized arguments" in result.stderr

# -----------------------------------------------------------------------------
# Exactness: parity with transformers' Gemma 3, import and export (hf.py)

SLIDING, FULL = "sliding_attention", "full_attention"
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


def random_transformers_model(settings, seed=0, **overrides):
    """A transformers Gemma 3 with random weights, norms included (they start at zero), float32, eval mode."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(**{**settings, "layer_types": list(settings["layer_types"]), **overrides},
                              pad_token_id=None, attn_implementation="eager")
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    return model


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
    logits, loss = ours(idx, F.pad(idx[:, 1:], (0, 1), value=-100))  # gemma.py takes them shifted; the last has none
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
    assert hf.gemma_config(GEMMA_3_270M) == expected
    no_list = {k: v for k, v in GEMMA_3_270M.items() if k != "layer_types"}  # the types from _sliding_window_pattern
    assert hf.gemma_config(no_list) == expected
    v5 = {**no_list, "rope_parameters": Gemma3TextConfig(**GEMMA_3_270M).rope_parameters}  # transformers 5's spelling
    del v5["rope_theta"], v5["rope_local_base_freq"]
    assert hf.gemma_config(v5) == expected
    multimodal = {"model_type": "gemma3", "text_config": GEMMA_3_270M}
    assert hf.gemma_config(multimodal) == expected


@pytest.mark.parametrize("case", CASES)
def test_hf_config_gives_transformers_the_same_architecture_and_reads_back_unchanged(case):
    config = GemmaConfig(**CASES[case][0])
    assert hf.gemma_config(hf.hf_config(config)) == config
    theirs = Gemma3TextConfig.from_dict(json.loads(json.dumps(hf.hf_config(config))))  # as from_pretrained reads it
    assert theirs.rope_parameters["full_attention"]["rope_theta"] == config.rope_theta
    assert theirs.rope_parameters["sliding_attention"]["rope_theta"] == config.rope_local_base_freq
    assert tuple(theirs.layer_types) == config.layer_types and theirs.sliding_window == config.sliding_window
    assert hf.gemma_config(theirs.to_dict()) == config
    assert hf.gemma_config(hf.hf_config(GemmaConfig())) == GemmaConfig()  # 270m's, with its 256.0 scalar


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
        hf.gemma_config({**GEMMA_3_270M, **change})


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
        assert max_diff(hf.load_pretrained(str(tmp_path))(idx)[0], theirs(idx).logits) < 1e-5


def test_load_pretrained_names_missing_and_unexpected_weights(tmp_path):
    settings = CASES["mqa_window4"][0]
    random_transformers_model(settings).save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.9.mlp.up_proj.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.up_proj.weight'\], unexpected \['layers.9"):
        hf.load_pretrained(str(tmp_path))


def tiny_gemma_tokenizer():
    """A tokenizer built as Gemma's is (BPE over text whose spaces are "▁", byte fallback, <bos> in front), over 103
    pieces: letters, a few words, and the two bytes of "é"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    merges = {}
    for word in ["Once", "upon", "a", "time", "there", "was", "little", "girl", "named", "Lily"]:
        for i in range(len(word)):
            merges["▁" + word[:i], word[i]] = None
    letters = sorted(set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,!?'"))
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "<0xC3>", "<0xA9>", "▁", *letters, *dict.fromkeys(a + b for a, b in merges)]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, list(merges), unk_token="<unk>",
                                     byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    return tokenizer


def test_sample_with_init_from_a_checkpoint_and_its_tokenizer_continues_as_transformers_generate(tmp_path):
    tokenizer = tiny_gemma_tokenizer()
    settings = {**CASES["mqa_window4"][0], "vocab_size": tokenizer.get_vocab_size()}
    random_transformers_model(settings, bos_token_id=2, eos_token_id=1).to(torch.bfloat16).save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "GemmaTokenizer"}, f)
    ours = hf.load_tokenizer(str(tmp_path))
    prompt = "Once upon a time there was a little girl named Lily. Café!"
    ids = AutoTokenizer.from_pretrained(tmp_path)(prompt).input_ids
    assert ours.encode_ordinary(prompt) == ids and ids[0] == 2 and ours.eot_token == 1
    assert b"".join(map(ours.decode_single_token_bytes, ids)).decode() == prompt  # é is two byte tokens

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = theirs.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8)[0].tolist()
    text = b"".join(ours.decode_single_token_bytes(t) for t in expected if t != 1).decode(errors="replace")
    result = run("gemma.py", "sample", "--init_from", str(tmp_path), "--temperature", "0", "--max_new_tokens", "8", prompt)
    assert result.stdout == text + "\n" + "-" * 40 + "\n"


# -----------------------------------------------------------------------------
# Export: a model trained here as a Hugging Face directory


def test_an_exported_model_loads_in_transformers_with_gpt2_tokenizer_and_generates_the_same_tokens(tmp_path):
    model = tiny_model(vocab_size=50257).eval()  # random norms; GPT-2's vocabulary, the rest tiny
    with torch.no_grad():  # weights 3x their initial size: a greedy continuation that varies, not one token repeated
        for p in model.parameters():
            p.mul_(3 if p.dim() == 2 else 1)
    hf.export(model, tmp_path)
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
    save_checkpoint(str(tmp_path / "ckpt.pt"), dict(  # the layout train() writes
        model=model.state_dict(), optimizers=[], scaler={}, model_config=asdict(model.config),
        train_config=asdict(TrainConfig()), step=0, best_val_loss=math.inf,
        rng=dict(torch=torch.get_rng_state(), data=torch.get_rng_state(), cuda=[])))
    hf.export_checkpoint(str(tmp_path), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "merges.txt",
                                                   "model.safetensors", "tokenizer_config.json", "vocab.json"]
    loaded = Gemma.from_pretrained(str(tmp_path / "hf"))
    assert loaded.config == model.config
    idx = torch.randint(0, 50257, (1, 12))
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])
