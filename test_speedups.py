"""
test_speedups.py: every fast path of speedups.py gives the numbers of gemma.py's plain definitions,
in value and in gradient, each kernel forced on the CPU whatever the machine's thread count. A fork
that edits the plain mask or the plain loss in gemma.py makes these tests fail.

    python -m pytest test_speedups.py
"""
import contextlib

import pytest
import torch

import gemma
import speedups
from conftest import tiny_model


@contextlib.contextmanager
def plain():
    """gemma.py's plain definitions only: no speedups."""
    gemma.SPEEDUPS = False
    try:
        yield
    finally:
        gemma.SPEEDUPS = True


@contextlib.contextmanager
def copy_kv_heads(copy):
    speedups.COPY_KV_HEADS = copy
    try:
        yield
    finally:
        speedups.COPY_KV_HEADS = None


def qkv(B, heads, kv_heads, T, S, D, seed):
    torch.manual_seed(seed)
    shapes = [(B, heads, T, D), (B, kv_heads, S, D), (B, kv_heads, S, D)]
    return [torch.randn(*s, requires_grad=True) for s in shapes]


def value_and_grads(f, tensors, seed=0):
    """f(*tensors), and the gradients of a fixed random projection of it, for each tensor."""
    for t in tensors:
        t.grad = None
    out = f(*tensors)
    torch.manual_seed(seed)
    (out * torch.randn_like(out)).sum().backward()
    return out.detach(), [t.grad.clone() for t in tensors]


def assert_same(fast, slow, atol=1e-5):
    (out_f, grads_f), (out_s, grads_s) = fast, slow
    assert (out_f - out_s).abs().max() < atol
    for g_f, g_s in zip(grads_f, grads_s):
        assert (g_f - g_s).abs().max() < atol


def plain_attention(q, k, v, window, scale):
    with plain():
        return gemma.attention(q, k, v, window, scale)


@pytest.mark.parametrize("T,window,heads,kv_heads", [(10, 4, 4, 1), (24, 8, 4, 2), (13, 5, 3, 1),
                                                     (7, 7, 2, 1), (40, 3, 2, 2), (33, 16, 4, 1)])
def test_blocked_sliding_attention_equals_the_plain_definition(T, window, heads, kv_heads):
    tensors = qkv(2, heads, kv_heads, T, T, 16, seed=T)
    slow = value_and_grads(lambda *t: plain_attention(*t, window, 0.25), tensors)
    fast = value_and_grads(lambda *t: speedups.blocked_sliding_attention(*t, window, 0.25), tensors)
    assert_same(fast, slow)
    chosen = value_and_grads(lambda *t: speedups.attention(*t, window, 0.25), tensors)
    assert_same(chosen, slow)  # the kernel speedups.attention picks for this shape


@pytest.mark.parametrize("copy", [True, False], ids=["heads_copied", "heads_shared"])
@pytest.mark.parametrize("window", [None, 64], ids=["full", "window_cannot_bite"])
def test_causal_kernel_with_key_value_heads_copied_or_shared_equals_the_plain_definition(copy,
                                                                                      window):
    tensors = qkv(1, 4, 1, 20, 20, 8, seed=1)
    slow = value_and_grads(lambda *t: plain_attention(*t, window, 0.3), tensors)
    with copy_kv_heads(copy):
        fast = value_and_grads(lambda *t: speedups.attention(*t, window, 0.3), tensors)
    assert_same(fast, slow)


@pytest.mark.parametrize("S,window", [(1, 4), (3, 4), (4, 4), (9, None)])
def test_one_new_token_against_its_cached_keys_equals_the_plain_definition(S, window):
    # a sliding layer's cache holds at most `window` keys, in ring order: all of them visible
    tensors = qkv(2, 4, 2, 1, S, 8, seed=S)
    slow = value_and_grads(lambda *t: plain_attention(*t, window, 0.3), tensors)
    for copy in (True, False):
        with copy_kv_heads(copy):
            fast = value_and_grads(lambda *t: speedups.attention(*t, window, 0.3), tensors)
        assert_same(fast, slow)


