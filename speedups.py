"""
speedups.py: the same numbers as gemma.py's plain definitions, sooner.

gemma.py hands off to this module in one place for attention (`attention`, with the block mask of
`block_mask`) and one for the loss (`linear_cross_entropy`); set `gemma.SPEEDUPS = False` to run
the plain definitions instead. test_speedups.py checks every path here against them, in value and
in gradient, each kernel forced on the CPU:

    python -m pytest test_speedups.py

What is here, in the order a training step meets it:
- `attention`: picks the cheapest exact kernel for the shape: one new token against a cache that
  holds exactly what it may see needs no mask; where the window cannot bite (a full layer, or no
  longer than the window) the fused causal kernel, with no mask tensor; else block-sparse
  attention, FlexAttention when compiled, `blocked_sliding_attention` otherwise.
- `sdpa`: F.scaled_dot_product_attention with shared key/value heads, copied out per query head
  when training on a CPU with few (batch, key/value head) pairs (see its docstring).
- `linear_cross_entropy`: the output layer and the loss a chunk of rows at a time, the logits
  never whole, the gradients computed on the way.
- `compile_or_eager`: torch.compile that falls back to the eager model, with one warning, when the
  compiler fails (no Triton, Windows, an old GPU).
This module never imports gemma.py.
"""
import sys
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

# Copy the shared key/value heads out before the CPU kernel? None: decide by the thread count
# (see sdpa); True or False: always or never (the tests force both).
COPY_KV_HEADS = None


@torch.compiler.assume_constant_result  # a number, not a tensor: no graph break under compile
def cpu_threads():
    return torch.get_num_threads()


def sdpa(q, k, v, **kwargs):
    """F.scaled_dot_product_attention with groups of query heads sharing a key/value head.

    On the CPU its backward is several times slower when there are fewer (batch, key/value head)
    pairs than threads (measured: 6x with one pair and two threads), so for training there the
    shared heads are copied out, one per query head: the same numbers, in parallel."""
    copy = COPY_KV_HEADS
    if copy is None:
        few_pairs = q.size(0) * k.size(1) < cpu_threads()
        copy = q.device.type == "cpu" and torch.is_grad_enabled() and few_pairs
    if copy:
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)


def banded_mask(window, block, device):
    """The mask of `blocked_sliding_attention`, the same for every block: (block, window + block),
    True where query a of a block may see key c, i.e. where that key is window + a - c positions
    back, from 0 to window - 1."""
    a = torch.arange(block, device=device)[:, None]
    c = torch.arange(window + block, device=device)
    return (c > a) & (c <= a + window)


def blocked_sliding_attention(q, k, v, window, scale):
    """Sliding-window attention at a cost that grows as T x window, with no compiler.

    The first `window` queries see every key before them: plain causal attention. The others go
    in blocks of b = window / 2 queries, each seeing only the window + b keys that end with its
    last query: 1.5 keys computed per key seen. Measured on a CPU: blocks of a whole window (2 keys
    per key seen) are 15-25% slower; blocks of window / 4, 7-45% slower (small blocks use the
    kernel less well). A 270M sliding layer's forward + backward grows 1.98x, 2.05x, 1.99x as T
    doubles from 1,024 to 8,192 (bench.py): linear."""
    B, H, T, D = q.shape
    head = slice(0, window)
    first = sdpa(q[:, :, head], k[:, :, head], v[:, :, head], is_causal=True, scale=scale)
    if T <= window:
        return first
    b = window // 2 if window % 2 == 0 else window  # divides the window: keys come in whole blocks
    n, pad = -(-(T - window) // b), -(T - window) % b  # blocks of queries, padding of the last
    q = F.pad(q[:, :, window:], (0, 0, 0, pad)).unflatten(2, (n, b))  # (B, heads, n, b, D)
    q = q.transpose(1, 2).flatten(0, 1)  # (B * n, heads, b, D)
    k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    # block i's keys are positions i * b .. i * b + window + b - 1: window / b + 1 blocks from i on
    starts = range(0, window + 1, b)
    k = torch.cat([k[:, :, s:s + n * b].unflatten(2, (n, b)) for s in starts], dim=3)
    v = torch.cat([v[:, :, s:s + n * b].unflatten(2, (n, b)) for s in starts], dim=3)
    k, v = k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1)
    y = sdpa(q, k, v, attn_mask=banded_mask(window, b, q.device), scale=scale)  # (B * n, H, b, D)
    y = y.unflatten(0, (B, n)).transpose(1, 2).reshape(B, H, n * b, D)[:, :, :T - window]
    return torch.cat((first, y), dim=2)


