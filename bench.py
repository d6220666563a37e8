"""
bench.py: how fast gemma.py is, against transformers' Gemma3ForCausalLM with the same weights, side by side in one
process on the same machine, with the same configuration, batch and dtype.

    python bench.py                              # everything: about 10 minutes on 2 CPU cores (the README's table)
    python bench.py --quick                      # fewer repeats and new tokens: under 2 minutes
    python bench.py --only train,generate        # some sections: train, generate, sliding, prepare
    python bench.py --out results.json           # the measured numbers as JSON too
    python bench.py --compile                    # also gemma.py under torch.compile (minutes of compiling on a CPU)
    python bench.py --profile                    # where a 270m training step's time goes, in both models
    python bench.py --baseline OLD.py            # this gemma.py against another revision's, in turns
    python bench.py --help                       # every option

Sections: 1. a training step (forward + backward; the optimizer's step, the same torch code for both, is left out) in
tokens/s and model FLOPs utilisation, against the matrix-multiply peak measured in the same run; 2. greedy generation
of 256 new tokens with the key/value cache (eager, and compiled), without it, and with transformers' generate, whose
outputs must be equal; 3. a sliding layer's forward + backward time as the sequence
doubles; 4. prepare.py's tokens/s against tiktoken's own multi-threaded encoding of the same text.
Timings: warm-up runs, then the median of several, taken in turns (gemma.py, transformers, gemma.py, ...) so that
other processes on the machine slow both alike. The load average is printed: with other work on a 2-core machine,
two threads wait on each other at every operation, and `--threads 1` gives steadier figures.
"""
import argparse, contextlib, io, json, os, platform, statistics, tempfile, time

import torch

from gemma import PRESETS, Block, Gemma, rotary_embedding

TINYSTORIES = "/work/shared/data/tinystories/train.jsonl"  # read in place, never copied into the repository
TARGETS = dict(train_speedup=1.3, train_mfu=0.5, cache_speedup=5.0, generate_speedup=1.5, sliding_growth=2.3,
               prepare_fraction=0.8)
SHAPES = {"270m": (1, 1024), "small": (16, 256)}  # training batch x tokens: longer than the window, so layers slide


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


def in_turns(runs, warmup, reps):
    """Call each function of `runs` (name -> function) `warmup` times, then `reps` times in turns; seconds per call.
    The order of the turns alternates (a b, b a, a b, ...): on a CPU a step that follows another can run faster or
    slower than the first (the allocator hands it memory the first one freed, with or without page faults), and
    alternating gives each the same share of both places."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for rep in range(reps):
        for name, run in (list(runs.items())[::-1] if rep % 2 else runs.items()):
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(dtype, n=2048):
    """One sample of the matrix-multiply peak in FLOP/s: the best of three n x n x n products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def models(preset, seed=0):
    """gemma.py's model and transformers' with the same weights, in train mode; transformers with its sdpa attention."""
    from hf import to_transformers
    torch.manual_seed(seed)
    model = Gemma(PRESETS[preset][0]).train()
    reference = to_transformers(model)
    reference.set_attn_implementation("sdpa")  # its fastest attention on a CPU
    return model, reference.train()


# -----------------------------------------------------------------------------
# 1. Training step


