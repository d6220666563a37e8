"""
gemma.py: Gemma 3 270M from scratch, trained on TinyStories, in one readable file.

    python prepare.py                           # TinyStories -> data/train.bin, validation.bin
    python gemma.py train                       # Gemma 3 270M (132M parameters with GPT-2's BPE)
    python gemma.py train --preset small        # a few million parameters: a laptop CPU trains it
    python gemma.py train --resume              # continue exactly where out/ckpt.pt stopped
    python gemma.py sample "Once upon a time"   # stream a story from the latest checkpoint
    python gemma.py export --hf_dir hf          # the checkpoint as a Hugging Face model
    python gemma.py export --gguf model.gguf    # ... or as one file for llama.cpp and Ollama
    python gemma.py eval --files my_stories.txt # the loss on your own held-out stories
    torchrun --nproc_per_node=8 gemma.py train  # several GPUs (DistributedDataParallel)

Read top to bottom, in the order data flows. Each part is its plain definition; speedups.py gives
the same numbers sooner where SPEEDUPS is read (attention, the loss). Plumbing lives in modules
named for it: dataset.py (windows, batches), checkpoint.py, hf.py, to_gguf.py, devices.py, cli.py.
"""
import argparse
import codecs
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

from cli import UserError, add_flags, check_numbers, start_command
if __name__ == "__main__":  # first: torch takes seconds to load, and Ctrl-C then is one line too
    start_command("gemma.py")
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import dataset
import devices
import hf
import presets
import speedups
import to_gguf
from tokenizer import load_tokenizer, token_bytes

SPEEDUPS = True  # False: every step runs the plain definitions in this file (slower, same numbers)


# ----- Configuration ------------------------------------------------------------------------------
def layer_pattern(num_layers, every=6):
    """Gemma 3's pattern: every - 1 sliding layers, then a full one, repeated (18 layers: full at
    5, 11 and 17). A sliding layer sees the last sliding_window keys; a full one, the whole past."""
    return tuple("full_attention" if (i + 1) % every == 0 else "sliding_attention"
                 for i in range(num_layers))


