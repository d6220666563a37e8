"""
gemma.py: Gemma 3 270M from scratch, trained on TinyStories, in one readable file.

    python prepare.py                              # TinyStories -> data/train.bin, data/validation.bin
    python gemma.py train                          # train Gemma 3 270M (132M parameters with GPT-2's vocabulary)
    python gemma.py train --preset small           # a few-million-parameter model that trains on a laptop CPU
    python gemma.py train --resume                 # continue exactly where the last checkpoint in out/ stopped
    python gemma.py sample "Once upon a time"      # stream a story from the latest checkpoint
    torchrun --nproc_per_node=8 gemma.py train     # several GPUs (DistributedDataParallel)
    python gemma.py train --help                   # every option, with its default

The file reads in the order data flows: configuration, the model's parts from small to large
(RMSNorm, rotary embeddings, attention, MLP, block, Gemma), generation, data batches, training,
and the command line. The reference for every number is Hugging Face's Gemma 3 (`modeling_gemma3.py`);
test_gemma.py checks this model against it weight for weight.
"""
import argparse, codecs, inspect, json, math, os, re, signal, sys, time
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GemmaConfig:
    vocab_size: int = 50257                 # GPT-2 BPE (Gemma's own vocabulary is 262,144)
    hidden_size: int = 640                  # width of the residual stream
    intermediate_size: int = 2048           # width of the gated feed-forward
    num_hidden_layers: int = 18
    num_attention_heads: int = 4            # query heads
    num_key_value_heads: int = 1            # one key/value head serves all query heads (multi-query attention)
    head_dim: int = 256                     # not hidden_size / heads (= 160): q_proj is 640 -> 1024
    sliding_window: int = 512               # a sliding layer's query i sees keys j with 0 <= i - j < 512
    sliding_window_pattern: int = 6         # every 6th layer (5, 11, 17) attends to the whole past
    layer_types: tuple | None = None        # per layer "sliding_attention" or "full_attention"; None: from the pattern
    rope_theta: float = 1_000_000.0         # rotary base of the full layers (long range)
    rope_local_base_freq: float = 10_000.0  # rotary base of the sliding layers (short range)
    query_pre_attn_scalar: float = 256.0    # attention scores are scaled by 256 ** -0.5
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768    # longest sequence generation may reach

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = tuple("full_attention" if (i + 1) % self.sliding_window_pattern == 0
                                     else "sliding_attention" for i in range(self.num_hidden_layers))
        self.layer_types = tuple(self.layer_types)
        assert len(self.layer_types) == self.num_hidden_layers, "one layer type per layer"
        assert self.num_attention_heads % self.num_key_value_heads == 0, "query heads share key/value heads evenly"


# Presets: a model and the training settings that suit it. Command-line flags override both.
PRESETS = {
    "270m": (GemmaConfig(), {}),
    "small": (GemmaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, head_dim=32, sliding_window=128),
              dict(block_size=256, batch_size=16, total_batch_size=4096, lr=0.128, warmup_steps=25,
                   max_steps=500, eval_interval=50, eval_windows=64, log_interval=10)),  # ~25 min on 2 CPU cores
}

# -----------------------------------------------------------------------------
# The model's parts, from small to large


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), computed in float32, with w starting at zero (so the scale starts at 1)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # an offset from 1, not a scale: no shift, no bias

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) * (1 + w), in float32 even under autocast (fp16 overflows: transformers #36822)
        return F.rms_norm(x.float(), (x.size(-1),), 1.0 + self.weight.float(), self.eps).type_as(x)


class RotaryEmbedding(nn.Module):
    """cos and sin of each position's rotation angles. Gemma 3 has two: base 10,000 for sliding layers and
    1,000,000 for full layers, whose slower frequencies keep far-apart positions distinguishable."""

    def __init__(self, head_dim, base):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)  # exponent 2i/d
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions):  # (T,) -> cos, sin: (T, head_dim), float32
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # dimension d pairs with d + head_dim/2, not with d + 1
        return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):  # x: (B, heads, T, head_dim)
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


@torch.compiler.disable  # run as plain Python even inside torch.compile, which would otherwise rebuild it every call
@lru_cache(maxsize=16)
def sliding_block_mask(T, window, device):
    """FlexAttention's block mask for the sliding window: only the blocks of the T x T grid near the diagonal count."""
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, i, j: (j <= i) & (i - j < window), None, None, T, T, device=device)


