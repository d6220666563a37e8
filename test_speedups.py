"""
test_speedups.py: every fast path of speedups.py gives the numbers of gemma.py's plain definitions,
in value and in gradient, each kernel forced on the CPU whatever the machine's thread count. A fork
that edits the plain mask or the plain loss in gemma.py makes these tests fail.

    python -m pytest test_speedups.py
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


@contextlib.contextmanager
def loss_chunk(values):
    """linear_cross_entropy's chunks of `values` float32 logits on the CPU: several, tiny."""
    speedups.LOSS_CHUNK["cpu"], default = values, speedups.LOSS_CHUNK["cpu"]
    try:
        yield
    finally:
        speedups.LOSS_CHUNK["cpu"] = default


def plain_loss(x, weight, targets):
    """gemma.py's plain loss: the whole logits, then F.cross_entropy in float32."""
    return F.cross_entropy(F.linear(x, weight).float().flatten(0, 1), targets.flatten())


def loss_inputs(B=3, T=13, hidden=32, vocab=101, seed=3):
    """x, weight and targets as the loss meets them, some targets -100: left out of the mean."""
    torch.manual_seed(seed)
    x = torch.randn(B, T, hidden, requires_grad=True)
    weight = (torch.randn(vocab, hidden) * 0.3).requires_grad_()
    targets = torch.randint(0, vocab, (B, T))
    targets[0, :5] = targets[-1, -1] = -100
    return x, weight, targets


def loss_and_grads(loss_fn, x, weight, targets, dtype, scale=1024.0):
    """The loss under autocast to dtype (none for float32), and the gradients of scale x loss (a
    gradient scaler's), for x and weight."""
    x.grad = weight.grad = None
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn(x, weight, targets)
    (loss * scale).backward()
    return loss.detach(), x.grad.clone(), weight.grad.clone()


# chunks of 1 row; of 4 rows, the last of the 39 with 3; all 39 rows in one chunk
CHUNKS = {"one_row": 50, "four_rows": 4 * 101, "one_chunk": 2 ** 22}


@pytest.mark.parametrize("chunk", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2),
                                             (torch.float16, 2e-3)],
                         ids=["float32", "bfloat16", "float16"])
def test_chunked_loss_equals_the_plain_loss_in_value_and_gradient_in_float32_and_under_autocast(
        chunk, dtype, tolerance):
    inputs = loss_inputs()
    with loss_chunk(chunk):
        loss, *grads = loss_and_grads(speedups.linear_cross_entropy, *inputs, dtype)
    loss_plain, *grads_plain = loss_and_grads(plain_loss, *inputs, dtype)
    assert loss.dtype == torch.float32 and loss.shape == ()
    # the same logits, rounded alike (F.linear in the autocast dtype): the same loss in any dtype
    assert abs(loss.item() - loss_plain.item()) < 1e-6
    if dtype != torch.float32:  # the negative control: without autocast's rounding, another loss
        assert abs(plain_loss(*inputs).item() - loss_plain.item()) > 1e-4
    for g, g_plain in zip(grads, grads_plain):  # relative; under autocast 2 x its dtype's eps
        assert g.dtype == g_plain.dtype == torch.float32
        assert (g - g_plain).abs().max() <= tolerance * g_plain.abs().max()


def model_loss_and_grads(model, idx, targets, run=None):
    """run(idx, targets) (the model itself unless given), its loss and the model's gradients."""
    model.zero_grad(set_to_none=True)
    logits, loss = (model if run is None else run)(idx, targets)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", CHUNKS.values(), ids=CHUNKS.keys())
def test_the_model_with_the_chunked_loss_equals_the_plain_model_in_loss_and_every_gradient(chunk):
    model = tiny_model()
    targets = loss_inputs()[2]
    idx = torch.randint(0, 101, (3, 13))  # longer than the window: blocked attention too
    with loss_chunk(chunk):
        logits, loss, grads = model_loss_and_grads(model, idx, targets)
    assert logits is None  # the chunked path ran: the logits never whole
    with plain():
        _, loss_plain, grads_plain = model_loss_and_grads(model, idx, targets)
    assert abs(loss.item() - loss_plain.item()) < 1e-6
    for name, g in grads.items():
        assert (g - grads_plain[name]).abs().max() < 1e-5, name


class LargestAllocation(TorchDispatchMode):
    """The largest buffer, in bytes, that any operation allocates while this mode is on (an output
    whose storage is none of its inputs': not a view, not in place), forward and backward."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def largest_allocation(loss_fn, x, weight, targets, dtype=torch.float32, backward=True):
    with LargestAllocation() as mode:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_fn(x, weight, targets)
        if backward:
            loss.backward()
    return mode.bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_step_of_the_chunked_loss_never_holds_the_batch_logits_and_the_plain_one_does(dtype):
    x, weight, targets = loss_inputs(B=2, T=50, hidden=16, vocab=1000)
    logits_bytes = 2 * 50 * 1000 * 4  # one float32 copy of the batch's logits: 400 kB
    with loss_chunk(10 * 1000):  # 10 rows a chunk: 40 kB
        chunked = largest_allocation(speedups.linear_cross_entropy, x, weight, targets, dtype)
    assert chunked <= max(10 * 1000, 1000 * 16) * 4  # a chunk of logits, or the weight's gradient
    # the negative control: the plain path holds the whole logits (and more)
    assert largest_allocation(plain_loss, x, weight, targets, dtype) >= logits_bytes


def test_without_gradients_the_chunked_loss_computes_no_gradient_buffers():
    x, weight, targets = loss_inputs(B=2, T=50, hidden=16, vocab=1000)
    weight_bytes = 1000 * 16 * 4  # as large as the weight's gradient: 64 kB, above a chunk's 40 kB
    with loss_chunk(10 * 1000):
        expected = speedups.linear_cross_entropy(x, weight, targets)
        assert largest_allocation(speedups.linear_cross_entropy, x, weight, targets) >= weight_bytes
        with torch.no_grad():
            assert largest_allocation(speedups.linear_cross_entropy, x, weight, targets,
                                      backward=False) < weight_bytes
            loss = speedups.linear_cross_entropy(x, weight, targets)
        detached = [t.detach() for t in (x, weight)]
        assert largest_allocation(speedups.linear_cross_entropy, *detached, targets,
                                  backward=False) < weight_bytes
    assert loss.grad_fn is None and torch.equal(loss, expected.detach())


@pytest.mark.slow
def test_a_compiled_model_with_the_chunked_loss_equals_the_eager_plain_model():
    # this test's shapes only: after test_bench's compilations of the same forward, torch 2.13
    # compiles it for dynamic shapes, and that backward fails its own stride check (14 for 13)
    torch._dynamo.reset()
    model = tiny_model()
    targets = loss_inputs()[2]
    idx = torch.randint(0, 101, (3, 13))
    with loss_chunk(4 * 101):  # several chunks, after the compiled graph: a graph break at the loss
        logits, loss, grads = model_loss_and_grads(model, idx, targets, run=torch.compile(model))
    assert logits is None
    with plain():
        _, loss_plain, grads_plain = model_loss_and_grads(model, idx, targets)
    assert abs(loss.item() - loss_plain.item()) < 1e-5
    for name, g in grads.items():
        assert (g - grads_plain[name]).abs().max() < 1e-5, name


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
        _, loss = wrapped(idx, idx)
        loss.backward()
    assert torch.equal(loss, model(idx, idx)[1])
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed") == 1 and "no Triton here" in err