@dataclass
class GemmaConfig:
    vocab_size: int = 50257                 # GPT-2 BPE (Gemma's own vocabulary is 262,144)
    hidden_size: int = 640                  # width of the residual stream
    intermediate_size: int = 2048           # width of the gated feed-forward
    num_hidden_layers: int = 18
    num_attention_heads: int = 4            # query heads
    num_key_value_heads: int = 1            # 1: all query heads share one key/value head (MQA)
    head_dim: int = 256                     # not hidden_size / heads (160): q_proj is 640 -> 1024
    sliding_window: int = 512               # sliding layer: query i sees j when 0 <= i - j < 512
    sliding_window_pattern: int = 6         # every 6th layer (5, 11, 17) sees the whole past
    layer_types: tuple | None = None        # per layer; None: layer_pattern's
    rope_theta: float = 1_000_000.0         # rotary base of the full layers (long range)
    rope_local_base_freq: float = 10_000.0  # rotary base of the sliding layers (short range)
    query_pre_attn_scalar: float = 256.0    # attention scores are scaled by 256 ** -0.5
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768    # longest sequence generation may reach

    def __post_init__(self):  # a model that cannot be made is a ValueError, in flags' words
        check_numbers(self, error=ValueError)  # every number positive
        if self.layer_types is None:
            self.layer_types = layer_pattern(self.num_hidden_layers, self.sliding_window_pattern)
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for --num_hidden_layers "
                             f"{self.num_hidden_layers}: one a layer")
        if self.head_dim % 2:  # rotary embeddings turn pairs of dimensions
            raise ValueError(f"--head_dim must be even, not {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("--num_attention_heads must be a multiple of --num_key_value_heads")


# Presets (presets.py): a model (None: --init_from's) and the training settings that suit it
PRESETS = {name: (None if model is None else GemmaConfig(**model), train)
           for name, (model, train) in presets.PRESETS.items()}


# ----- The model's parts, from small to large -----------------------------------------------------
class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), with w starting at zero (a scale of 1),
    in float32 even under autocast, where float16 overflows (transformers #36822)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # an offset from 1: no shift, no bias

    def forward(self, x):  # F.rms_norm: the formula above in one fused kernel
        scale = 1.0 + self.weight.float()
        return F.rms_norm(x.float(), (x.size(-1),), scale, self.eps).type_as(x)


def rotary_embedding(positions, head_dim, base):
    """cos and sin of each position's rotation angles, (T, head_dim) each: dimension d turns with
    d + head_dim / 2. Base 10,000 on sliding layers; 1,000,000 (slower turns) on full layers."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):  # x: (B, heads, T, head_dim)
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention(q, k, v, window, scale, mask=None):
    """softmax(q k^T * scale) v, where query i sees key j when 0 <= i - j < window; a full layer
    (window None) sees every j <= i. q: (B, heads, T, D); k, v: (B, kv_heads, S, D): S = T, or, for
    one new token, its cached keys. Each key/value head serves heads / kv_heads query heads."""
    if SPEEDUPS:  # the same numbers, sooner: a kernel chosen for this shape and device
        return speedups.attention(q, k, v, window, scale, mask)
    T, S = q.size(2), k.size(2)
    i = torch.arange(S - T, S, device=q.device)[:, None]  # query positions: the last T
    j = torch.arange(S, device=q.device)[None, :]  # key positions
    visible = j <= i  # causal: the past and the present, never the future
    if window is not None:  # (a sliding cache holds at most `window` keys: all of them pass)
        visible = visible & (i - j < window)  # sliding: the last `window` keys only
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # one key/value head per query head
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, heads, T, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v  # (B, heads, T, D)


class KVCache:
    """One layer's keys and values of the positions seen so far. A full layer keeps them all; a
    sliding layer the last `window`, in a ring (keys are rotated already: their order is free)."""

    def __init__(self, length):
        self.length, self.k, self.v = length, None, None

    def update(self, pos, k, v):  # k, v: (B, kv_heads, T, D) at positions pos .. pos + T - 1
        T, L = k.size(2), self.length
        assert T == 1 or pos == 0, "a prompt is processed in one pass, then one token a step"
        if self.k is None:
            self.k = k.new_zeros(*k.shape[:2], L, k.size(3))
            self.v = v.new_zeros(*v.shape[:2], L, v.size(3))
        slots = torch.arange(pos, pos + T, device=k.device)[-L:] % L
        self.k.index_copy_(2, slots, k[:, :, -L:])
        self.v.index_copy_(2, slots, v[:, :, -L:])
        if T > 1:
            return k, v  # the prompt attends to itself, through the usual mask
        return self.k[:, :, :min(pos + 1, L)], self.v[:, :, :min(pos + 1, L)]


class Attention(nn.Module):
    """Multi-query attention with QK-norm; a sliding layer sees the last `sliding_window` keys."""

    def __init__(self, c, layer_type):  # c: the GemmaConfig
        super().__init__()
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # QK-norm, one weight for all heads:
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)  # Gemma 2's score soft-capping, replaced
        self.window = c.sliding_window if layer_type == "sliding_attention" else None
        self.scale = c.query_pre_attn_scalar ** -0.5

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, T, D)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, T, D)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)  # normalise, then rotate; v is left as it is
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(pos, k, v)
        y = attention(q, k, v, self.window, self.scale, mask)  # (B, heads, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class MLP(nn.Module):
    """Gated feed-forward (GeGLU): down(gelu_tanh(gate(x)) * up(x)); only the gate has the GELU."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """One decoder layer with four norms: each sublayer's input and output are normalised (the
    "sandwich"); the residual stream itself never is."""

    def __init__(self, config, layer_type):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, pos=0, mask=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, pos, mask)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma(nn.Module):
    """Gemma 3: embed, scale by sqrt(width), the blocks, a final norm, and logits through the
    embedding itself (tied: no output layer of its own)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.init_weights()

    def init_weights(self):
        """Linear and embedding weights start as N(0, 0.02), norm weights at 0 (a scale of 1)."""
        for name, p in self.named_parameters():
            nn.init.zeros_(p) if name.endswith("norm.weight") else nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets=None, cache=None, pos=0, last=False):
        """idx: (B, T) token ids at positions pos .. pos + T - 1 -> (logits (B, T, vocab), the
        mean cross-entropy with targets (B, T) where given, -100 marking no target). last: the
        logits of the last position only (B, 1, vocab), all a prompt needs. With targets and
        SPEEDUPS, the logits are never whole (speedups.linear_cross_entropy): (None, loss)."""
        # the embedding, scaled by sqrt(width): sqrt(640) = 25.3, rounded to the weights' dtype
        # first (25.25 in bfloat16) as Google's code and transformers round it, so they agree there
        scale = torch.tensor(self.config.hidden_size ** 0.5).to(self.embed_tokens.weight.dtype)
        x = self.embed_tokens(idx) * scale  # (B, T, hidden)
        positions = torch.arange(pos, pos + idx.size(1), device=idx.device)
        c = self.config
        rotations = {"full_attention": rotary_embedding(positions, c.head_dim, c.rope_theta),
                     "sliding_attention": rotary_embedding(positions, c.head_dim,
                                                           c.rope_local_base_freq)}
        mask = speedups.block_mask(idx.size(1), c.sliding_window, x.device) if SPEEDUPS else None
        for i, layer in enumerate(self.layers):
            x = layer(x, *rotations[layer.layer_type], cache[i] if cache else None, pos, mask)
        x = self.norm(x[:, -1:] if last else x)
        weight = self.embed_tokens.weight  # tied: the embedding is also the output layer
        if targets is not None and SPEEDUPS:  # the same loss, a chunk of rows at a time
            return None, speedups.linear_cross_entropy(x, weight, targets)  # no logits kept
        logits = F.linear(x, weight)
        loss = None
        if targets is not None:  # in float32, whatever the autocast dtype
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    @classmethod
    def from_pretrained(cls, path):
        """A Hugging Face Gemma 3 directory (config.json, model.safetensors) as a float32 Gemma."""
        return hf.load_pretrained(path, lambda settings: cls(GemmaConfig(**settings)))

    # ----- Generation: the prompt in one pass, then one token a step ------------------------------

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, eot_token=None, seed=None,
               use_cache=True, compile=False):
        """Yield the next token of every row, (B,), a step at a time (see pick_token). A row that
        emits eot_token keeps emitting it; the stream stops once every row has. Without the cache
        each step recomputes the whole sequence; compile: torch.compile the one-token step."""
        if idx.size(1) + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"{idx.size(1)} prompt tokens + {max_new_tokens} new tokens exceed "
                             f"the model's context of {self.config.max_position_embeddings}")
        generator = torch.Generator(idx.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        length, window = idx.size(1) + max_new_tokens, self.config.sliding_window
        cache = [KVCache(min(length, window) if t == "sliding_attention" else length)
                 for t in self.config.layer_types] if use_cache else None
        step = torch.compile(self, dynamic=True) if compile and use_cache else self
        logits = self(idx, cache=cache, last=True)[0][:, -1]  # 1) the prompt, in one pass
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for n in range(max_new_tokens):
            token = pick_token(logits.float(), temperature, top_k, generator)
            if eot_token is not None:
                token = torch.where(finished, eot_token, token)
                finished |= token == eot_token
            yield token
            if finished.all() or n == max_new_tokens - 1:
                return
            idx = torch.cat((idx, token[:, None]), dim=1)
            if use_cache:  # 2) one token a step, against the cache
                logits = step(idx[:, -1:], cache=cache, pos=idx.size(1) - 1)[0][:, -1]
            else:
                logits = self(idx, last=True)[0][:, -1]

    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) -> (B, T + new tokens): the prompt followed by what `stream` generates."""
        new = [t[:, None] for t in self.stream(idx, max_new_tokens, **kwargs)]
        return torch.cat([idx] + new, dim=1)


def pick_token(logits, temperature, top_k, generator):
    """Each row's next token from its logits (B, vocab): the likeliest if temperature is 0, else a
    sample from the softmax of logits / temperature, over the top_k likeliest if given."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature  # <= 0: no overflow
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