@torch.compiler.disable  # plain Python even inside torch.compile, which would rebuild it each call
@lru_cache(maxsize=16)
def sliding_block_mask(T, window, device):
    """FlexAttention's block mask for the sliding window: only the blocks near the diagonal of the
    T x T grid hold visible keys, and only those are computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, i, j):
        return (j <= i) & (i - j < window)
    return create_block_mask(visible, None, None, T, T, device=device)


def block_mask(T, window, device):
    """The block mask for a forward pass of T tokens, built once per length outside the compiled
    graph and shared by every sliding layer; None where FlexAttention is not used: in eager mode,
    and for CPU training (FlexAttention has no CPU backward)."""
    flex = torch.compiler.is_compiling() and window is not None and T > window
    if flex and (device.type == "cuda" or not torch.is_grad_enabled()):
        return sliding_block_mask(T, window, device)
    return None


def attention(q, k, v, window, scale, mask=None):
    """gemma.attention's numbers with the cheapest exact kernel for this shape and device."""
    T, S = q.size(2), k.size(2)
    if T == 1:  # one new token, against a cache that holds exactly the keys it may see
        return sdpa(q, k, v, scale=scale)
    assert S == T, "a prompt attends to itself; only single tokens use the cache"
    if window is None or T <= window:  # the window cannot bite: plain causal
        return sdpa(q, k, v, is_causal=True, scale=scale)
    if mask is not None:
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    return blocked_sliding_attention(q, k, v, window, scale)


# Float32 logits in one chunk of linear_cross_entropy's rows, by device (see LinearCrossEntropy)
LOSS_CHUNK = dict(cpu=2 ** 24, cuda=2 ** 27)