@torch.compiler.assume_constant_result  # a number, not a tensor: without this torch.compile would split its graph here
def cpu_threads():
    return torch.get_num_threads()


def sdpa(q, k, v, **kwargs):
    """F.scaled_dot_product_attention with groups of query heads sharing a key/value head. On the CPU its backward is
    several times slower when there are fewer (batch, key/value head) pairs than threads (measured: 6x with one pair
    and two threads), so for training there the shared heads are copied out, one per query head."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.size(0) * k.size(1) < cpu_threads():
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)


def banded_mask(window, block, device):
    """The mask of `blocked_sliding_attention`, the same for every block: (block, window + block), True where query a
    of a block may see its key c, i.e. where that key is window + a - c positions back, from 0 to window - 1."""
    a, c = torch.arange(block, device=device)[:, None], torch.arange(window + block, device=device)
    return (c > a) & (c <= a + window)


def blocked_sliding_attention(q, k, v, window, scale):
    """Sliding-window attention at a cost that grows as T x window, with no compiler. The first `window` queries see
    every key before them: plain causal attention. The others go in blocks of b = window / 2 queries, each seeing only
    the window + b keys that end with its last query: 1.5 keys computed per key seen (blocks of a whole window compute
    2: 15-25% slower on a CPU; blocks of window / 4, 7-45% slower: the kernel is less efficient on small blocks)."""
    B, H, T, D = q.shape
    first = sdpa(q[:, :, :window], k[:, :, :window], v[:, :, :window], is_causal=True, scale=scale)
    if T <= window:
        return first
    b = window // 2 if window % 2 == 0 else window  # a divisor of the window, so a block's keys are whole blocks
    n, pad = -(-(T - window) // b), -(T - window) % b
    q = F.pad(q[:, :, window:], (0, 0, 0, pad)).unflatten(2, (n, b)).transpose(1, 2).flatten(0, 1)  # (B * n, heads, b, D)
    # block i's keys are positions i * b .. i * b + window + b - 1: the window / b + 1 blocks of keys from i on
    k, v = (torch.cat([t[:, :, i:i + n * b].unflatten(2, (n, b)) for i in range(0, window + 1, b)], dim=3)
            .transpose(1, 2).flatten(0, 1) for t in (F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))))
    y = sdpa(q, k, v, attn_mask=banded_mask(window, b, q.device), scale=scale)  # (B * n, heads, b, D)
    return torch.cat((first, y.unflatten(0, (B, n)).transpose(1, 2).reshape(B, H, n * b, D)[:, :, :T - window]), dim=2)


def attention(q, k, v, window, scale, block_mask=None):
    """softmax(q k^T * scale) v over the keys each query may see. q: (B, heads, T, D); k, v: (B, kv_heads, S, D).
    The cheapest exact kernel: causal where the window cannot bite, else block-sparse (FlexAttention when compiled)."""
    T = q.size(2)
    if T == 1:  # one new token against a key/value cache that holds exactly what it may see
        return sdpa(q, k, v, scale=scale)
    if window is None or T <= window:
        return sdpa(q, k, v, is_causal=True, scale=scale)
    if block_mask is not None:
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    return blocked_sliding_attention(q, k, v, window, scale)


class KVCache:
    """One layer's keys and values of the positions already seen, for generation. A full layer keeps every position;
    a sliding layer keeps only the last `window`, in a ring: with the rotation already applied, order does not matter."""

    def __init__(self, length):
        self.length, self.k, self.v = length, None, None

    def update(self, pos, k, v):  # k, v: (B, kv_heads, T, D) at positions pos .. pos + T - 1
        T, L = k.size(2), self.length
        assert T == 1 or pos == 0, "a prompt is processed in one pass, then one token a step"
        if self.k is None:
            self.k, self.v = k.new_zeros(*k.shape[:2], L, k.size(3)), v.new_zeros(*v.shape[:2], L, v.size(3))
        slots = torch.arange(pos, pos + T, device=k.device)[-L:] % L
        self.k.index_copy_(2, slots, k[:, :, -L:])
        self.v.index_copy_(2, slots, v[:, :, -L:])
        if T > 1:
            return k, v  # the prompt attends to itself through the usual masks
        return self.k[:, :, :min(pos + 1, L)], self.v[:, :, :min(pos + 1, L)]


class Attention(nn.Module):
    """Multi-query attention with QK-norm; a sliding layer sees the last `sliding_window` keys, a full layer all of them."""

    def __init__(self, config, layer_type):
        super().__init__()
        c = config
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # QK-norm: one weight shared by all heads;
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # it replaced Gemma 2's soft-capping of the scores
        self.window = c.sliding_window if layer_type == "sliding_attention" else None
        self.scale = c.query_pre_attn_scalar ** -0.5

    def forward(self, x, cos, sin, cache=None, pos=0, block_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)     # (B, heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)                       # normalise, then rotate (v is left as it is)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(pos, k, v)
        y = attention(q, k, v, self.window, self.scale, block_mask)  # (B, heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    """Gated feed-forward (GeGLU): down(gelu_tanh(gate(x)) * up(x)). Only the gate branch goes through the GELU."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """One decoder layer with four norms: each sublayer's input and output are normalised ("sandwich"),
    the residual stream itself never is."""

    def __init__(self, config, layer_type):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, pos=0, block_mask=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, pos, block_mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class LinearCrossEntropy(torch.autograd.Function):
    """logits = x weight^T and their mean cross-entropy with the targets (ignoring -100, as F.cross_entropy does) with
    one (N, vocab) buffer besides the logits, where F.cross_entropy writes three (log-probabilities, a zero-filled
    gradient, the logits' gradient): with 50,257 words, most of a small model's step on a CPU, where each fresh buffer
    over 32 MB also costs a page fault per 4 kB. The loss goes 2^22 values (16 MB) at a time, which the allocator
    reuses; the backward writes softmax - one-hot once, in place, and multiplies it into both gradients."""

    @staticmethod
    def forward(ctx, x, weight, targets):  # x: (N, hidden), weight: (vocab, hidden), targets: (N,)
        ctx.set_materialize_grads(False)  # no zero-filled (N, vocab) gradient for logits that feed nothing else
        logits, rows, ctx.count = F.linear(x, weight), max(1, 2 ** 22 // len(weight)), (targets != -100).sum()
        ctx.save_for_backward(x, weight, targets, logits)
        return logits, sum(F.cross_entropy(block.float(), t, reduction="sum")
                           for block, t in zip(logits.split(rows), targets.split(rows))) / ctx.count

    @staticmethod
    def backward(ctx, grad_logits, grad_loss):
        x, weight, targets, logits = ctx.saved_tensors
        scale = (targets != -100) * (0.0 if grad_loss is None else grad_loss / ctx.count)  # 0 for an ignored target
        g = logits.float().softmax(-1).mul_(scale[:, None])
        g = g.scatter_add_(1, targets.clamp(min=0)[:, None], -scale[:, None]).to(logits.dtype)  # (softmax - one-hot) x scale
        if grad_logits is not None:  # the logits fed something else too
            g += grad_logits
        return g @ weight, g.t() @ x, None


class Gemma(nn.Module):
    """Gemma 3: embed, scale by sqrt(width), the blocks, a final norm, and logits through the embedding itself (tied)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)                  # full layers
        self.rotary_emb_local = RotaryEmbedding(config.head_dim, config.rope_local_base_freq)  # sliding layers
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5), persistent=False)
        self.init_weights()

    def init_weights(self):
        """Linear and embedding weights start as N(0, 0.02); every norm weight starts at 0, i.e. a scale of 1."""
        for name, p in self.named_parameters():
            nn.init.zeros_(p) if name.endswith("norm.weight") else nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets=None, cache=None, pos=0):
        """idx: (B, T) token ids at positions pos .. pos + T - 1 -> logits (B, T, vocab), and the loss if targets are given."""
        # sqrt(640) = 25.3, rounded to the weights' dtype as the reference does (25.25 in bfloat16)
        x = self.embed_tokens(idx) * self.embed_scale.to(self.embed_tokens.weight.dtype)
        positions = torch.arange(pos, pos + idx.size(1), device=idx.device)
        rotations = {"full_attention": self.rotary_emb(positions), "sliding_attention": self.rotary_emb_local(positions)}
        T, window = idx.size(1), self.config.sliding_window
        flex = torch.compiler.is_compiling() and T > window and (x.device.type == "cuda" or not torch.is_grad_enabled())
        block_mask = sliding_block_mask(T, window, x.device) if flex else None  # one per length, for every layer
        for i, layer in enumerate(self.layers):
            x = layer(x, *rotations[layer.layer_type], cache[i] if cache else None, pos, block_mask)
        x = self.norm(x)
        # LinearCrossEntropy in eager mode, in the weights' dtype: compiled, the plain loss below is fused anyway, and
        # under autocast the plain path multiplies in low precision, which LinearCrossEntropy does not
        if targets is not None and not (torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type)):
            logits, loss = LinearCrossEntropy.apply(x.flatten(0, 1), self.embed_tokens.weight, targets.flatten())
            return logits.view(*targets.shape, -1), loss
        logits = F.linear(x, self.embed_tokens.weight)  # tied output layer: no lm_head of its own
        loss = None
        if targets is not None:  # the loss in float32, whatever the autocast dtype
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @classmethod
    def from_pretrained(cls, path):
        """A Hugging Face Gemma 3 checkpoint directory (config.json + model.safetensors) as a Gemma; see hf.py."""
        from hf import load_pretrained
        return load_pretrained(path)

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, eot_token=None, seed=None, use_cache=True,
               compile=False):
        """Yield the next token of every row, (B,), one step at a time. temperature 0 is greedy; top_k keeps the k
        likeliest tokens; a row that emits eot_token keeps emitting it, and the stream stops once all rows have.
        compile: torch.compile the one-token steps, fusing each layer's small operations (one graph for all lengths)."""
        if idx.size(1) + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"{idx.size(1)} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                             f"context of {self.config.max_position_embeddings}")
        generator = torch.Generator(idx.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        cache, pos = None, 0
        if use_cache:
            length = idx.size(1) + max_new_tokens
            cache = [KVCache(min(length, self.config.sliding_window) if t == "sliding_attention" else length)
                     for t in self.config.layer_types]
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        step = torch.compile(self, dynamic=True) if compile and use_cache else self
        for _ in range(max_new_tokens):
            # the prompt in one pass, then one token a step; without a cache, pos stays 0: the whole sequence again
            logits, _ = (step if pos else self)(idx[:, pos:], cache=cache, pos=pos)
            pos = idx.size(1) if use_cache else 0
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            if eot_token is not None:
                next_token = torch.where(finished, eot_token, next_token)
                finished |= next_token == eot_token
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            yield next_token
            if finished.all():
                return

    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) -> (B, T + new tokens): the prompt followed by what `stream` generates."""
        return torch.cat([idx] + [t[:, None] for t in self.stream(idx, max_new_tokens, **kwargs)], dim=1)


# -----------------------------------------------------------------------------
# Data: the token files written by prepare.py, read through a memory map so the corpus never sits in RAM


class UserError(Exception):
    """A mistake the user can fix: reported as one line, with no traceback and a non-zero exit."""


def load_tokens(data_dir, split, block_size, vocab_size):
    """Check a .bin file once, thoroughly, so that a bad one fails here with a hint rather than mid-run."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.exists(path):
        raise UserError(f"no {path}: run `python prepare.py --data_dir {data_dir}` first (or pass --data_dir)")
    if os.path.getsize(path) % 2:
        raise UserError(f"{path} has an odd number of bytes, so it is not whole uint16 tokens: run prepare.py again")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if len(data) < block_size + 1:
        raise UserError(f"{path} holds {len(data)} tokens, fewer than one block of {block_size} + 1: "
                        "prepare more text or lower --block_size")
    if int(data.max()) >= vocab_size:
        raise UserError(f"{path} holds token id {int(data.max())}, beyond the vocabulary of {vocab_size}: "
                        "it was made with another tokenizer; run prepare.py again")
    return path, len(data)


