"""
test_gemma.py: the specification of gemma.py, as tests: the architecture, the masks, generation
and its cache, the training units and the command line's happy path. CPU only, no network.

    python -m pytest test_gemma.py
    python -m pytest -k mask          # a subset

Each test's name states the property it checks, on a tiny configuration unless the property is
about the real one. The sibling files test the speedups (test_speedups.py), runs that survive
(test_runs.py), the data (test_prepare.py) and the exactness against transformers (test_hf.py).
"""
import json, math, os

import pytest
import torch

import gemma
from conftest import FULL, cli, tiny_config, tiny_model
from gemma import Gemma, GemmaConfig, KVCache, TrainConfig, make_optimizers, optimizer_step

# ----- The file itself ----------------------------------------------------------------------------


def test_gemma_py_reads_in_one_sitting_at_most_650_lines_none_wider_than_100_columns():
    lines = open(gemma.__file__, encoding="utf-8").read().splitlines()
    assert len(lines) <= 650
    wide = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert wide == [], f"lines wider than 100 columns: {wide}"


def test_every_preset_is_a_valid_model_and_valid_settings():
    """A preset's settings make a TrainConfig that passes its checks (its model, a GemmaConfig, was
    checked as gemma.py built PRESETS); a model's vocabulary is GPT-2's or a smaller BPE fitted to
    the stories; the fine-tuning preset has no model of its own (None: --init_from's)."""
    from dataclasses import replace
    for name, (model, settings) in gemma.PRESETS.items():
        replace(TrainConfig(), preset=name, **settings).check()
        if model is not None:
            assert model.vocab_size <= 50_257, name
    assert gemma.PRESETS["finetune"][0] is None and gemma.PRESETS["finetune"][1]["freeze_embedding"]


def test_helper_modules_never_import_gemma_py():
    import ast
    helpers = ("speedups.py", "checkpoint.py", "devices.py", "hf.py", "to_gguf.py", "prepare.py",
               "dataset.py", "tokenizer.py", "files.py", "cli.py", "plot.py", "presets.py")
    for name in helpers:
        tree = ast.parse(open(os.path.join(os.path.dirname(gemma.__file__), name)).read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "gemma" not in imported, name


# ----- The architecture ---------------------------------------------------------------------------


def test_default_config_is_gemma3_270m_with_gpt2_vocab_and_has_132490496_parameters():
    c = GemmaConfig()
    shape = (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
             c.head_dim)
    assert shape == (18, 640, 4, 1, 256)
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == [5, 11, 17]
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


def test_norm_scales_by_one_plus_weight():
    norm = gemma.RMSNorm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6)
    assert torch.allclose(norm(x), x / rms)  # weight zero: a scale of one
    norm.weight.data.fill_(0.5)
    assert torch.allclose(norm(x), 1.5 * x / rms)


def bfloat16_mismatches(y, x, w, eps=1e-6):
    """The share of y's entries that differ from the exact norm of x, rounded once to bfloat16."""
    x64 = x.double()
    exact = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * (1 + w.double())
    return (y != exact.to(torch.bfloat16)).float().mean().item()


def test_norm_of_bfloat16_input_is_computed_in_float32_and_rounded_once():
    torch.manual_seed(0)
    x = (torch.randn(64, 640) * 30).to(torch.bfloat16)
    norm = gemma.RMSNorm(640)
    norm.weight.data.normal_(0, 0.5)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    assert bfloat16_mismatches(y, x, norm.weight) < 0.01  # float32 inside: almost always exact
    # the negative control: the same formula computed in bfloat16 misses far more often
    w = norm.weight.detach().to(torch.bfloat16)
    in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + w)
    assert bfloat16_mismatches(in_bf16, x, norm.weight) > 0.1