def cross_entropy_chunks(x, weight, targets, grad_x=None, grad_w=None):
    """The summed cross-entropy of the logits x weight^T with the targets (-100: none, left out), a
    chunk of rows at a time, each chunk's logits computed as the plain path computes them: F.linear
    in autocast's dtype where it is on, then float32. Where given, adds each chunk's (softmax -
    one-hot) x weight into grad_x (N, hidden) and its transpose times x into grad_w (vocab, hidden),
    multiplied in the dtype the plain backward multiplies in, and not yet divided by the count.
    Every chunk reuses the first chunk's buffers: on a CPU a fresh tensor this large comes from
    the system page by page, and those page faults cost as much as the softmax."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    x, weight = x.to(dtype), weight.to(dtype)  # what autocast's F.linear multiplies
    rows = min(len(x), max(1, LOSS_CHUNK["cuda" if x.is_cuda else "cpu"] // len(weight)))
    logits = torch.empty(rows, len(weight), dtype=dtype, device=x.device)  # in x's dtype
    z = logits if dtype == torch.float32 else torch.empty_like(logits, dtype=torch.float32)
    total = torch.zeros((), device=x.device)
    with torch.autocast(device, enabled=False):
        for i in range(0, len(x), rows):
            xc, t = x[i:i + rows], targets[i:i + rows]
            n = len(xc)
            counted, t = (t != -100).float()[:, None], t.clamp(min=0)[:, None]
            zc = torch.mm(xc, weight.t(), out=logits[:n])  # (n, vocab): the chunk's logits
            zc = zc if z is logits else z[:n].copy_(zc)  # then in float32
            target_logit, top = zc.gather(1, t), zc.amax(1, keepdim=True)
            total_exp = zc.sub_(top).exp_().sum(1, keepdim=True)  # zc is now exp(logits - top)
            total = total + ((top + total_exp.log() - target_logit) * counted).sum()
            if grad_x is None and grad_w is None:
                continue
            g = zc.mul_(counted / total_exp).scatter_add_(1, t, -counted)  # softmax - one-hot
            g = g if z is logits else logits[:n].copy_(g)  # as the plain backward casts it
            if grad_x is not None and grad_x.dtype == dtype:
                torch.mm(g, weight, out=grad_x[i:i + rows])
            elif grad_x is not None:
                grad_x[i:i + rows] = g @ weight
            if grad_w is not None and grad_w.dtype == dtype:
                grad_w.addmm_(g.t(), xc)
            elif grad_w is not None:  # a low-precision product, as the plain one, summed in float32
                grad_w += g.t() @ xc
    return total


class LinearCrossEntropy(torch.autograd.Function):
    """The mean cross-entropy of the logits x weight^T with the targets, the logits never whole: a
    chunk of rows at a time (cross_entropy_chunks), the gradients computed in the same pass, so
    that backward only multiplies them by the loss's gradient. It holds one chunk's logits and the
    gradients, (N, hidden) and (vocab, hidden) in float32, where the plain path holds the logits and
    up to three more (N, vocab) buffers (log-probabilities, a zero-filled gradient, the logits'
    gradient), under autocast also low-precision logits and their gradient. With Gemma's own
    262,144 words these are a step's largest tensors, and on a CPU each fresh one also costs a
    page fault per 4 kB: one float32 training step of 1 x 1024 tokens at 270m's width (2 layers,
    bench.py --only loss; one float32 copy of the logits is 1,024 MB) peaked at 4,348 MB plain,
    1,478 MB chunked, most of it the two (vocab, hidden) gradients of the tied embedding.
    A chunk is 2^24 float32 values (64 MB, 64 rows of 262,144 words) on a CPU: the weight's
    gradient is read and written once a chunk, so that much smaller chunks cost time. On a GPU a
    chunk is 2^27 values (512 rows of 262,144 words), for the matrix multiplies' sake: the same
    reasoning, not yet measured on a GPU."""

    @staticmethod
    def forward(ctx, x, weight, targets):  # x: (N, hidden), weight: (vocab, hidden), targets: (N,)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        count = (targets != -100).sum()
        loss = cross_entropy_chunks(x, weight, targets, grad_x, grad_w) / count
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(count, grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # in place: a second backward (retain_graph) fails, not wrong
        count, grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / count
        grad_x = None if grad_x is None else grad_x.mul_(scale)
        grad_w = None if grad_w is None else grad_w.mul_(scale).to(ctx.weight_dtype)
        return grad_x, grad_w, None


@torch.compiler.disable  # a graph break inside torch.compile, which would unroll the chunks
def linear_cross_entropy(x, weight, targets):
    """x: (B, T, hidden) or (N, hidden), weight: (vocab, hidden), targets: (B, T) or (N,), -100
    where there is none -> the mean cross-entropy of the logits x weight^T, a 0-dim float32
    tensor: the plain path's F.cross_entropy(F.linear(x, weight).float(), targets), in value and
    gradient, with no gradient buffers where no gradient is wanted (torch.no_grad, or neither
    input needs one)."""
    x, targets = x.flatten(0, -2), targets.flatten()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, targets)
    return cross_entropy_chunks(x, weight, targets) / (targets != -100).sum()


class CompileOrEager(nn.Module):
    """torch.compile(model), or the model itself once the compiler has failed: a run must not die
    because Triton is missing or a kernel does not fit the card. Compilation happens at the first
    call, so that is where a failure shows; it is reported once, on stderr, naming the cause."""

    def __init__(self, model, **options):
        super().__init__()
        self.model, self.compiled = model, torch.compile(model, **options)
        self.failed = None

    def forward(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # BackendCompilerFailed, InductorError, missing Triton, ...
                while getattr(e, "inner_exception", None) or e.__cause__:  # the root cause
                    e = getattr(e, "inner_exception", None) or e.__cause__
                cause = (str(e).strip().splitlines() or [""])[0][:200]
                self.failed = f"{type(e).__name__}: {cause}"
                print(f"warning: torch.compile failed ({self.failed}); continuing without "
                      "compiling (pass --no-compile to skip it)", file=sys.stderr, flush=True)
        return self.model(*args, **kwargs)