# ----- Training: configuration, optimizers and schedule, then the loop (batches: dataset.py) ------
@dataclass
class TrainConfig:
    preset: str = "270m"            # a recipe of presets.py: model and training defaults
    data_dir: str = "data"          # where prepare.py wrote train.bin and validation.bin
    init_from: str = ""             # start from a Hugging Face Gemma 3 (google/gemma-3-270m)
    out_dir: str = "out"            # checkpoints and metrics.jsonl go here
    resume: bool = False            # continue from the checkpoint in out_dir, where it stopped
    device: str = "auto"            # auto (cuda, then mps, then cpu), or a device such as cuda:1
    dtype: str = "auto"             # auto, bfloat16, float16 (with a gradient scaler) or float32
    compile: bool | None = None     # torch.compile the model; default: on for CUDA only
    seed: int = 1337                # seeds the weights and the order of the batches
    block_size: int = 1024          # tokens per window: longer than the sliding window
    batch_size: int = 8             # windows per micro-batch, per process
    total_batch_size: int = 131072  # tokens per optimizer step, by gradient accumulation
    max_steps: int = 5000           # optimizer steps
    optimizer: str = "adamw"        # adamw, or muon (Muon for hidden matrices, AdamW the rest)
    lr: float = 6e-4                # peak AdamW learning rate
    muon_lr: float = 0.02           # peak Muon learning rate (with --optimizer muon)
    min_lr_ratio: float = 0.1       # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 200         # linear warm-up from 0 to lr
    weight_decay: float = 0.1       # on weight matrices only, never on norms
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # clip the global gradient norm (after unscaling); 0: never
    freeze_embedding: bool = False  # keep the (tied) embedding: Gemma's 168M, its steps 4x sooner
    eval_interval: int = 250        # evaluate and checkpoint every this many steps
    eval_windows: int = 128         # fixed validation windows, the same every run
    log_interval: int = 10          # steps between log lines

    def check(self):
        check_numbers(self, ("seed", "warmup_steps", "weight_decay", "grad_clip", "min_lr_ratio",
                             "beta1"))  # these may be 0; every other number must be positive
        if self.min_lr_ratio > 1 or max(self.beta1, self.beta2) >= 1:
            raise UserError("--min_lr_ratio must be at most 1, --beta1 and --beta2 below 1")
        if self.optimizer not in ("adamw", "muon"):
            raise UserError(f"--optimizer must be adamw or muon, not {self.optimizer}")