def get_batch(path, offsets, block_size, device):
    """Inputs and targets (the inputs shifted by one) of the windows starting at `offsets`: (len(offsets), block_size)."""
    data = np.memmap(path, dtype=np.uint16, mode="r")  # reopened every batch: a long-lived memmap leaks memory (nanoGPT)
    rows = np.stack([data[o:o + block_size + 1] for o in offsets.tolist()]).astype(np.int64)
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    preset: str = "270m"             # model and training defaults: 270m or small
    data_dir: str = "data"           # where prepare.py wrote train.bin and validation.bin
    out_dir: str = "out"             # checkpoints and metrics.jsonl go here
    resume: bool = False             # continue from the checkpoint in out_dir, exactly where it stopped
    device: str = "auto"             # auto (cuda, then mps, then cpu), or a torch device such as cuda:1
    dtype: str = "auto"              # auto, bfloat16, float16 (with a gradient scaler) or float32
    compile: bool | None = None      # torch.compile the model; default: on for CUDA, off elsewhere
    seed: int = 1337                 # seeds the weights and the order of the batches
    block_size: int = 1024           # tokens per training window: longer than the window, so sliding layers slide
    batch_size: int = 8              # windows per micro-batch, per process
    total_batch_size: int = 131072   # tokens per optimizer step; gradient accumulation makes up the difference
    max_steps: int = 5000            # optimizer steps
    optimizer: str = "adamw"         # adamw, or muon (Muon for hidden weight matrices, AdamW for the rest)
    lr: float = 6e-4                 # peak AdamW learning rate
    muon_lr: float = 0.02            # peak Muon learning rate (with --optimizer muon)
    min_lr_ratio: float = 0.1        # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200          # linear warm-up from 0 to lr
    weight_decay: float = 0.1        # on weight matrices only, never on norms
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # clip the global gradient norm (after unscaling); 0 disables
    eval_interval: int = 250         # evaluate and checkpoint every this many steps
    eval_windows: int = 128          # fixed validation windows, the same every run, so numbers compare
    log_interval: int = 10           # steps between log lines