def outputs_with_key_value_changed_at(layer, x, j):
    """The attention layer's output before and after the keys and values (not the query) at
    position j change: (T,), how much each query's output moved."""
    attn = layer.self_attn
    base = 1e6 if layer.layer_type == FULL else 1e4
    cos, sin = gemma.rotary_embedding(torch.arange(x.size(1)), attn.head_dim, base)
    before = attn(x, cos, sin)
    bump = torch.zeros(x.size(1), 1)
    bump[j] = 1.0
    hooks = [p.register_forward_hook(lambda m, i, o: o + bump) for p in (attn.k_proj, attn.v_proj)]
    after = attn(x, cos, sin)
    for h in hooks:
        h.remove()
    return (after - before).abs().amax(-1)[0]


@pytest.fixture(params=[True, False], ids=["speedups", "plain"])
def speedups_on(request):
    """Run a test with gemma.py's speedups, and again with its plain definitions alone."""
    gemma.SPEEDUPS = request.param
    yield request.param
    gemma.SPEEDUPS = True


@pytest.mark.parametrize("j", [0, 3, 6, 11])
def test_sliding_layer_query_i_sees_exactly_keys_j_with_i_minus_j_below_the_window(j, speedups_on):
    model, T = tiny_model(), 12
    x = torch.randn(1, T, 32)
    moved = outputs_with_key_value_changed_at(model.layers[0], x, j) > 0
    assert moved.tolist() == [j <= i < j + 4 for i in range(T)]  # window 4: queries j .. j + 3


@pytest.mark.parametrize("j", [0, 3, 6, 11])
def test_full_layer_query_i_sees_every_key_j_up_to_i(j, speedups_on):
    model, T = tiny_model(), 12
    x = torch.randn(1, T, 32)
    moved = outputs_with_key_value_changed_at(model.layers[2], x, j) > 0
    assert moved.tolist() == [i >= j for i in range(T)]


def test_changing_token_t_changes_no_logits_before_t(speedups_on):
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


@pytest.mark.parametrize("change,message", [
    (dict(sliding_window=0), "--sliding_window must be positive"),
    (dict(head_dim=7), "--head_dim must be even"),
    (dict(num_attention_heads=3), "multiple of --num_key_value_heads"),
    (dict(hidden_size=-8), "--hidden_size must be positive"),
    (dict(rms_norm_eps=0.0), "--rms_norm_eps must be positive")])
def test_a_configuration_that_cannot_make_a_model_says_why_in_the_flags_words(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**change)


# ----- Generation and its cache -------------------------------------------------------------------


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
    eot = a[0, 5].item()  # pretend the 3rd generated token is end-of-text: generation stops there
    stopped = model.generate(prompt, 20, temperature=1.0, top_k=10, seed=7, eot_token=eot)
    first = (a[0, 3:] == eot).nonzero()[0].item() + 3
    assert stopped.shape[1] == first + 1 and stopped[0, -1] == eot


def test_top_k_of_one_is_greedy_and_generation_refuses_to_overrun_the_context():
    model = tiny_model()
    prompt = torch.randint(0, 101, (2, 5))
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(model.generate(prompt, 10, temperature=1.5, top_k=1, seed=0), greedy)
    with pytest.raises(ValueError, match="context of 64"):
        model.generate(prompt, 60)


# ----- Training units -----------------------------------------------------------------------------


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
        groups = [g for opt in optimizers.values() for g in opt.param_groups]
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
        for g in groups:
            assert all(p.dim() >= 2 for p in g["params"]) == (g["weight_decay"] > 0)


def test_float16_with_gradient_scaler_learns_on_the_cpu_and_skips_a_step_with_infinite_gradients():
    model = tiny_model()
    optimizers = make_optimizers(model, TrainConfig(lr=3e-3), fused=False)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0 ** 10)
    idx = torch.randint(0, 101, (4, 17))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert model(idx)[0].dtype == torch.float16
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = model(idx[:, :-1], idx[:, 1:])
        assert loss.dtype == torch.float32
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
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # not applied
    assert scaler.get_scale() == scale / 2  # and the scale backs off


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    c = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lr = gemma.lr_factor
    assert lr(0, c) == pytest.approx(0.1) and lr(9, c) == pytest.approx(1.0)
    assert lr(60, c) == pytest.approx(0.55) and lr(110, c) == pytest.approx(0.1)
    assert all(lr(s, c) >= lr(s + 1, c) for s in range(10, 120))