def test_flex_attention_compiled_under_no_grad_equals_the_plain_definition():
    q, k, v = (t.detach() for t in qkv(1, 2, 1, 256, 256, 16, seed=0))
    mask = speedups.sliding_block_mask(256, 48, q.device)
    with torch.no_grad():  # FlexAttention has no backward on the CPU; CUDA training compiles it
        out = torch.compile(speedups.attention)(q, k, v, 48, 0.25, mask)
        expected = plain_attention(q, k, v, 48, 0.25)
    assert (out - expected).abs().max() < 1e-5


def model_value_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    return (logits.detach(), loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fused_loss_with_ignored_targets_equals_the_plain_loss_in_value_and_gradient():
    model = tiny_model()
    torch.manual_seed(3)
    idx = torch.randint(0, 101, (3, 13))  # longer than the window: blocked attention too
    targets = torch.randint(0, 101, (3, 13))
    targets[0, :5] = targets[2, -1] = -100  # no target there: left out of the mean
    (logits, loss), grads = model_value_and_grads(model, idx, targets)
    assert speedups.fused_loss_applies(logits)  # eager float32: the fused path ran
    with plain():
        (logits_plain, loss_plain), grads_plain = model_value_and_grads(model, idx, targets)
    assert abs(loss.item() - loss_plain.item()) < 1e-6
    assert (logits - logits_plain).abs().max() < 1e-5
    for name, g in grads.items():
        assert (g - grads_plain[name]).abs().max() < 1e-6, name


def test_the_whole_model_with_speedups_equals_the_plain_model_with_and_without_the_cache():
    model = tiny_model().eval()
    prompt = torch.randint(0, 101, (2, 9))  # 9 + 20 tokens, five times the window
    fast = model.generate(prompt, 20, temperature=0)
    with plain():
        assert torch.equal(model.generate(prompt, 20, temperature=0), fast)
        assert torch.equal(model.generate(prompt, 20, temperature=0, use_cache=False), fast)


@pytest.mark.slow
def test_compiled_model_uses_flex_attention_with_one_cached_block_mask_per_length():
    cache = speedups.sliding_block_mask.__wrapped__  # the lru_cache under torch.compiler.disable
    model = tiny_model(sliding_window=48).eval()
    idx = torch.randint(0, 101, (2, 200))  # longer than the window: the sliding layers slide
    compiled = torch.compile(model)
    cache.cache_clear()
    with torch.no_grad():
        with plain():
            expected = model(idx)[0]
        assert cache.cache_info().misses == 0
        outputs = [compiled(idx)[0] for _ in range(3)]
    # built once, then looked up (inside the graph torch.compile would ignore the cache)
    assert cache.cache_info().misses == 1 and cache.cache_info().hits == 2
    assert all((out - expected).abs().max() < 1e-5 for out in outputs)


@pytest.mark.slow
def test_compiled_one_token_steps_generate_what_the_plain_model_does():
    model = tiny_model()
    prompt = torch.randint(0, 101, (2, 9))  # 9 + 20 tokens: the sliding layers' rings wrap
    with plain():
        expected = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(model.generate(prompt, 20, temperature=0, compile=True), expected)


def failing_backend(graph, example_inputs):
    raise RuntimeError("no Triton here (a compiler made to fail)")


def test_a_compiler_that_fails_costs_one_warning_and_the_run_goes_on_uncompiled(capsys):
    model = tiny_model()
    wrapped = speedups.CompileOrEager(model, backend=failing_backend)
    idx = torch.randint(0, 101, (2, 7))
    for _ in range(3):
        logits, loss = wrapped(idx, idx)
        loss.backward()
    assert torch.equal(logits, model(idx, idx)[0])
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed") == 1 and "no Triton here" in err