@dataclass
class SampleConfig:
    prompt: str = "Once upon a time"  # the story's beginning
    out_dir: str = "out"             # where the checkpoint is
    init_from: str = ""              # a Hugging Face Gemma 3 directory to sample from instead of out_dir
    num_samples: int = 1             # stories to generate
    max_new_tokens: int = 300        # tokens per story at most
    temperature: float = 0.8         # 0 is greedy; higher is more random
    top_k: int = 200                 # sample from the k likeliest tokens; 0 keeps them all
    seed: int = 1337                 # the same seed gives the same stories
    stop_at_eot: bool = True         # end a story at the end-of-text token
    compile: bool = False            # torch.compile the one-token step: ~20 s of compiling on a CPU, then faster tokens
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class ExportConfig:
    out_dir: str = "out"             # where the checkpoint is
    hf_dir: str = "hf"               # the Hugging Face model directory to write (see hf.py)


def check_config(c):
    for name in ("block_size", "batch_size", "total_batch_size", "max_steps", "eval_interval", "eval_windows", "log_interval"):
        if getattr(c, name) <= 0:
            raise UserError(f"--{name} must be positive, not {getattr(c, name)}")
    if c.lr <= 0 or c.muon_lr <= 0 or c.grad_clip < 0 or c.warmup_steps < 0 or not 0 <= c.min_lr_ratio <= 1:
        raise UserError("--lr and --muon_lr must be positive, --grad_clip and --warmup_steps not negative, "
                        "and --min_lr_ratio within [0, 1]")
    if c.optimizer not in ("adamw", "muon"):
        raise UserError(f"--optimizer must be adamw or muon, not {c.optimizer}")


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name, device):
    """auto: bfloat16 on GPUs that have it; float16 (with a gradient scaler) on those that do not, such as a T4, and
    on Apple silicon; float32 on the CPU, where bfloat16 matrix multiplies are slower unless the CPU has AMX."""
    if name == "auto" and device.type == "cuda":
        name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    elif name == "auto":
        name = "float16" if device.type == "mps" else "float32"
    if name not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype must be auto, bfloat16, float16 or float32, not {name}")
    return getattr(torch, name)