def lr_factor(step, c):
    """Linear warm-up to 1, then a cosine decay to min_lr_ratio at max_steps."""
    if step < c.warmup_steps:
        return (step + 1) / c.warmup_steps
    progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
    return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizers(model, c, fused):
    """{"adamw": AdamW}, with weight decay on the weight matrices only; with muon, {"muon":
    torch.optim.Muon for the hidden weight matrices (attention and MLP projections), "adamw": for
    the embedding and norms}. A frozen parameter (requires_grad False) has neither gradient nor
    optimizer state."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in params if p.dim() >= 2 and n.startswith("layers.")]
    embedding = [p for n, p in params if p.dim() >= 2 and not n.startswith("layers.")]
    vectors = [p for n, p in params if p.dim() < 2]
    muon = c.optimizer == "muon"
    decayed = embedding if muon else matrices + embedding
    adamw = torch.optim.AdamW([dict(params=decayed, weight_decay=c.weight_decay),
                               dict(params=vectors, weight_decay=0.0)],
                              lr=c.lr, betas=(c.beta1, c.beta2), fused=fused)
    if not muon:
        return {"adamw": adamw}
    muon = torch.optim.Muon(matrices, lr=c.muon_lr, weight_decay=c.weight_decay)
    return {"muon": muon, "adamw": adamw}  # (in this order in a checkpoint)


def optimizer_step(model, optimizers, scaler, grad_clip):
    """Unscale, clip, step. In float16 the scaler skips a step with inf or NaN gradients."""
    for opt in optimizers.values():
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    clip = grad_clip if grad_clip > 0 else float("inf")
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for opt in optimizers.values():
        scaler.step(opt)
    scaler.update()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)


def train_step(model, batches, scaler, autocast, accum, world, nbytes):
    """Forward and backward over `accum` micro-batches: (the loss averaged over every process, in
    nats per token and in bits per byte, whether any process was asked to stop), in one
    all-reduce, so that all stop at one step. Every micro-batch holds as many targets."""
    stats = torch.zeros(4, device=nbytes.device)  # [loss, targets, their bytes, stop requests]
    for micro, (x, y) in enumerate(batches):
        if world > 1:  # average the gradients across processes once, after the last micro-step
            model.require_backward_grad_sync = micro == accum - 1
        with autocast:
            _, loss = model(x, y)
        scaler.scale(loss / accum).backward()
        targets = y[y != -100]
        stats[0] += loss.detach() / accum
        stats[1] += targets.numel()
        stats[2] += nbytes[targets].sum()
    stats[3] = checkpoint.stop_requested()
    if world > 1:
        torch.distributed.all_reduce(stats)
    loss, targets, text_bytes, stops = stats.tolist()
    return loss / world, loss / world * targets / (math.log(2) * text_bytes), stops > 0


@torch.no_grad()
def evaluate(model, batches, nbytes):
    """The loss on fixed windows, batches of (inputs, targets), -100 where there is none, in
    float32 (autocast off) whatever the dtype a run trains in, so that runs compare. -> (nats per
    token; bits per byte: the summed nats / (ln 2 x the UTF-8 bytes of the text the targets stand
    for, nbytes[id] a token's, 0 for special ones), which compares across tokenizers; perplexity)"""
    model.eval()
    nats, tokens, text_bytes, device = 0, 0, 0, nbytes.device  # nbytes: on the model's device
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, enabled=False):
            loss = model(x, y)[1]
        targets = y[y != -100]
        nats, tokens = nats + loss.item() * len(targets), tokens + len(targets)
        text_bytes += nbytes[targets].sum().item()
    model.train()
    loss = nats / tokens
    return loss, nats / (math.log(2) * text_bytes), math.exp(min(loss, 700))  # e^700: diverged


def train(c, model_config, ckpt=None):
    # 1) processes, device, precision, and how many micro-steps make one optimizer step
    rank, world, device = devices.start_processes(c.device)  # under torchrun: one per GPU
    master = rank == 0  # only rank 0 logs, evaluates and writes checkpoints
    dtype = devices.pick_dtype(c.dtype, device)  # bfloat16 where it is native (CPUs too)
    tokens_per_micro_step = c.batch_size * c.block_size * world
    if c.total_batch_size % tokens_per_micro_step:
        raise UserError(f"--total_batch_size {c.total_batch_size} is not a multiple of batch_size"
                        f" x block_size x processes = {tokens_per_micro_step}: change one of them")
    accum = c.total_batch_size // tokens_per_micro_step  # micro-steps per optimizer step
    # 2) the data, checked once and thoroughly, so that a bad file fails here and not mid-run: the
    # token files, the fixed validation windows, where training windows begin, each token's bytes
    data = dataset.load_data(c, model_config.vocab_size, device)
    # 3) model, optimizers, gradient scaler and batch order; a resumed run restores them all
    torch.manual_seed(c.seed)
    model = Gemma(model_config).to(device)
    if c.init_from and ckpt is None:  # Google's weights (or any Gemma 3's), not random ones
        hf.load_pretrained(c.init_from, lambda settings: model).train()
    model.embed_tokens.weight.requires_grad_(not c.freeze_embedding)  # also the output layer
    optimizers = make_optimizers(model, c, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 needs none
    data_rng = torch.Generator().manual_seed(c.seed)  # training's one randomness: which windows
    step, best_val_loss, evaluated = 0, float("inf"), False
    if ckpt is not None:
        step, best_val_loss, evaluated = checkpoint.restore(ckpt, model, optimizers, scaler,
                                                            data_rng, device)
    run = dict(model=model, optimizers=optimizers, scaler=scaler, data_rng=data_rng, device=device,
               configs=dict(model_config=asdict(model_config), train_config=asdict(c)))
    compiled = c.compile if c.compile is not None else device.type == "cuda"
    train_model = speedups.CompileOrEager(model) if compiled else model
    train_model = devices.parallel(train_model, device, world)  # torchrun: one model a process
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    ckpt_path, metrics = checkpoint.start_run(c, data.tokenizer, step, evaluated, master)
    if master:
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters | {device} "
              f"{str(dtype)[6:]} | {world} process(es) x {accum} micro-steps x {c.batch_size} x "
              f"{c.block_size} tokens" + (f" | resuming at step {step}" if ckpt else ""))
    checkpoint.stop_on_signals()  # Ctrl-C, SIGTERM: finish the step under way, save, then stop
    first_step = step
    # 4) the loop: evaluate and save on schedule, then one optimizer step of `accum` micro-steps
    while True:
        if master and (step % c.eval_interval == 0 or step == c.max_steps) and not evaluated:
            val_loss, val_bpb, perplexity = evaluate(model, data.validation, data.nbytes)
            best_val_loss = min(best_val_loss, val_loss)
            print(f"step {step}: validation loss {val_loss:.4f} ({val_bpb:.4f} bits/byte, "
                  f"perplexity {perplexity:.2f}), best {best_val_loss:.4f}; checkpoint {ckpt_path}")
            checkpoint.log_metrics(metrics, step, c.total_batch_size, val_loss=val_loss,
                                   val_bpb=val_bpb, val_perplexity=perplexity)
            checkpoint.save(ckpt_path, checkpoint.capture(**run, step=step, evaluated=True,
                                                          best_val_loss=best_val_loss))
        evaluated = False
        if step >= c.max_steps:
            break
        peaks = dict(adamw=c.lr, muon=c.muon_lr)  # the schedule, from each optimizer's peak
        for name, opt in optimizers.items():
            for group in opt.param_groups:
                group["lr"] = peaks[name] * lr_factor(step, c)
        # the step's windows, this process's share of them (see dataset.draw_offsets)
        offsets = dataset.draw_offsets(data.train, data.starts, c.block_size, world * accum,
                                       c.batch_size, data_rng)[rank * accum:(rank + 1) * accum]
        batches = [dataset.get_batch(data.train, rows, c.block_size, device)
                   for rows in offsets]
        t0 = time.time()
        loss, bpb, stop = train_step(train_model, batches, scaler, autocast, accum, world,
                                     data.nbytes)
        if not math.isfinite(loss) and dtype != torch.float16:  # float16: the scaler skips it
            raise UserError(f"the loss became {loss} at step {step}: training stopped; the "
                            f"checkpoint in {c.out_dir} is intact. Try a lower --lr")
        optimizer_step(train_model, optimizers, scaler, c.grad_clip)
        step += 1
        dt = time.time() - t0  # the step alone: not evaluating, not saving
        if master and (step % c.log_interval == 0 or step == c.max_steps or stop):
            note = " (compiling)" if compiled and step == first_step + 1 else ""
            tokens_per_s, eta = c.total_batch_size / dt, dt * (c.max_steps - step) / 60
            lr = " ".join(f"{name} {o.param_groups[0]['lr']:.2e}" for name, o in optimizers.items())
            print(f"step {step}/{c.max_steps} | loss {loss:.4f} ({bpb:.3f} bits/byte) | lr {lr} | "
                  f"{dt * 1000:.0f} ms{note} | {tokens_per_s:,.0f} tok/s | ETA {eta:.1f} min",
                  flush=True)
            checkpoint.log_metrics(metrics, step, c.total_batch_size, train_loss=loss,
                                   train_bpb=bpb, lr=optimizers["adamw"].param_groups[0]["lr"],
                                   tokens_per_s=tokens_per_s)
        if stop:  # every process at this same step: save, then exit
            state = checkpoint.capture(**run, step=step, evaluated=False,
                                       best_val_loss=best_val_loss) if master else None
            checkpoint.save_and_exit(ckpt_path, state, world)
    devices.stop_processes(world)


# ----- Sampling, and measuring a model on text ---------------------------------------------------
@dataclass
class SampleConfig:
    prompt: str = "Once upon a time"  # the story's beginning
    out_dir: str = "out"             # where the checkpoint is
    init_from: str = ""              # a Hugging Face Gemma 3 directory to sample from instead
    num_samples: int = 1             # stories to generate
    max_new_tokens: int = 300        # tokens per story at most (fewer if the context is shorter)
    temperature: float = 0.8         # 0 is greedy; higher is more random
    top_k: int = 200                 # sample from the k likeliest tokens; 0 keeps them all
    seed: int = 1337                 # the same seed gives the same stories
    stop_at_eot: bool = True         # end a story at the end-of-text token
    compile: bool = False            # torch.compile the one-token step: ~20 s, then faster
    device: str = "auto"
    dtype: str = "auto"              # of the weights; auto: bfloat16 where it is native


def load_model(out_dir, init_from=""):
    """A model and its tokenizer: a Hugging Face directory's (init_from), else out_dir's run's."""
    if init_from:
        return Gemma.from_pretrained(init_from), load_tokenizer(init_from)
    state = checkpoint.load(out_dir)
    model = Gemma(GemmaConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model, load_tokenizer(os.path.join(out_dir, "tokenizer"))  # none: GPT-2's


def sample(c):
    check_numbers(c, may_be_zero=("temperature", "top_k", "seed"))
    device = devices.pick_device(c.device)
    dtype = devices.pick_dtype(c.dtype, device)  # the weights' dtype, for speed
    model, tokenizer = load_model(c.out_dir, c.init_from)
    model.to(device=device, dtype=dtype).eval()
    ids = tokenizer.encode_ordinary(c.prompt) or [tokenizer.eot_token]  # empty: a new story
    ids, new = dataset.fit_context(ids, c.max_new_tokens, model.config.max_position_embeddings)
    eot = tokenizer.eot_token if c.stop_at_eot else None
    for i in range(c.num_samples):
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character: 1+ tokens
        print(text.decode(b"".join(map(tokenizer.decode_single_token_bytes, ids))), end="")
        for token in model.stream(torch.tensor([ids], device=device), new, c.temperature,
                                  c.top_k or None, eot, seed=(c.seed + i) % 2 ** 64,
                                  compile=c.compile):  # any whole number is a seed
            if token.item() != eot:
                piece = tokenizer.decode_single_token_bytes(token.item())
                print(text.decode(piece), end="", flush=True)
        print(text.decode(b"", final=True) + "\n" + "-" * 40, flush=True)


@dataclass
class EvalConfig:
    files: tuple = ()               # the stories: .jsonl, .parquet or .txt files, as prepare.py's
    out_dir: str = "out"            # the run to measure
    init_from: str = ""             # or a Hugging Face Gemma 3 directory
    block_size: int = 1024          # tokens per window (at most the model's context)
    batch_size: int = 8             # windows per forward pass
    device: str = "auto"            # in float32 on any device: the loss as exact as it gets


def evaluate_files(c):
    """The loss on the stories of c.files in the model's own tokens, each on its own from its start
    (Gemma's <bos>, GPT-2's end-of-text), in windows that each begin with it (dataset.py)."""
    check_numbers(c)
    device = devices.pick_device(c.device)
    model, tokenizer = load_model(c.out_dir, c.init_from)
    block_size = min(c.block_size, model.config.max_position_embeddings)
    batches, stories, windows = dataset.story_batches(c.files, tokenizer, block_size, c.batch_size)
    nbytes = torch.from_numpy(token_bytes(tokenizer)).to(device)
    loss, bpb, perplexity = evaluate(model.to(device), batches, nbytes)
    print(f"loss {loss:.4f} nats/token, {bpb:.4f} bits/byte, perplexity {perplexity:.2f}, "
          f"{stories} stories in {windows} windows")


# ----- Command line: each option is a dataclass field; its comment is its --help ------------------
@dataclass
class ExportConfig:
    out_dir: str = "out"            # where the checkpoint is
    hf_dir: str = "hf"              # the Hugging Face model directory to write (see hf.py)
    gguf: str = ""                  # write this GGUF file instead: llama.cpp, Ollama, LM Studio
    gguf_type: str = "f16"          # the GGUF's weights: f32, f16, bf16 or q8_0 (see to_gguf.py)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Gemma 3 on TinyStories.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    options = dict(argument_default=argparse.SUPPRESS, allow_abbrev=False)
    train_parser = commands.add_parser("train", help="train a model", **options)
    add_flags(train_parser, TrainConfig)
    add_flags(train_parser.add_argument_group("model (the preset's unless given; 270m's shown)"),
              GemmaConfig, skip=("layer_types", "max_position_embeddings"))
    sampler = commands.add_parser("sample", help="write stories", **options)
    sampler.add_argument("prompt", nargs="?", help="the story's start (default: Once upon a time)")
    add_flags(sampler, SampleConfig, skip=("prompt",))
    add_flags(commands.add_parser("export", help="write a Hugging Face model or a GGUF file",
                                  **options), ExportConfig)
    add_flags(commands.add_parser("eval", help="a model's loss on stories", **options), EvalConfig)
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    try:
        if command == "train":
            train(*checkpoint.run_configs(args, GemmaConfig, TrainConfig, PRESETS))
        elif command == "sample":
            sample(replace(SampleConfig(), **args))
        elif command == "export":  # see hf.py and to_gguf.py
            c = replace(ExportConfig(), **args)
            if c.gguf:
                to_gguf.export(*load_model(c.out_dir), c.gguf, c.gguf_type)
            else:
                hf.export(*load_model(c.out_dir), c.hf_dir)
        elif command == "eval":
            evaluate_files(replace(EvalConfig(), **args))
    except UserError as e:
        print(f"gemma.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