# ----- The command line, end to end ---------------------------------------------------------------

FAST = ["--preset", "small", "--block_size", "64", "--batch_size", "4", "--total_batch_size", "512",
        "--eval_windows", "4", "--log_interval", "1", "--warmup_steps", "2"]


@pytest.mark.slow
def test_prepare_train_and_sample_from_the_command_line(data_dir, tmp_path):
    out = tmp_path / "out"
    result = cli("gemma.py", "train", *FAST, "--max_steps", "6", "--eval_interval", "3",
                 "--data_dir", data_dir, "--out_dir", out)
    assert "step 6/6" in result.stdout and "validation loss" in result.stdout
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(val) == 3 and val[-1] < val[0]  # steps 0, 3, 6
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["model_config"]["hidden_size"] == 128
    result = cli("gemma.py", "sample", "--out_dir", out, "--max_new_tokens", "12",
                 "--num_samples", "2", "--seed", "3", "Once upon a time")
    stories = result.stdout.split("-" * 40)
    assert len(stories) == 3 and all(s.strip().startswith("Once upon a time") for s in stories[:2])


def test_help_lists_every_option_with_its_default_and_an_unknown_flag_is_an_error():
    result = cli("gemma.py", "train", "--help")
    for f in ("--block_size", "--total_batch_size", "--dtype", "--hidden_size", "--sliding_window",
              "--optimizer"):
        assert f in result.stdout
    assert "(default: 1024)" in result.stdout
    result = cli("gemma.py", "train", "--no_such_flag", "3", check=False)
    assert result.returncode == 2 and "unrecognized arguments: --no_such_flag" in result.stderr


@pytest.mark.slow
def test_training_logs_metrics_that_plot_draws_as_a_png(data_dir, tmp_path):
    out = tmp_path / "run"
    cli("gemma.py", "train", *FAST, "--max_steps", "4", "--eval_interval", "2",
        "--data_dir", data_dir, "--out_dir", out)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert {"step", "tokens", "train_loss", "train_bpb", "lr", "tokens_per_s"} <= set(rows[1])
    assert {"step", "tokens", "val_loss", "val_bpb", "val_perplexity"} <= set(rows[0])
    # GPT-2 spends about 4 bytes of these stories a token: bits per byte ~ nats / (4 ln 2)
    assert 3 < rows[0]["val_loss"] / (math.log(2) * rows[0]["val_bpb"]) < 5
    result = cli("plot.py", out, "-o", tmp_path / "loss.png")
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "bits/byte" in result.stdout


def test_validation_loss_is_computed_in_float32_whatever_the_training_dtype(tmp_path):
    import numpy as np
    from dataset import TokenFile, batches_of, get_batch
    np.random.default_rng(0).integers(0, 101, 400, dtype=np.uint16).tofile(tmp_path / "validation.bin")
    meta = dict(prefix=[], eot_token=100)
    tokens = TokenFile(str(tmp_path / "validation.bin"), "uint16", 400, meta)
    model, offsets, cpu = tiny_model(), torch.tensor([0, 50, 100, 150]), torch.device("cpu")
    x, y = get_batch(tokens, offsets, 32, cpu)
    batches, nbytes = batches_of(list(zip(x.tolist(), y.tolist())), 2, pad=100), torch.ones(101)
    loss = gemma.evaluate(model, batches, nbytes)[0]
    with torch.no_grad():
        assert abs(loss - model(x, y)[1].item()) < 1e-6  # the mean over the windows, in float32
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as a bfloat16 run trains
            assert abs(model(x, y)[1].item() - loss) > 1e-5  # the negative control: another loss
            assert gemma.evaluate(model, batches, nbytes)[0] == loss