def lr_factor(step, c):
    """Linear warm-up to 1, then a cosine decay to min_lr_ratio at max_steps."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizers(model, c, fused):
    """AdamW with weight decay on the weight matrices only. With muon, torch.optim.Muon takes the hidden weight
    matrices (attention and MLP projections) and AdamW the embedding and the norms. Each group keeps its base_lr."""
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and n.startswith("layers.")]
    embedding = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("layers.")]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    adamw = dict(lr=c.lr, betas=(c.beta1, c.beta2), fused=fused)
    if c.optimizer == "muon":
        optimizers = [torch.optim.Muon(matrices, lr=c.muon_lr, weight_decay=c.weight_decay),
                      torch.optim.AdamW([{"params": embedding, "weight_decay": c.weight_decay},
                                         {"params": vectors, "weight_decay": 0.0}], **adamw)]
    else:
        optimizers = [torch.optim.AdamW([{"params": matrices + embedding, "weight_decay": c.weight_decay},
                                         {"params": vectors, "weight_decay": 0.0}], **adamw)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def optimizer_step(model, optimizers, scaler, grad_clip):
    """Unscale, clip, step. With float16 the scaler skips a step whose gradients hold inf or NaN, and lowers its scale."""
    for opt in optimizers:
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return norm


ARCHITECTURE_FREE = {"max_position_embeddings"}  # config fields a resumed run may change: they hold no weights


def save_checkpoint(path, state):
    """Write to a temporary file, flush it to disk, then rename it over the old one: a crash at any moment
    leaves either the old checkpoint or the new one, whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def load_checkpoint(out_dir):
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}: train first (python gemma.py train), or pass --out_dir")
    try:  # plain tensors and Python values only: weights_only refuses anything that could run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} cannot be read ({type(e).__name__}): it is damaged or truncated; "
                        "delete it and train again") from None


