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
- `linear_cross_entropy`: the output layer and the loss in one step that keeps one (N, vocab)
  buffer instead of four.
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


def fused_loss_applies(x):
    """Eager float32 only: compiled, the plain loss is fused anyway, and under autocast the plain
    path multiplies in low precision, which linear_cross_entropy would not."""
    return not (torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type))


class LinearCrossEntropy(torch.autograd.Function):
    """logits = x weight^T and their mean cross-entropy with the targets, ignoring -100 targets as
    F.cross_entropy does, with one (N, vocab) buffer besides the logits, where the plain path
    writes three more (log-probabilities, a zero-filled gradient, the logits' gradient). With
    50,257 words these buffers are most of a small model's step on a CPU, where each fresh buffer
    over 32 MB also costs a page fault per 4 kB: measured 1.21x transformers' training step on the
    small preset, 1.05x on 270M (bench.py). The loss goes 2^22 values (16 MB) at a time, which the
    allocator reuses; the backward writes softmax - one-hot once, in place, and multiplies it into
    both gradients."""

    @staticmethod
    def forward(ctx, x, weight, targets):  # x: (N, hidden), weight: (vocab, hidden), targets: (N,)
        ctx.set_materialize_grads(False)  # no zero-filled (N, vocab) gradient for unused logits
        logits = F.linear(x, weight)
        rows, ctx.count = max(1, 2 ** 22 // len(weight)), (targets != -100).sum()
        ctx.save_for_backward(x, weight, targets, logits)
        chunks = zip(logits.split(rows), targets.split(rows))
        loss = sum(F.cross_entropy(block.float(), t, reduction="sum") for block, t in chunks)
        return logits, loss / ctx.count

    @staticmethod
    def backward(ctx, grad_logits, grad_loss):
        x, weight, targets, logits = ctx.saved_tensors
        scale = 0.0 if grad_loss is None else grad_loss / ctx.count
        scale = (targets != -100) * scale  # 0 for an ignored target
        g = logits.float().softmax(-1).mul_(scale[:, None])
        g = g.scatter_add_(1, targets.clamp(min=0)[:, None], -scale[:, None])  # (p - one-hot) x scale
        g = g.to(logits.dtype)
        if grad_logits is not None:  # the logits fed something else too
            g += grad_logits
        return g @ weight, g.t() @ x, None


def linear_cross_entropy(x, weight, targets):
    """x: (B, T, hidden), weight: (vocab, hidden), targets: (B, T) -> logits (B, T, vocab), loss."""
    logits, loss = LinearCrossEntropy.apply(x.flatten(0, 1), weight, targets.flatten())
    return logits.view(*targets.shape, -1), loss


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
