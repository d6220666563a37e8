"""
bench.py: how fast gemma.py is, against transformers' Gemma3ForCausalLM with the same weights, side by side in one
process on the same machine, with the same configuration, batch and dtype.

    python bench.py                              # every section: about 10 minutes on 2 CPU cores
    python bench.py --quick                      # fewer repeats and new tokens: under 2 minutes
    python bench.py --only train,generate        # some of: train, generate, sliding, decode, loss, prepare, finetune
    python bench.py --out results.json           # the measured numbers as JSON too, with the command and commit
    python bench.py --compile                    # also gemma.py's training step compiled (minutes on a CPU)
    python bench.py --device cuda --preset 270m --compile --dtype bfloat16,float16   # on a GPU (runs/gpu.sh)
    python bench.py --profile                    # instead of timing: where a 270m training step's time goes
    python bench.py --help                       # every option

The sections: 1. train: a training step (forward + backward; the optimizer's step, the same torch code for both, is
left out) in tokens/s and model FLOPs utilisation, against the matrix-multiply peak measured in the same run (and a
GPU's datasheet peak), with the peak memory on a GPU; 2. generate: greedy generation of 256 new tokens with the
key/value cache (eager, and compiled), without it, and with transformers' generate, whose outputs must be equal;
3. sliding: a sliding layer's forward + backward time as the sequence doubles (and FlexAttention's on a GPU);
4. decode: generation against the limit the memory bandwidth sets, float32 and bfloat16 weights; 5. loss: the peak
memory of a training step with Gemma's 262,144-word vocabulary, the chunked loss against the plain one; 6. prepare:
prepare.py's tokens/s against tiktoken's own multi-threaded encoding of the same text (tinystories/train.jsonl.gz);
7. finetune: a fine-tuning step of Gemma 3 270M's shape and 262,144-word vocabulary with AdamW, the embedding trained
and frozen (--freeze_embedding), each in a fresh process: tokens/s and peak memory.
Timings: warm-up runs, then the median of several, taken in turns (gemma.py, transformers, gemma.py, ...) so that
other processes on the machine slow both alike. The load average is printed: with other work on a 2-core machine,
two threads wait on each other at every operation, and `--threads 1` gives steadier figures. The assets the docs
quote come from runs/bench.sh; this gemma.py against an older revision's is tools/compare_revisions.py.
"""
import argparse, contextlib, io, json, os, shlex, statistics, sys, tempfile, time

import torch

import devices
from cli import UserError
from gemma import PRESETS, Block, Gemma, rotary_embedding
from tools import record

TINYSTORIES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinystories", "train.jsonl.gz")
TARGETS = dict(train_speedup=1.3, train_mfu=0.5, cache_speedup=5.0, generate_speedup=1.5, sliding_growth=2.3,
               prepare_fraction=0.8, gpu_train_mfu=0.45, gpu_train_speedup=2.0)
SHAPES = {"270m": (1, 1024), "small": (16, 256)}  # training batch x tokens on a CPU: longer than the window
GPU_SHAPES = {"270m": (16, 1024), "small": (64, 256)}  # on a GPU, batches that fill it
# Dense (no sparsity) tensor-core peaks from each card's datasheet, FLOP/s, by dtype; float32 is TF32 where the
# card has it (what torch uses for float32 matmuls with torch.backends.cuda.matmul.allow_tf32).
DATASHEET = {
    "H100 SXM": dict(bfloat16=989e12, float16=989e12, float32=494e12),
    "H100 PCIe": dict(bfloat16=756e12, float16=756e12, float32=378e12),
    "H200": dict(bfloat16=989e12, float16=989e12, float32=494e12),
    "A100": dict(bfloat16=312e12, float16=312e12, float32=156e12),
    "L4": dict(bfloat16=121e12, float16=121e12, float32=60e12),
    "T4": dict(float16=65e12, float32=8.1e12),  # no bfloat16 tensor cores
    "RTX 4090": dict(bfloat16=165e12, float16=165e12, float32=82.6e12),
}
DTOLERANCE = dict(float32=1e-4, bfloat16=5e-2, float16=1e-2)  # |logits difference| / max |logit| that is equal


def card(device_name):
    """The datasheet entry of a GPU from the name CUDA gives it, e.g. "NVIDIA H100 80GB HBM3" (the SXM card),
    "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "Tesla T4": (card, peaks) or ("unknown", {})."""
    name = device_name.upper()
    for key, test in [("H200", "H200" in name), ("H100 PCIe", "H100" in name and "PCIE" in name),
                      ("H100 SXM", "H100" in name), ("A100", "A100" in name), ("L4", name.endswith(" L4")),
                      ("T4", name.endswith("T4")), ("RTX 4090", "4090" in name)]:
        if test:
            return key, DATASHEET[key]
    return "unknown", {}