def model_from_checkpoint(ckpt):
    model = Gemma(GemmaConfig(**ckpt["model_config"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model


def train(c, model_config, ckpt=None):
    check_config(c)
    ddp = "RANK" in os.environ  # started by torchrun: one process per GPU (or per CPU worker, with gloo)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(c.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0  # only rank 0 logs, evaluates and writes checkpoints
    dtype = pick_dtype(c.dtype, device)
    tokens_per_micro_step = c.batch_size * c.block_size * world
    if c.total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total_batch_size {c.total_batch_size} is not a multiple of batch_size x block_size x "
                        f"processes = {tokens_per_micro_step}: change one of them")
    accum = c.total_batch_size // tokens_per_micro_step  # gradient accumulation steps per process
    train_path, n_train = load_tokens(c.data_dir, "train", c.block_size, model_config.vocab_size)
    val_path, n_val = load_tokens(c.data_dir, "validation", c.block_size, model_config.vocab_size)

    torch.manual_seed(c.seed)
    model = Gemma(model_config).to(device)
    optimizers = make_optimizers(model, c, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # float16 only: bfloat16 has range enough
    data_rng = torch.Generator().manual_seed(c.seed)  # the only randomness while training: which windows to read
    step, best_val_loss = 0, float("inf")
    if ckpt is not None:
        saved = asdict(GemmaConfig(**ckpt["model_config"]))
        changed = [k for k, v in asdict(model_config).items() if k not in ARCHITECTURE_FREE and saved[k] != v]
        if changed:
            raise UserError(f"the checkpoint in {c.out_dir} has another architecture ({', '.join(changed)} differ): "
                            "resume with its settings, or train into a new --out_dir")
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        scaler.load_state_dict(ckpt["scaler"])
        step, best_val_loss = ckpt["step"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_rng.set_state(ckpt["rng"]["data"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    compile_model = c.compile if c.compile is not None else device.type == "cuda"
    train_model = torch.compile(model) if compile_model else model
    if ddp:
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    os.makedirs(c.out_dir, exist_ok=True)
    ckpt_path, metrics_path = os.path.join(c.out_dir, "ckpt.pt"), os.path.join(c.out_dir, "metrics.jsonl")
    if master:
        keep = []  # on resume, forget metrics logged after the checkpoint: those steps are about to be run again
        if ckpt is not None and os.path.exists(metrics_path):
            keep = [line for line in open(metrics_path) if json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(keep)
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters | {device} {str(dtype)[6:]} | "
              f"{world} process(es) x {accum} micro-steps x {c.batch_size} x {c.block_size} tokens"
              + (f" | resuming at step {step}" if ckpt else ""))

    def log_metrics(**row):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(dict(step=step, tokens=step * c.total_batch_size, **row)) + "\n")

    def checkpoint():
        save_checkpoint(ckpt_path, dict(
            model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers], scaler=scaler.state_dict(),
            model_config=asdict(model_config), train_config=asdict(c), step=step, best_val_loss=best_val_loss,
            rng=dict(torch=torch.get_rng_state(), data=data_rng.get_state(),
                     cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else [])))

    val_offsets = torch.linspace(0, n_val - c.block_size - 1, c.eval_windows).long().unique()  # the same every run

    @torch.no_grad()
    def evaluate():
        model.eval()
        total = 0.0
        for offsets in val_offsets.split(c.batch_size):
            x, y = get_batch(val_path, offsets, c.block_size, device)
            with autocast:
                total += model(x, y)[1].item() * len(offsets)
        model.train()
        return total / len(val_offsets)

    interrupted = []  # Ctrl-C: finish the step under way, save, stop
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    t0 = time.time()
    while True:
        if master and (step % c.eval_interval == 0 or step == c.max_steps):
            val_loss = evaluate()
            best_val_loss = min(best_val_loss, val_loss)
            print(f"step {step}: validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f}), "
                  f"best {best_val_loss:.4f}; checkpoint {ckpt_path}")
            log_metrics(val_loss=val_loss, val_perplexity=math.exp(val_loss))
            checkpoint()
        if step >= c.max_steps:
            break
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = (c.muon_lr if isinstance(opt, torch.optim.Muon) else c.lr) * lr_factor(step, c)
        # every rank draws the same offsets for the whole step and reads its own share: 2 processes x n micro-steps
        # see exactly the windows that 1 process x 2n micro-steps would
        offsets = torch.randint(n_train - c.block_size, (world * accum, c.batch_size), generator=data_rng)
        loss = torch.zeros((), device=device)
        for micro, rows in enumerate(offsets[rank * accum:(rank + 1) * accum]):
            x, y = get_batch(train_path, rows, c.block_size, device)
            if ddp:  # average the gradients across processes only once, after the last micro-step
                train_model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                _, micro_loss = train_model(x, y)
            scaler.scale(micro_loss / accum).backward()
            loss += micro_loss.detach() / accum
        if ddp:
            torch.distributed.all_reduce(loss)
            loss /= world
        loss = loss.item()
        if not math.isfinite(loss) and dtype != torch.float16:  # float16: the scaler skips the step instead
            raise UserError(f"the loss became {loss} at step {step}: training stopped; the checkpoint in {c.out_dir} "
                            "is intact. Try a lower --lr, or --dtype float32")
        optimizer_step(train_model, optimizers, scaler, c.grad_clip)
        step += 1
        dt, t0 = time.time() - t0, time.time()
        if master and (step % c.log_interval == 0 or step == c.max_steps):
            lr = c.lr * lr_factor(step - 1, c)
            print(f"step {step}/{c.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms | "
                  f"{c.total_batch_size / dt:,.0f} tok/s | ETA {dt * (c.max_steps - step) / 60:.1f} min", flush=True)
            log_metrics(train_loss=loss, lr=lr, tokens_per_s=c.total_batch_size / dt)
        if interrupted:
            if master:
                checkpoint()
                print(f"interrupted: saved step {step} to {ckpt_path}; continue with --resume", file=sys.stderr)
            sys.exit(130)
    if ddp:
        torch.distributed.destroy_process_group()


# -----------------------------------------------------------------------------
# Sampling


def sample(c):
    if c.temperature < 0 or c.max_new_tokens <= 0 or c.num_samples <= 0 or c.top_k < 0:
        raise UserError("--temperature and --top_k must not be negative, --max_new_tokens and --num_samples positive")
    device = pick_device(c.device)
    dtype = pick_dtype(c.dtype, device)
    if c.init_from:  # a Hugging Face checkpoint directory, with its own tokenizer where it has one
        from hf import load_pretrained, load_tokenizer
        try:
            model, tokenizer = load_pretrained(c.init_from), load_tokenizer(c.init_from)
        except (OSError, ValueError) as e:  # no such directory, no config.json, a model this file does not implement
            raise UserError(f"--init_from {c.init_from}: {e}") from None
    else:
        from prepare import gpt2_tokenizer
        model, tokenizer = model_from_checkpoint(load_checkpoint(c.out_dir)), gpt2_tokenizer()
    model.to(device).eval()
    context = model.config.max_position_embeddings
    if c.max_new_tokens >= context:
        raise UserError(f"--max_new_tokens must be below the model's context of {context} tokens")
    ids = tokenizer.encode_ordinary(c.prompt) or [tokenizer.eot_token]  # an empty prompt: start a new story
    room = context - c.max_new_tokens
    if len(ids) > room:
        print(f"note: the prompt is {len(ids)} tokens; keeping its last {room} so that it and {c.max_new_tokens} new "
              f"tokens fit the context of {context}", file=sys.stderr)
        ids = ids[-room:]
    idx = torch.tensor([ids], device=device)
    eot = tokenizer.eot_token if c.stop_at_eot else None
    for i in range(c.num_samples):
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span several tokens
        print(text.decode(b"".join(tokenizer.decode_single_token_bytes(t) for t in ids)), end="", flush=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for token in model.stream(idx, c.max_new_tokens, temperature=c.temperature, top_k=c.top_k or None,
                                      eot_token=eot, seed=c.seed + i, compile=c.compile):
                if token.item() != eot:
                    print(text.decode(tokenizer.decode_single_token_bytes(token.item())), end="", flush=True)
        print(text.decode(b"", final=True) + "\n" + "-" * 40, flush=True)


# -----------------------------------------------------------------------------
# Command line: every option is a dataclass field, and its comment above is its --help


def add_flags(parser, cls, skip=()):
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M))
    for f in fields(cls):
        if f.name not in skip:
            kind = next(t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None))
            how = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
            parser.add_argument(f"--{f.name}", help=f"{comments.get(f.name, '')} (default: {f.default})", **how)


def train_configs(args):
    """The settings of a run, each overriding the one before: the preset's, the checkpoint's when resuming, the flags."""
    model_flags = {f.name: args.pop(f.name) for f in fields(GemmaConfig) if f.name in args}
    if args.get("preset", "270m") not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, not {args['preset']}")
    ckpt = load_checkpoint(args.get("out_dir", "out")) if args.get("resume") else None
    if ckpt is not None:
        model_config, c = GemmaConfig(**ckpt["model_config"]), TrainConfig(**ckpt["train_config"])
        if args.get("preset", c.preset) != c.preset:  # another preset: another architecture, refused in train()
            model_config = PRESETS[args["preset"]][0]
    else:
        model_config, defaults = PRESETS[args.get("preset", "270m")]
        c = replace(TrainConfig(), **defaults)
    c = replace(c, **args)
    if model_flags:
        model_config = replace(model_config, layer_types=None, **model_flags)
    return c, replace(model_config, max_position_embeddings=c.block_size), ckpt


def main(argv=None):
    parser = argparse.ArgumentParser(description="Gemma 3 270M from scratch on TinyStories.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", argument_default=argparse.SUPPRESS, allow_abbrev=False,
                                       help="train a model")
    add_flags(train_parser, TrainConfig)
    add_flags(train_parser.add_argument_group("model (the preset's unless given; 270m's shown)"), GemmaConfig,
              skip=("layer_types", "max_position_embeddings"))
    sample_parser = commands.add_parser("sample", argument_default=argparse.SUPPRESS, allow_abbrev=False,
                                        help="generate stories")
    sample_parser.add_argument("prompt", nargs="?", help="the story's beginning (default: Once upon a time)")
    add_flags(sample_parser, SampleConfig, skip=("prompt",))
    add_flags(commands.add_parser("export", argument_default=argparse.SUPPRESS, allow_abbrev=False,
                                  help="write a checkpoint as a Hugging Face model"), ExportConfig)
    args = vars(parser.parse_args(argv))
    try:
        command = args.pop("command")
        if command == "train":
            train(*train_configs(args))
        elif command == "sample":
            sample(replace(SampleConfig(), **args))
        elif command == "export":  # see hf.py
            from hf import export_checkpoint
            export_checkpoint(**asdict(replace(ExportConfig(), **args)))
    except UserError as e:
        print(f"gemma.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.modules["gemma"] = sys.modules["__main__"]  # so that hf.py's `import gemma` finds this module, not a copy
    main()
