"""
test_gemma.py: the specification of gemma.py, as tests. CPU only, no network, seconds each.

    python -m pytest            # everything
    python -m pytest -k mask    # a subset

Each test's name states the property it checks, on a tiny configuration unless the property is about the real one.
"""
import json, math, os, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gemma import (Gemma, GemmaConfig, KVCache, TrainConfig, attention, blocked_sliding_attention, make_optimizers,
                   optimizer_step)

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
    from torch.nn.attention.flex_attention import flex_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 256, 16), torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
    with torch.no_grad():  # FlexAttention has no backward on the CPU; CUDA training uses it compiled
        out = torch.compile(lambda q, k, v: attention(q, k, v, 48, 0.25))(q, k, v)
        uncompiled = flex_attention(q, k, v, block_mask=sliding_block_mask(256, 48, q.device), scale=0.25, enable_gqa=True)
    expected = reference_attention(q, k, v, 48, 0.25)
    assert torch.allclose(uncompiled, expected, atol=1e-5)
    assert torch.allclose(out, expected, atol=1e-5)


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