def synchronize(device):
    """Wait for the device's queued work: a GPU's calls return before its kernels finish."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """Bytes: the most the caching allocator held since the last reset (CUDA); None on a CPU, where no allocator keeps
    the count (the process's maximum resident size would include everything before)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def flops_per_token(c, T):
    """Model FLOPs of one training token (forward + backward = 3 x forward), as MFU counts them:
    6 x (the blocks' matmul weights + the tied output layer, vocab x hidden)
    + 12 x heads x head_dim x the keys a query sees, summed over layers and averaged over the T positions
      (QK^T and PV are 2 x heads x head_dim FLOPs per key each, forward; backward is twice the forward),
    where a query at position p sees min(window, p + 1) keys in a sliding layer and p + 1 in a full layer.
    Norms, rotations, the softmax and the embedding lookup are left out, as is customary."""
    d = c.hidden_size
    projections = d * c.head_dim * 2 * (c.num_attention_heads + c.num_key_value_heads)  # q and o, k and v
    matmul_weights = c.num_hidden_layers * (projections + 3 * d * c.intermediate_size) + c.vocab_size * d
    keys = sum(sum(min(c.sliding_window if t == "sliding_attention" else T, p + 1) for p in range(T)) / T
               for t in c.layer_types)
    return 6 * matmul_weights + 12 * keys * c.head_dim * c.num_attention_heads


def in_turns(runs, warmup, reps, device=torch.device("cpu")):
    """Call each function of `runs` (name -> function) `warmup` times, then `reps` times in turns; seconds per call,
    the device's queued work included. The order of the turns alternates (a b, b a, a b, ...): on a CPU a step that
    follows another can run faster or slower than the first (the allocator hands it memory the first one freed, with
    or without page faults), and alternating gives each the same share of both places."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for rep in range(reps):
        for name, run in (list(runs.items())[::-1] if rep % 2 else runs.items()):
            synchronize(device)
            t0 = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype, device=torch.device("cpu"), n=None):
    """One sample of the matrix-multiply peak in FLOP/s: the best of three n x n x n products."""
    # float16 matmuls on a CPU have no fast kernel: a small product, or the measurement takes minutes
    n = n or (8192 if device.type == "cuda" else 256 if dtype == torch.float16 else 2048)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def models(preset, device=torch.device("cpu"), seed=0):
    """gemma.py's model and transformers' with the same weights, in train mode; transformers with its sdpa attention."""
    from hf import to_transformers
    torch.manual_seed(seed)
    model = Gemma(PRESETS[preset][0]).train()
    reference = to_transformers(model)
    reference.set_attn_implementation("sdpa")  # its fastest attention, on a CPU and a GPU
    return model.to(device), reference.train().to(device)


def relative_difference(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# -----------------------------------------------------------------------------
# 1. Training step


def bench_train(preset, args, dtype, device=torch.device("cpu")):
    """Forward + backward of one batch (the optimizer's step, the same torch code for both, is left out), in turns:
    gemma.py, transformers with the same weights, gemma.py compiled (--compile) and the matmul peak. float16 runs
    with its gradient scaler, as training does; bfloat16 and float16 under autocast, float32 weights."""
    B, T = (GPU_SHAPES if device.type == "cuda" else SHAPES)[preset]
    model, reference = models(preset, device)
    torch.manual_seed(1)
    x, y = torch.randint(0, model.config.vocab_size, (2, B, T), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    with torch.no_grad(), autocast:
        parity = relative_difference(model(x)[0], reference(input_ids=x).logits)

    def step(m, hf=False):
        def run():
            with autocast:
                loss = m(input_ids=x, labels=y, use_cache=False).loss if hf else m(x, y)[1]
            scaler.scale(loss).backward()  # transformers shifts the labels itself: it scores T - 1 positions
            m.zero_grad(set_to_none=True)
        return run
    peaks = []
    runs = {"gemma.py": step(model), "transformers": step(reference, hf=True),
            "peak": lambda: peaks.append(matmul_peak(dtype, device))}  # the peak, in turns too
    if args.compile:
        runs["gemma.py compiled"] = step(torch.compile(model))
    times = in_turns(runs, warmup=1, reps=1 if args.quick else 4, device=device)
    peak, flops = statistics.median(peaks[-len(times["gemma.py"]):]), flops_per_token(model.config, T) * B * T
    name, datasheet = card(torch.cuda.get_device_name(device)) if device.type == "cuda" else ("cpu", {})
    result = dict(preset=preset, batch=B, tokens=T, dtype=str(dtype)[6:], device=str(device), card=name,
                  peak_flops=peak, datasheet_flops=datasheet.get(str(dtype)[6:]), flops_per_step=flops,
                  logits_relative_difference=parity, logits_equal=parity <= DTOLERANCE[str(dtype)[6:]])
    for name in runs:
        if name != "peak":
            t = statistics.median(times[name])
            reset_peak_memory(device)
            runs[name]()  # once more, for its peak memory alone
            result[name] = dict(seconds=t, tokens_per_s=B * T / t, mfu=flops / t / peak, all_seconds=times[name],
                                peak_memory=peak_memory(device))
            if result["datasheet_flops"]:
                result[name]["mfu_datasheet"] = flops / t / result["datasheet_flops"]
    result["speedup"] = result["gemma.py"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def profile_train(preset):
    """Where one training step's time goes, for both models: the share of the matrix multiplies (and whether the
    blocks' are the same calls: gemma.py's output layer goes a chunk of rows at a time, accumulating its weight's
    gradient with addmm_), of the attention kernels, and of the rest; then torch.profiler's table of the top
    operations."""
    B, T = SHAPES[preset]
    model, reference = models(preset)
    vocab, matmuls = model.config.vocab_size, ("aten::mm", "aten::addmm", "aten::addmm_")
    x, y = torch.randint(0, vocab, (2, B, T))
    steps = {"gemma.py": lambda: model(x, y)[1].backward(),
             "transformers": lambda: reference(input_ids=x, labels=y, use_cache=False).loss.backward()}
    mm_calls = {}
    for name, step in steps.items():
        step()  # warm-up
        with torch.profiler.profile(record_shapes=True) as prof:
            step()
        ops = prof.key_averages()
        total = sum(op.self_cpu_time_total for op in ops)
        mm = [op for op in ops if op.key in matmuls]
        attention = sum(op.self_cpu_time_total for op in ops if "scaled_dot_product" in op.key)
        mm_calls[name] = sorted((str(op.input_shapes), op.count) for op in prof.key_averages(group_by_input_shape=True)
                                if op.key in matmuls and vocab not in sum(op.input_shapes, []))  # the blocks'
        mm_time = sum(op.self_cpu_time_total for op in mm)
        print(f"\n{name}, {preset}, {B} x {T} tokens: aten::mm and addmm {sum(op.count for op in mm)} calls, "
              f"{mm_time / total:.0%} of the step; attention kernels {attention / total:.0%}; everything else "
              f"{1 - (mm_time + attention) / total:.0%}")
        print(ops.table(sort_by="self_cpu_time_total", row_limit=12))
        model.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
    print(f"the same matrix multiplies in the blocks (shapes and counts) in both: "
          f"{mm_calls['gemma.py'] == mm_calls['transformers']}")


# -----------------------------------------------------------------------------
# 2. Generation


def bench_generate(preset, new_tokens, reps, prompt_tokens=16, device=torch.device("cpu"), dtype=torch.float32):
    """Greedy generation of `new_tokens` tokens after a random prompt, weights in `dtype`: gemma.py with its cache (ring
    buffers for the sliding layers), eager and compiled, gemma.py recomputing the whole sequence every token, and
    transformers' generate with the same weights."""
    model, reference = models(preset, device)
    model, reference = model.to(dtype).eval(), reference.to(dtype).eval()
    torch.manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), device=device)
    outputs, peaks = {}, {}

    def generate(name, use_cache=True, tokens=new_tokens):
        def run():
            with torch.no_grad():
                if name == "transformers":  # eos_token_id=None: never stop early, as gemma.py does not
                    out = reference.generate(prompt, max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                                             pad_token_id=0)
                else:
                    out = model.generate(prompt, tokens, temperature=0, use_cache=use_cache, compile="compiled" in name)
            outputs[name] = out
        return run
    runs = {"gemma.py cache": generate("gemma.py cache"), "transformers": generate("transformers"),
            "gemma.py cache compiled": generate("gemma.py cache compiled")}
    t0 = time.perf_counter()  # compiling happens on the first call, and is timed apart from the generation
    in_turns({"gemma.py cache compiled": generate("gemma.py cache compiled", tokens=4)}, 1, 0, device)
    compile_seconds = time.perf_counter() - t0
    in_turns({n: generate(n, n != "gemma.py no cache", tokens=4)  # warm up the others
              for n in ("gemma.py cache", "transformers", "gemma.py no cache")}, 1, 0, device)
    times = in_turns(runs, warmup=0, reps=reps, device=device)
    times.update(in_turns({"gemma.py no cache": generate("gemma.py no cache", use_cache=False)}, 0, 1, device))
    for name in runs:  # once more each, for its peak memory alone
        reset_peak_memory(device)
        runs[name]()
        peaks[name] = peak_memory(device)
    reference_output = outputs["gemma.py cache"]
    result = dict(preset=preset, prompt_tokens=prompt_tokens, new_tokens=new_tokens, compile_seconds=compile_seconds,
                  dtype=str(dtype)[6:], device=str(device),
                  outputs_equal=all(torch.equal(o, reference_output) for o in outputs.values())
                  and reference_output.shape[1] == prompt_tokens + new_tokens)
    for name, t in times.items():
        result[name] = dict(seconds=statistics.median(t), tokens_per_s=new_tokens / statistics.median(t), all_seconds=t,
                            peak_memory=peaks.get(name))
    result["cache_speedup"] = result["gemma.py cache"]["tokens_per_s"] / result["gemma.py no cache"]["tokens_per_s"]
    result["speedup"] = result["gemma.py cache"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    result["compiled_speedup"] = result["gemma.py cache compiled"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


# -----------------------------------------------------------------------------
# 3. A sliding layer's cost as the sequence grows


def bench_sliding(preset, lengths, reps, device=torch.device("cpu"), dtype=torch.float32):
    """A sliding layer's forward + backward as the sequence doubles: the blocked attention (eager, any device) and, on
    CUDA, FlexAttention with its block mask (compiled). Both must grow linearly: their cost is T x window."""
    import speedups
    config = PRESETS[preset][0]
    torch.manual_seed(3)
    layer = Block(config, "sliding_attention").to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    compiled = torch.compile(layer) if device.type == "cuda" else None  # FlexAttention has no CPU backward

    def forward_backward(T, flex=False):
        x = torch.randn(1, T, config.hidden_size, requires_grad=True, device=device)
        cos, sin = rotary_embedding(torch.arange(T, device=device), config.head_dim, config.rope_local_base_freq)
        mask = speedups.sliding_block_mask(T, config.sliding_window, device) if flex else None

        def run():
            with autocast:
                out = compiled(x, cos, sin, mask=mask) if flex else layer(x, cos, sin)
            out.float().sum().backward()
            layer.zero_grad(set_to_none=True)
        return run
    runs = {("blocked", T): forward_backward(T) for T in lengths}
    if compiled is not None:
        runs.update({("flex", T): forward_backward(T, flex=True) for T in lengths})
    times = in_turns(runs, warmup=1, reps=reps, device=device)
    result = dict(preset=preset, window=config.sliding_window, device=str(device), dtype=str(dtype)[6:])
    for kernel in sorted({k for k, _ in runs}):
        seconds = {T: statistics.median(t) for (k, T), t in times.items() if k == kernel}
        result[kernel] = dict(seconds=seconds, growth={T: seconds[T] / seconds[T // 2] for T in seconds
                                                       if T // 2 in seconds})
    result["seconds"], result["growth"] = result["blocked"]["seconds"], result["blocked"]["growth"]
    return result


# -----------------------------------------------------------------------------
# 4. Generation against the memory bandwidth: one token reads every weight once


def memory_bandwidth(device, megabytes=512, reps=5):
    """Bytes per second of a large copy (each byte read once and written once), the best of `reps`."""
    x = torch.ones(megabytes * 2 ** 20 // 4, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        y.copy_(x)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * x.element_size() / best


def bench_decode(preset, new_tokens, reps, device=torch.device("cpu"), dtypes=(torch.float32, torch.bfloat16)):
    """Greedy generation with the cache, weights in float32 and in bfloat16, eager and compiled, as a fraction of the
    limit the memory sets: weight bytes x tokens/s / bandwidth (one token reads every weight once)."""
    bandwidth = memory_bandwidth(device)
    result = dict(preset=preset, device=str(device), new_tokens=new_tokens, bandwidth=bandwidth, runs={})
    torch.manual_seed(0)
    base = Gemma(PRESETS[preset][0]).eval()
    prompt = torch.randint(0, base.config.vocab_size, (1, 16), device=device)
    runs, outputs = {}, {}
    for dtype in dtypes:
        model = Gemma(base.config).to(device, dtype).eval()
        model.load_state_dict(base.state_dict())
        for compiled in (False, True):
            name = f"{str(dtype)[6:]}{' compiled' if compiled else ''}"

            def run(model=model, compiled=compiled, name=name):
                with torch.no_grad():
                    outputs[name] = model.generate(prompt, new_tokens, temperature=0, compile=compiled)
            runs[name] = run
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            result["runs"][name] = dict(dtype=str(dtype)[6:], compiled=compiled, weight_bytes=weight_bytes)
    times = in_turns(runs, warmup=1, reps=reps, device=device)
    for name, t in times.items():
        r = result["runs"][name]
        r.update(tokens_per_s=new_tokens / statistics.median(t), all_seconds=t)
        r["fraction_of_bandwidth"] = r["weight_bytes"] * r["tokens_per_s"] / bandwidth
    speed = {name: r["tokens_per_s"] for name, r in result["runs"].items()}
    result["bfloat16_speedup"] = max(speed.get("bfloat16", 0), speed.get("bfloat16 compiled", 0)) / max(
        speed.get("float32", 1e-9), speed.get("float32 compiled", 1e-9))
    return result


# -----------------------------------------------------------------------------
# 5. The memory of a training step with Gemma's own vocabulary: the chunked loss against the plain one

LOSS_VOCAB = 262_144  # Gemma 3's vocabulary (gemma.py trains with GPT-2's 50,257 by default)
LOSS_SHAPES = {"cpu": (1, 1024), "cuda": (8, 1024)}  # batch x tokens of the loss section


def resident_bytes(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, in bytes, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def step_memory(chunked, vocab_size, batch, tokens, device="cpu", dtype="float32", layers=2):
    """One training step (forward + backward) in this process, of 270m's width with `layers` layers and a
    `vocab_size`-word vocabulary, on a random batch, with the chunked loss (gemma.SPEEDUPS) or the plain path's
    F.cross_entropy: the memory the step adds at its peak, in bytes, the loss and the seconds. On CUDA the caching
    allocator's count (max_memory_allocated above what was allocated before); on a CPU the resident size's growth
    (VmHWM, reset before the step, minus VmRSS before): every page the step wrote and held at its peak. Buffers over
    32 MB are fresh mappings, returned when freed, so those it had freed by then do not count."""
    import gemma
    from dataclasses import replace
    gemma.SPEEDUPS, device = chunked, torch.device(device)
    torch.manual_seed(0)  # the same weights and batch in both processes
    config = replace(PRESETS["270m"][0], vocab_size=vocab_size, num_hidden_layers=layers, layer_types=None)
    model = Gemma(config).to(device)
    x, y = torch.randint(0, vocab_size, (2, batch, tokens), device=device)
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the resident size now
        before = resident_bytes("VmRSS")
    t0 = time.perf_counter()
    with autocast:
        _, loss = model(x, y)
    loss.backward()
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_bytes("VmHWM")
    return dict(peak_memory=peak - before, loss=loss.item(), seconds=seconds)


def in_fresh_process(name, function, *args):
    """bench.function(*args) run in a new Python process, so that its peak memory is its own and nothing an
    earlier measurement left in memory counts: the dict it returns. args: plain values (their repr is code)."""
    import subprocess
    code = f"import bench, json; print(json.dumps(bench.{function}({', '.join(map(repr, args))})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {name} step failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def bench_loss_memory(device=torch.device("cpu"), dtype="float32", vocab_size=None, shape=None, layers=2):
    """The peak memory of one training step with Gemma's 262,144-word vocabulary, the chunked loss
    (speedups.linear_cross_entropy) against the plain path's F.cross_entropy (gemma.SPEEDUPS = False, so attention
    is the plain one too, a few MB), side by side: the same weights and batch, each in a fresh process, so that
    nothing one leaves in memory counts for the other (see step_memory)."""
    vocab_size, (B, T) = vocab_size or LOSS_VOCAB, shape or LOSS_SHAPES[device.type]
    result = dict(vocab_size=vocab_size, batch=B, tokens=T, layers=layers, device=str(device), dtype=dtype,
                  logits_bytes=B * T * vocab_size * 4)  # one float32 copy of the batch's logits
    for name, chunked in (("plain", False), ("chunked", True)):
        result[name] = in_fresh_process(name, "step_memory", chunked, vocab_size, B, T, str(device), dtype, layers)
    result["ratio"] = result["plain"]["peak_memory"] / result["chunked"]["peak_memory"]
    result["loss_difference"] = abs(result["plain"]["loss"] - result["chunked"]["loss"])
    return result


# -----------------------------------------------------------------------------
# 7. A fine-tuning step of Gemma 3 270M with its own vocabulary: the embedding trained, and frozen

FINETUNE_SHAPES = {"cpu": (4, 256), "cuda": (8, 1024)}  # batch x tokens of the fine-tuning section


def finetune_step(frozen, vocab_size, batch, tokens, device="cpu", dtype="bfloat16", steps=4):
    """Training steps (forward, backward, AdamW's step) in this process of the 270m shape with a
    `vocab_size`-word vocabulary (random weights: a step's time does not depend on their values), the
    embedding, which is also the output layer, frozen or trained: the median seconds a step after the
    first, and the process's peak memory (on a CPU its peak resident size, weights and all; on CUDA the
    caching allocator's peak)."""
    import gemma
    from dataclasses import replace
    device = torch.device(device)
    torch.manual_seed(0)
    model = Gemma(replace(PRESETS["270m"][0], vocab_size=vocab_size)).to(device).train()
    model.embed_tokens.weight.requires_grad_(not frozen)
    optimizers = gemma.make_optimizers(model, gemma.TrainConfig(lr=1e-5), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    x, y = torch.randint(0, vocab_size, (2, batch, tokens), device=device)
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        gemma.optimizer_step(model, optimizers, scaler, 1.0)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_bytes("VmHWM")
    return dict(seconds=statistics.median(times[1:]), peak_memory=peak, loss=loss.item())


def bench_finetune(device=torch.device("cpu"), dtype="bfloat16", vocab_size=None, shape=None, steps=4):
    """A fine-tuning step of Gemma 3 270M's shape and vocabulary (262,144 words), the embedding
    trained against frozen (--freeze_embedding), each in a fresh process so that each peak is its own:
    tokens/s and peak memory."""
    vocab_size, (B, T) = vocab_size or LOSS_VOCAB, shape or FINETUNE_SHAPES[device.type]
    result = dict(vocab_size=vocab_size, batch=B, tokens=T, device=str(device), dtype=dtype)
    for name, frozen in (("trained", False), ("frozen", True)):
        result[name] = in_fresh_process(name, "finetune_step", frozen, vocab_size, B, T, str(device), dtype, steps)
        result[name]["tokens_per_s"] = B * T / result[name]["seconds"]
    result["speedup"] = result["frozen"]["tokens_per_s"] / result["trained"]["tokens_per_s"]
    return result


# -----------------------------------------------------------------------------
# 6. prepare.py's tokenizer throughput


def bench_prepare(path, reps):
    from dataset import read_stories
    from prepare import tokenize_stories
    from tokenizer import gpt2_tokenizer
    enc, threads = gpt2_tokenizer(), os.cpu_count()
    texts = [t for t in read_stories([path]) if t]
    counts = {}

    def tiktoken_alone():  # the ceiling: stories already in memory, tokens kept as Python lists
        counts["tiktoken"] = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=threads))) + len(texts) - 1

    def prepare_py():  # the whole step: read the JSON lines, tokenize, write uint16 to a file
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stderr(io.StringIO()):  # no progress bar
            counts["prepare.py"] = tokenize_stories(read_stories([path]), os.path.join(d, "train.bin"), enc, threads)[0]
    times = in_turns({"prepare.py": prepare_py, "tiktoken": tiktoken_alone}, warmup=1, reps=reps)
    result = dict(file=path, megabytes=os.path.getsize(path) / 1e6, stories=len(texts), tokens=counts["prepare.py"],
                  threads=threads, same_tokens=counts["prepare.py"] == counts["tiktoken"])
    for name, t in times.items():
        result[name] = dict(seconds=statistics.median(t), tokens_per_s=counts[name] / statistics.median(t), all_seconds=t)
    result["fraction"] = result["prepare.py"]["tokens_per_s"] / result["tiktoken"]["tokens_per_s"]
    return result


# -----------------------------------------------------------------------------
# Report


def mark(value, target, at_most=False):
    ok = value <= target if at_most else value >= target
    return f"{'<=' if at_most else '>='} {target:g} {'pass' if ok else 'MISS'}"


def machine(device=torch.device("cpu")):
    """tools/record.py's machine (CPU model, cores, Python, torch, native bfloat16), and what a benchmark also needs:
    torch's threads, transformers' version, the GPU and its card, and the load average before the run."""
    import transformers
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(record.machine(), torch_threads=torch.get_num_threads(), transformers=transformers.__version__,
                gpu=gpu, card=card(gpu)[0] if gpu else None,
                load_average_before=os.getloadavg()[0])  # other processes' work: above 0.5, expect noisier figures


def megabytes(n):
    return "" if n is None else f"{n / 2 ** 20:,.0f} MB"


def table(header, rows, note=""):
    """A Markdown table, then a note: the first column and a target column aligned left, the figures right."""
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" if i == 0 or cell == "target" else "---:" for i, cell in enumerate(header)) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{note}\n" if note else "")


def train_rows(r):
    """The training section's rows for one preset and dtype: tokens/s, MFU, peak memory, compiled."""
    g, h = r["gemma.py"], r["transformers"]
    gpu = r["device"].startswith("cuda")
    what = f"{r['preset']}, {r['batch']} x {r['tokens']} tokens, {r['dtype']}, {r['device']}"
    speed_target, mfu_target = (TARGETS["gpu_train_speedup"], TARGETS["gpu_train_mfu"]) if gpu else (
        TARGETS["train_speedup"], TARGETS["train_mfu"])
    best = max((r[n] for n in ("gemma.py", "gemma.py compiled") if n in r), key=lambda x: x["tokens_per_s"])
    rows = [[f"{what}: tokens/s", f"{g['tokens_per_s']:,.0f}", f"{h['tokens_per_s']:,.0f}", f"{r['speedup']:.2f} x",
             mark(best["tokens_per_s"] / h["tokens_per_s"], speed_target)],
            [f"{what}: MFU of the measured matmul peak", f"{g['mfu']:.0%}", f"{h['mfu']:.0%}", "",
             mark(best["mfu"], mfu_target) if r["preset"] == "270m" and not gpu else ""]]
    if r["datasheet_flops"]:
        rows.append([f"{what}: MFU of the {r['card']}'s datasheet peak", f"{g['mfu_datasheet']:.0%}",
                     f"{h['mfu_datasheet']:.0%}", "", mark(best["mfu_datasheet"], mfu_target)
                     if r["preset"] == "270m" else ""])
    if g["peak_memory"] is not None:
        rows.append([f"{what}: peak memory", megabytes(g["peak_memory"]), megabytes(h["peak_memory"]), "", ""])
    if "gemma.py compiled" in r:
        c = r["gemma.py compiled"]
        rows.append([f"{what}: gemma.py compiled, tokens/s (MFU)", f"{c['tokens_per_s']:,.0f} ({c['mfu']:.0%})", "",
                     f"{c['tokens_per_s'] / h['tokens_per_s']:.2f} x", ""])
    return rows


def report(results):
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['gpu'] or 'no GPU'}, torch "
          f"{m['torch']}, transformers {m['transformers']}, Python {m['python']}; load average "
          f"{m['load_average_before']:.1f} before, {results['load_average_after']:.1f} after (other processes: 0 on an "
          f"idle machine)\n")
    if "train" in results:
        notes = [f"{r['preset']}, {r['dtype']}: {r['flops_per_step'] / 1e9:,.1f} GFLOP a step; measured matmul peak "
                 f"{r['peak_flops'] / 1e12:,.2f} TFLOP/s" + (f", datasheet {r['datasheet_flops'] / 1e12:,.0f} TFLOP/s "
                                                            f"({r['card']})" if r["datasheet_flops"] else "")
                 + f"; logits equal within the dtype's tolerance: {r['logits_equal']} "
                 f"(relative difference {r['logits_relative_difference']:.1e})" for r in results["train"]]
        table(["training step (forward + backward)", "gemma.py", "transformers (sdpa)", "gemma.py / transformers",
               "target"], [row for r in results["train"] for row in train_rows(r)], "\n".join(notes))
    for r in results.get("generate", []):
        speed = {name: r[name]["tokens_per_s"] for name in ("gemma.py cache", "gemma.py no cache",
                                                             "gemma.py cache compiled", "transformers")}
        memory = r["gemma.py cache"]["peak_memory"]
        table([f"greedy generation, {r['preset']}, {r['prompt_tokens']} prompt + {r['new_tokens']} new tokens, "
               f"{r['dtype']} weights, {r['device']}", "tokens/s", "ratio", "target"],
              [["gemma.py with the cache", f"{speed['gemma.py cache']:.1f}", "", ""],
               ["gemma.py without it", f"{speed['gemma.py no cache']:.1f}",
                f"cache / no cache {r['cache_speedup']:.1f} x", mark(r["cache_speedup"], TARGETS["cache_speedup"])],
               ["gemma.py with the cache, compiled (generate(..., compile=True))",
                f"{speed['gemma.py cache compiled']:.1f}", "", ""],
               ["transformers generate (sdpa, its cache)", f"{speed['transformers']:.1f}",
                f"gemma.py / transformers {r['speedup']:.2f} x; compiled {r['compiled_speedup']:.2f} x",
                mark(max(r["speedup"], r["compiled_speedup"]), TARGETS["generate_speedup"])]],
              f"outputs equal (all four, {r['new_tokens']} tokens each): {r['outputs_equal']}; compiling took "
              f"{r['compile_seconds']:.0f} s, once, before the timed runs"
              + (f"; peak memory gemma.py {megabytes(memory)}, transformers "
                 f"{megabytes(r['transformers']['peak_memory'])}" if memory is not None else ""))
    r = results.get("sliding", {})
    for kernel in ("blocked", "flex"):
        if kernel in r:
            seconds, growths = r[kernel]["seconds"], r[kernel]["growth"]
            table([f"a sliding layer ({r['preset']}, window {r['window']}, {r['device']}), forward + backward, "
                   f"{kernel}", "seconds", "ms per 1k tokens", "growth from T / 2", "target"],
                  [[f"T = {T}", f"{s:.3f}", f"{s / T * 1e6:.1f}", f"{growths[T]:.2f} x" if T in growths else "",
                    mark(growths[T], TARGETS["sliding_growth"], at_most=True) if T == max(seconds) else ""]
                   for T, s in seconds.items()])
    if "decode" in results:
        r = results["decode"]
        table([f"greedy generation against the memory bandwidth ({r['preset']}, {r['device']}, "
               f"{r['bandwidth'] / 1e9:,.1f} GB/s measured)", "weights", "tokens/s", "fraction of the limit"],
              [[name, megabytes(x["weight_bytes"]), f"{x['tokens_per_s']:.1f}", f"{x['fraction_of_bandwidth']:.0%}"]
               for name, x in r["runs"].items()],
              f"bfloat16 weights / float32 weights, best of eager and compiled: {r['bfloat16_speedup']:.2f} x")
    if "loss" in results:
        r = results["loss"]
        table([f"one training step, {r['vocab_size']:,}-word vocabulary, 270m's width, {r['layers']} layers, "
               f"{r['batch']} x {r['tokens']} tokens, {r['dtype']}, {r['device']}", "peak memory", "loss", "seconds"],
              [[label, megabytes(r[name]["peak_memory"]), f"{r[name]['loss']:.4f}", f"{r[name]['seconds']:.2f}"]
               for name, label in (("plain", "plain F.cross_entropy (gemma.SPEEDUPS = False)"),
                                   ("chunked", "chunked (speedups.linear_cross_entropy)"))],
              f"plain / chunked: {r['ratio']:.1f} x the peak; one float32 copy of the batch's logits is "
              f"{megabytes(r['logits_bytes'])}; the losses differ by {r['loss_difference']:.1e}")
    if "prepare" in results:
        r = results["prepare"]
        table([f"tokenizing {os.path.basename(r['file'])} ({r['megabytes']:.1f} MB, {r['stories']:,} stories, "
               f"{r['tokens']:,} tokens, {r['threads']} threads)", "tokens/s", "ratio", "target"],
              [["prepare.py (read, tokenize, write)", f"{r['prepare.py']['tokens_per_s']:,.0f}",
                f"{r['fraction']:.0%} of tiktoken", mark(r["fraction"], TARGETS["prepare_fraction"])],
               ["tiktoken encode_ordinary_batch alone (the ceiling)", f"{r['tiktoken']['tokens_per_s']:,.0f}", "",
                ""]],
              f"same tokens: {r['same_tokens']}")
    if "finetune" in results:
        r = results["finetune"]
        table([f"a fine-tuning step (forward, backward, AdamW), 270m with {r['vocab_size']:,} words, "
               f"{r['batch']} x {r['tokens']} tokens, {r['dtype']}, {r['device']}", "tokens/s", "peak memory"],
              [[label, f"{r[name]['tokens_per_s']:,.0f}", megabytes(r[name]["peak_memory"])]
               for name, label in (("trained", "the embedding trained"),
                                   ("frozen", "the embedding frozen (--freeze_embedding)"))],
              f"frozen / trained: {r['speedup']:.1f} x the tokens/s")


SECTIONS = ("train", "generate", "sliding", "decode", "loss", "prepare", "finetune")


def main(argv=None):
    parser = argparse.ArgumentParser(description="gemma.py against transformers, side by side.", allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and new tokens: a short run")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    parser.add_argument("--out", help="also write the measured numbers to this JSON file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, or auto (CUDA, then MPS, then the "
                        "CPU) (default: cpu)")
    parser.add_argument("--preset", choices=[name for name, (model, _) in PRESETS.items() if model], help="train and generate with this preset only, and slide "
                        "with it (default: train and generate with both; slide with 270m)")
    parser.add_argument("--dtype", help="comma-separated training dtypes (autocast): float32, bfloat16, float16 "
                        "(default: float32 on a CPU; bfloat16,float16 on a GPU); generation uses the first")
    parser.add_argument("--compile", action="store_true", help="also time gemma.py's training step compiled")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--data", default=TINYSTORIES, help="the stories prepare.py is timed on (default: the "
                        "excerpt's tinystories/train.jsonl.gz)")
    parser.add_argument("--profile", action="store_true", help="instead of timing: where a training step's time goes "
                        "(torch.profiler), for both models, on --preset (default 270m)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.profile:
        return profile_train(args.preset or "270m")
    sections = args.only.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown section(s) in --only: {', '.join(sorted(unknown))}")
    try:
        device = devices.pick_device(args.device)
    except UserError as e:
        parser.error(str(e))
    dtypes = (args.dtype or ("bfloat16,float16" if device.type == "cuda" else "float32")).split(",")
    if unknown := set(dtypes) - set(DTOLERANCE):
        parser.error(f"unknown dtype(s) in --dtype: {', '.join(sorted(unknown))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = dict(command=shlex.join(["python", "bench.py", *argv]), **record.commit(), machine=machine(device))
    t0 = time.time()
    presets = [args.preset] if args.preset else ["270m", "small"]
    if "train" in sections:
        results["train"] = [bench_train(p, args, getattr(torch, d), device) for p in presets for d in dtypes]
    if "generate" in sections:
        results["generate"] = [bench_generate(p, 32 if args.quick else 256, 1 if args.quick else 3, device=device,
                                              dtype=getattr(torch, dtypes[0])) for p in presets]
    if "sliding" in sections:
        lengths = [256, 512] if args.quick and device.type == "cpu" else [1024, 2048, 4096, 8192]
        results["sliding"] = bench_sliding(args.preset or "270m", lengths, 1 if args.quick else 3, device,
                                           getattr(torch, dtypes[0]))
    if "decode" in sections:
        results["decode"] = bench_decode(args.preset or "270m", 16 if args.quick else 64, 1 if args.quick else 3,
                                         device)
    if "loss" in sections and (device.type == "cuda" or os.path.exists("/proc/self/clear_refs")):  # a CPU: Linux
        results["loss"] = bench_loss_memory(device, dtypes[0])
    if "prepare" in sections:
        results["prepare"] = bench_prepare(args.data, 2 if args.quick else 5)
    if "finetune" in sections and (device.type == "cuda" or os.path.exists("/proc/self/status")):
        finetune_dtype = "bfloat16" if devices.pick_dtype("auto", device) == torch.bfloat16 else dtypes[0]
        results["finetune"] = bench_finetune(device, finetune_dtype, steps=2 if args.quick else 4)
    results["seconds"], results["load_average_after"] = time.time() - t0, os.getloadavg()[0]
    report(results)
    print(f"({results['seconds']:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