def bench_train(preset, args, dtype):
    B, T = SHAPES[preset]
    model, reference = models(preset)
    torch.manual_seed(1)
    x, y = torch.randint(0, model.config.vocab_size, (2, B, T))
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        parity = (model(x)[0].float() - reference(input_ids=x).logits.float()).abs().max().item()

    def step(m, hf=False):
        def run():
            with autocast:
                loss = m(input_ids=x, labels=y, use_cache=False).loss if hf else m(x, y)[1]
            loss.backward()  # transformers shifts the labels itself: it scores T - 1 positions, gemma.py T
            m.zero_grad(set_to_none=True)
        return run
    peaks = []
    runs = {"gemma.py": step(model), "transformers": step(reference, hf=True),
            "peak": lambda: peaks.append(matmul_peak(dtype))}  # the peak, in turns too
    if args.compile:
        runs["gemma.py compiled"] = step(torch.compile(model))
    times = in_turns(runs, warmup=1, reps=1 if args.quick else 4)
    peak, flops = statistics.median(peaks[-len(times["gemma.py"]):]), flops_per_token(model.config, T) * B * T
    result = dict(preset=preset, batch=B, tokens=T, dtype=str(dtype)[6:], peak_flops=peak, flops_per_step=flops,
                  max_logit_difference=parity)
    for name in runs:
        if name != "peak":
            t = statistics.median(times[name])
            result[name] = dict(seconds=t, tokens_per_s=B * T / t, mfu=flops / t / peak, all_seconds=times[name])
    result["speedup"] = result["gemma.py"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def profile_train(preset):
    """Where one training step's time goes, for both models: the share of the matrix multiplies (and whether they are
    the same calls), of the attention kernels, and of the rest; then torch.profiler's table of the top operations."""
    B, T = SHAPES[preset]
    model, reference = models(preset)
    x, y = torch.randint(0, model.config.vocab_size, (2, B, T))
    steps = {"gemma.py": lambda: model(x, y)[1].backward(),
             "transformers": lambda: reference(input_ids=x, labels=y, use_cache=False).loss.backward()}
    mm_calls = {}
    for name, step in steps.items():
        step()  # warm-up
        with torch.profiler.profile(record_shapes=True) as prof:
            step()
        ops = prof.key_averages()
        total = sum(op.self_cpu_time_total for op in ops)
        mm = [op for op in ops if op.key == "aten::mm"]
        attention = sum(op.self_cpu_time_total for op in ops if "scaled_dot_product" in op.key)
        mm_calls[name] = sorted((str(op.input_shapes), op.count)
                                for op in prof.key_averages(group_by_input_shape=True) if op.key == "aten::mm")
        mm_time = sum(op.self_cpu_time_total for op in mm)
        print(f"\n{name}, {preset}, {B} x {T} tokens: aten::mm {sum(op.count for op in mm)} calls, {mm_time / total:.0%} "
              f"of the step; attention kernels {attention / total:.0%}; everything else "
              f"{1 - (mm_time + attention) / total:.0%}")
        print(ops.table(sort_by="self_cpu_time_total", row_limit=12))
        model.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
    print(f"the same matrix multiplies (shapes and counts) in both: {mm_calls['gemma.py'] == mm_calls['transformers']}")


# -----------------------------------------------------------------------------
# 2. Generation


def bench_generate(preset, new_tokens, reps, prompt_tokens=16):
    """Greedy generation of `new_tokens` tokens after a random prompt: gemma.py with its cache (ring buffers for the
    sliding layers), gemma.py recomputing the whole sequence every token, and transformers' generate."""
    model, reference = models(preset)
    model.eval(), reference.eval()
    torch.manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens))
    outputs = {}

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
    in_turns({"gemma.py cache compiled": generate("gemma.py cache compiled", tokens=4)}, 1, 0)
    compile_seconds = time.perf_counter() - t0
    in_turns({n: generate(n, n != "gemma.py no cache", tokens=4)  # warm up the others
              for n in ("gemma.py cache", "transformers", "gemma.py no cache")}, 1, 0)
    times = in_turns(runs, warmup=0, reps=reps)
    times.update(in_turns({"gemma.py no cache": generate("gemma.py no cache", use_cache=False)}, 0, 1))  # long: once
    reference_output = outputs["gemma.py cache"]
    result = dict(preset=preset, prompt_tokens=prompt_tokens, new_tokens=new_tokens, compile_seconds=compile_seconds,
                  outputs_equal=all(torch.equal(o, reference_output) for o in outputs.values())
                  and reference_output.shape[1] == prompt_tokens + new_tokens)
    for name, t in times.items():
        result[name] = dict(seconds=statistics.median(t), tokens_per_s=new_tokens / statistics.median(t), all_seconds=t)
    result["cache_speedup"] = result["gemma.py cache"]["tokens_per_s"] / result["gemma.py no cache"]["tokens_per_s"]
    result["speedup"] = result["gemma.py cache"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    result["compiled_speedup"] = result["gemma.py cache compiled"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


# -----------------------------------------------------------------------------
# 3. A sliding layer's cost as the sequence grows


def bench_sliding(preset, lengths, reps):
    config = PRESETS[preset][0]
    torch.manual_seed(3)
    layer = Block(config, "sliding_attention")

    def forward_backward(T):
        x = torch.randn(1, T, config.hidden_size, requires_grad=True)
        cos, sin = rotary_embedding(torch.arange(T), config.head_dim, config.rope_local_base_freq)

        def run():
            layer(x, cos, sin).sum().backward()
            layer.zero_grad(set_to_none=True)
        return run
    times = in_turns({T: forward_backward(T) for T in lengths}, warmup=1, reps=reps)
    seconds = {T: statistics.median(t) for T, t in times.items()}
    return dict(preset=preset, window=config.sliding_window, seconds=seconds,
                growth={T: seconds[T] / seconds[T // 2] for T in lengths if T // 2 in seconds})


# -----------------------------------------------------------------------------
# 4. prepare.py's tokenizer throughput


def bench_prepare(path, reps):
    from prepare import gpt2_tokenizer, read_stories, tokenize_stories
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
# 5. Before and after a change: this gemma.py against another revision's, in turns, in one process


def load_baseline(path):
    """Another revision's gemma.py (from `git show REV:gemma.py > FILE`), as a module of its own."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gemma_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_baseline(path, presets, reps, new_tokens):
    """A training step (forward + backward) and greedy generation with the cache, for this gemma.py
    and the baseline with the same weights, taken in turns; the outputs must be equal."""
    baseline, results = load_baseline(path), []
    for preset in presets:
        B, T = SHAPES[preset]
        torch.manual_seed(0)
        ours = Gemma(PRESETS[preset][0]).train()
        theirs = baseline.Gemma(baseline.PRESETS[preset][0]).train()
        theirs.load_state_dict(ours.state_dict())  # the same module names: the same weights
        x, y = torch.randint(0, ours.config.vocab_size, (2, B, T))
        with torch.no_grad():
            same_logits = (ours(x)[0] - theirs(x)[0]).abs().max().item()
        prompt = x[:1, :16]
        outputs = {}

        def step(m):
            def run():
                m(x, y)[1].backward()
                m.zero_grad(set_to_none=True)
            return run

        def generate(name, m):
            def run():
                outputs[name] = m.generate(prompt, new_tokens, temperature=0)
            return run
        train_times = in_turns({"after": step(ours), "before": step(theirs)}, warmup=1, reps=reps)
        ours.eval(), theirs.eval()
        generate_times = in_turns({"after": generate("after", ours), "before": generate("before", theirs)},
                                  warmup=1, reps=reps)
        result = dict(preset=preset, batch=B, tokens=T, new_tokens=new_tokens, max_logit_difference=same_logits,
                      greedy_tokens_equal=torch.equal(outputs["after"], outputs["before"]))
        for what, times, work in (("train", train_times, B * T), ("generate", generate_times, new_tokens)):
            for name, t in times.items():
                result[f"{what} {name}"] = dict(tokens_per_s=work / statistics.median(t), all_seconds=t)
            result[f"{what} after / before"] = (result[f"{what} after"]["tokens_per_s"]
                                                / result[f"{what} before"]["tokens_per_s"])
        results.append(result)
    return results


# -----------------------------------------------------------------------------
# Report


def mark(value, target, at_most=False):
    ok = value <= target if at_most else value >= target
    return f"{'<=' if at_most else '>='} {target:g} {'pass' if ok else 'MISS'}"


def machine():
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    import transformers
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                load_average_before=os.getloadavg()[0])  # other processes' work: above 0.5, expect noisier figures


def report(results):
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
          f"transformers {m['transformers']}, Python {m['python']}; load average {m['load_average_before']:.1f} before, "
          f"{results['load_average_after']:.1f} after (other processes: 0 on an idle machine)\n")
    if "train" in results:
        print("| training step (forward + backward) | gemma.py | transformers (sdpa) | gemma.py / transformers | target |")
        print("| --- | ---: | ---: | ---: | --- |")
        for r in results["train"]:
            g, h = r["gemma.py"], r["transformers"]
            what = f"{r['preset']}, {r['batch']} x {r['tokens']} tokens, {r['dtype']}"
            print(f"| {what}: tokens/s | {g['tokens_per_s']:,.0f} | {h['tokens_per_s']:,.0f} | "
                  f"{r['speedup']:.2f} x | {mark(r['speedup'], TARGETS['train_speedup'])} |")
            print(f"| {what}: model FLOPs utilisation | {g['mfu']:.0%} | {h['mfu']:.0%} | | "
                  + (f"{mark(g['mfu'], TARGETS['train_mfu'])} |" if r["preset"] == "270m" else "|"))
            if "gemma.py compiled" in r:
                c = r["gemma.py compiled"]
                print(f"| {what}: gemma.py compiled, tokens/s (MFU) | {c['tokens_per_s']:,.0f} ({c['mfu']:.0%}) | | "
                      f"{c['tokens_per_s'] / h['tokens_per_s']:.2f} x | |")
        for r in results["train"]:
            print(f"\n{r['preset']}: {r['flops_per_step'] / 1e9:,.1f} GFLOP a step; measured {r['dtype']} matmul peak "
                  f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s; max |logits difference| {r['max_logit_difference']:.1e}", end="")
        print("\n")
    for r in results.get("generate", []):
        print(f"| greedy generation, {r['preset']}, {r['prompt_tokens']} prompt + {r['new_tokens']} new tokens "
              f"| tokens/s | ratio | target |")
        print("| --- | ---: | ---: | --- |")
        print(f"| gemma.py with the cache | {r['gemma.py cache']['tokens_per_s']:.1f} | | |")
        print(f"| gemma.py without it | {r['gemma.py no cache']['tokens_per_s']:.1f} | cache / no cache "
              f"{r['cache_speedup']:.1f} x | {mark(r['cache_speedup'], TARGETS['cache_speedup'])} |")
        print(f"| gemma.py with the cache, compiled (generate(..., compile=True)) | "
              f"{r['gemma.py cache compiled']['tokens_per_s']:.1f} | | |")
        print(f"| transformers generate (sdpa, its cache) | {r['transformers']['tokens_per_s']:.1f} | gemma.py / "
              f"transformers {r['speedup']:.2f} x; compiled {r['compiled_speedup']:.2f} x | "
              f"{mark(max(r['speedup'], r['compiled_speedup']), TARGETS['generate_speedup'])} |")
        print(f"\noutputs equal (all four, {r['new_tokens']} tokens each): {r['outputs_equal']}; compiling took "
              f"{r['compile_seconds']:.0f} s, once, before the timed runs\n")
    if "sliding" in results:
        r = results["sliding"]
        print(f"| a sliding layer ({r['preset']}, window {r['window']}), forward + backward | seconds | "
              f"ms per 1k tokens | growth from T / 2 | target |")
        print("| --- | ---: | ---: | ---: | --- |")
        for T, s in r["seconds"].items():
            growth = r["growth"].get(T)
            target = mark(growth, TARGETS["sliding_growth"], at_most=True) if T == max(r["seconds"]) else ""
            print(f"| T = {T} | {s:.3f} | {s / T * 1e6:.1f} | {f'{growth:.2f} x' if growth else ''} | {target} |")
        print()
    for r in results.get("baseline", []):
        print(f"| {r['preset']}, before and after (tokens/s, median of {len(r['train after']['all_seconds'])}) "
              f"| before | after | after / before |")
        print("| --- | ---: | ---: | ---: |")
        for what, label in (("train", f"training step, {r['batch']} x {r['tokens']} tokens"),
                            ("generate", f"greedy generation with the cache, {r['new_tokens']} new tokens")):
            print(f"| {label} | {r[what + ' before']['tokens_per_s']:,.1f} | {r[what + ' after']['tokens_per_s']:,.1f} "
                  f"| {r[what + ' after / before']:.2f} x |")
        print(f"\nmax |logits difference| {r['max_logit_difference']:.1e}; greedy tokens equal: "
              f"{r['greedy_tokens_equal']}\n")
    if "prepare" in results:
        r = results["prepare"]
        print(f"| tokenizing {os.path.basename(r['file'])} ({r['megabytes']:.1f} MB, {r['stories']:,} stories, "
              f"{r['tokens']:,} tokens, {r['threads']} threads) | tokens/s | ratio | target |")
        print("| --- | ---: | ---: | --- |")
        print(f"| prepare.py (read, tokenize, write) | {r['prepare.py']['tokens_per_s']:,.0f} | "
              f"{r['fraction']:.0%} of tiktoken | {mark(r['fraction'], TARGETS['prepare_fraction'])} |")
        print(f"| tiktoken encode_ordinary_batch alone (the ceiling) | {r['tiktoken']['tokens_per_s']:,.0f} | | |")
        print(f"\nsame tokens: {r['same_tokens']}\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description="gemma.py against transformers, side by side.", allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and new tokens: a short run")
    parser.add_argument("--only", default="train,generate,sliding,prepare", help="comma-separated sections to run")
    parser.add_argument("--out", help="also write the measured numbers to this JSON file")
    parser.add_argument("--preset", choices=list(PRESETS), help="train and generate with this preset only, and slide "
                        "with it (default: train and generate with both; slide with 270m)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training dtype (autocast)")
    parser.add_argument("--compile", action="store_true", help="also time gemma.py's training step compiled")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--data", default=TINYSTORIES, help="the JSON-lines stories prepare.py is timed on")
    parser.add_argument("--baseline", metavar="FILE", help="instead: this gemma.py against FILE, another revision's "
                        "(git show REV:gemma.py > FILE), training steps and generation in turns")
    parser.add_argument("--profile", action="store_true", help="instead of timing: where a training step's time goes "
                        "(torch.profiler), for both models, on --preset (default 270m)")
    args = parser.parse_args(argv)
    if args.profile:
        return profile_train(args.preset or "270m")
    sections = args.only.split(",")
    if unknown := set(sections) - {"train", "generate", "sliding", "prepare"}:
        parser.error(f"unknown section(s) in --only: {', '.join(sorted(unknown))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = dict(machine=machine())
    t0 = time.time()
    if args.baseline:
        sections = []
        results["baseline"] = bench_baseline(args.baseline, [args.preset] if args.preset else ["270m", "small"],
                                             reps=2 if args.quick else 6, new_tokens=16 if args.quick else 64)
    if "train" in sections:
        presets = [args.preset] if args.preset else ["270m", "small"]
        results["train"] = [bench_train(p, args, getattr(torch, args.dtype)) for p in presets]
    if "generate" in sections:
        results["generate"] = [bench_generate(p, 32 if args.quick else 256, 1 if args.quick else 3)
                               for p in ([args.preset] if args.preset else ["270m", "small"])]
    if "sliding" in sections:
        results["sliding"] = bench_sliding(args.preset or "270m", [1024, 2048, 4096, 8192], 1 if args.quick else 3)
    if "prepare" in sections:
        results["prepare"] = bench_prepare(args.data, 2 if args.quick else 5)
    results["seconds"], results["load_average_after"] = time.time() - t0, os.getloadavg()[0]
    report(results)
    print(f"({results['seconds']:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
