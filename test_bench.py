"""
test_bench.py: bench.py's logic, on tiny configurations, in seconds, with no timing assertions. The
scripts and tools around it (runs/gpu.sh, tools/compare_revisions.py) are tested in
test_runs_scripts.py.

    python -m pytest test_bench.py
"""
import gzip, json, os, statistics, subprocess

import pytest

import bench
from gemma import PRESETS
from conftest import HERE, tiny_config, generated_stories


def test_flops_per_token_counts_matmul_weights_six_times_and_attention_over_the_keys_each_query_sees():
    c = tiny_config(vocab_size=10, hidden_size=4, intermediate_size=8, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=2, sliding_window=2, num_hidden_layers=2,
                    layer_types=("sliding_attention", "full_attention"))
    # per layer: q 4x4, k 4x2, v 4x2, o 4x4 = 48, gate, up, down 3 x 4x8 = 96; two layers; the tied output layer 10 x 4
    weights = 2 * (48 + 96) + 40
    # T = 4: the sliding layer's queries see 1, 2, 2, 2 keys (window 2), the full layer's 1, 2, 3, 4
    keys = (1 + 2 + 2 + 2) / 4 + (1 + 2 + 3 + 4) / 4
    assert bench.flops_per_token(c, 4) == 6 * weights + 12 * keys * 2 * 2 == 2172


def test_flops_per_token_of_270m_at_1024_tokens():
    c = PRESETS["270m"][0]  # 15 sliding layers see 384.25 keys on average, 3 full layers 512.5
    expected = 6 * (18 * (2 * 640 * 256 * 5 + 3 * 640 * 2048) + 50257 * 640) + 12 * (15 * 384.25 + 3 * 512.5) * 256 * 4
    assert bench.flops_per_token(c, 1024) == pytest.approx(expected)


def test_measurements_are_taken_in_turns_after_the_warm_up():
    calls = []
    times = bench.in_turns({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, reps=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # the warm-up, then alternating orders
    assert [len(t) for t in times.values()] == [3, 3]


@pytest.mark.slow
def test_quick_generation_on_a_tiny_config_runs_and_all_four_outputs_are_equal(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", (tiny_config(), {}))
    out = tmp_path / "results.json"
    bench.main(["--quick", "--only", "generate", "--preset", "tiny", "--out", str(out)])
    [r] = json.loads(out.read_text())["generate"]
    assert r["outputs_equal"] is True and r["new_tokens"] == 32  # 16 prompt + 32 new tokens: 8 times the window
    # each reported ratio is the ratio of the two speeds it names, each speed new tokens / median seconds
    for name in ("gemma.py cache", "gemma.py no cache", "gemma.py cache compiled", "transformers"):
        assert r[name]["tokens_per_s"] == pytest.approx(32 / statistics.median(r[name]["all_seconds"]))
    speed = {name: r[name]["tokens_per_s"] for name in r if isinstance(r[name], dict)}
    assert r["cache_speedup"] == pytest.approx(speed["gemma.py cache"] / speed["gemma.py no cache"])
    assert r["speedup"] == pytest.approx(speed["gemma.py cache"] / speed["transformers"])
    assert r["compiled_speedup"] == pytest.approx(speed["gemma.py cache compiled"] / speed["transformers"])


def test_profile_finds_the_same_matrix_multiplies_in_both_models(monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "tiny", (tiny_config(), {}))
    monkeypatch.setitem(bench.SHAPES, "tiny", (2, 12))  # longer than the window of 4
    bench.main(["--profile", "--preset", "tiny"])
    out = capsys.readouterr().out
    assert "the same matrix multiplies in the blocks (shapes and counts) in both: True" in out
    assert "gemma.py, tiny, 2 x 12 tokens: aten::mm and addmm" in out
    assert "transformers, tiny, 2 x 12 tokens: aten::mm and addmm" in out


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA L4", "L4"), ("Tesla T4", "T4"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce GTX 1080", "unknown")])
def test_the_card_is_found_by_the_name_cuda_gives_it_with_its_datasheet_peak(name, expected):
    found, peaks = bench.card(name)
    assert found == expected and (peaks.get("bfloat16") == {"H100 SXM": 989e12, "H200": 989e12}.get(expected)
                                  or expected not in ("H100 SXM", "H200"))
    assert (found == "unknown") == (peaks == {})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_training_section_runs_each_dtype_and_reports_consistent_figures(dtype, monkeypatch, tmp_path):
    monkeypatch.setitem(PRESETS, "tiny", (tiny_config(), {}))
    monkeypatch.setitem(bench.SHAPES, "tiny", (2, 12))
    out = tmp_path / "results.json"
    argv = ["--quick", "--only", "train", "--preset", "tiny", "--dtype", dtype, "--device", "cpu", "--out", str(out)]
    bench.main(argv)
    results = json.loads(out.read_text())
    [r] = results["train"]
    assert r["dtype"] == dtype and r["logits_equal"] is True  # within the dtype's tolerance
    for name in ("gemma.py", "transformers"):
        x = r[name]
        assert x["tokens_per_s"] == pytest.approx(2 * 12 / x["seconds"])
        assert x["mfu"] == pytest.approx(r["flops_per_step"] / x["seconds"] / r["peak_flops"])
        assert x["peak_memory"] is None  # no allocator count on a CPU
    assert r["datasheet_flops"] is None and r["card"] == "cpu"
    # what made the figures: the command line, the commit, the machine (tools/record.py's, and more)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    assert results["command"] == "python bench.py " + " ".join(argv) and results["commit"] == head
    assert {"cpu", "cores", "cpu_bfloat16", "torch_threads", "transformers", "gpu"} <= set(results["machine"])


@pytest.mark.slow
def test_sliding_and_decode_sections_run_on_the_cpu_with_consistent_figures(monkeypatch, tmp_path):
    monkeypatch.setitem(PRESETS, "tiny", (tiny_config(), {}))
    out = tmp_path / "results.json"
    bench.main(["--quick", "--only", "sliding,decode", "--preset", "tiny", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    sliding, decode = results["sliding"], results["decode"]
    assert set(sliding["blocked"]["seconds"]) == {"256", "512"} and "flex" not in sliding  # no CPU backward
    runs = decode["runs"]
    assert set(runs) == {"float32", "float32 compiled", "bfloat16", "bfloat16 compiled"}
    assert runs["bfloat16"]["weight_bytes"] * 2 == runs["float32"]["weight_bytes"]
    for x in runs.values():
        assert x["fraction_of_bandwidth"] == pytest.approx(x["weight_bytes"] * x["tokens_per_s"] / decode["bandwidth"])


@pytest.mark.slow
def test_loss_section_runs_both_paths_in_fresh_processes_and_reports_consistent_figures(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "LOSS_VOCAB", 8192)  # 270m's width, 2 layers, a vocabulary 32 times smaller
    monkeypatch.setitem(bench.LOSS_SHAPES, "cpu", (2, 64))
    out = tmp_path / "results.json"
    bench.main(["--only", "loss", "--device", "cpu", "--out", str(out)])
    r = json.loads(out.read_text())["loss"]
    assert (r["vocab_size"], r["batch"], r["tokens"], r["dtype"]) == (8192, 2, 64, "float32")
    assert r["logits_bytes"] == 2 * 64 * 8192 * 4  # one float32 copy: 4 MB
    assert r["ratio"] == pytest.approx(r["plain"]["peak_memory"] / r["chunked"]["peak_memory"])
    assert r["loss_difference"] < 1e-5  # the same weights and batch in both processes: the same loss
    assert r["plain"]["peak_memory"] >= r["logits_bytes"]  # the plain path holds the logits at least once


@pytest.mark.slow
def test_finetune_section_times_the_embedding_trained_and_frozen_in_fresh_processes(monkeypatch,
                                                                                   tmp_path):
    monkeypatch.setattr(bench, "LOSS_VOCAB", 4096)  # 270m's shape, a vocabulary 64 times smaller
    monkeypatch.setitem(bench.FINETUNE_SHAPES, "cpu", (1, 16))
    out = tmp_path / "results.json"
    bench.main(["--only", "finetune", "--quick", "--device", "cpu", "--out", str(out)])
    r = json.loads(out.read_text())["finetune"]
    assert (r["vocab_size"], r["batch"], r["tokens"]) == (4096, 1, 16)
    for name in ("trained", "frozen"):
        assert r[name]["tokens_per_s"] == pytest.approx(16 / r[name]["seconds"])
        assert r[name]["peak_memory"] > 4 * 100e6  # at least the float32 weights of the blocks
    assert r["speedup"] == pytest.approx(r["frozen"]["tokens_per_s"] / r["trained"]["tokens_per_s"])


def test_every_table_has_as_many_cells_in_each_row_as_in_its_header(capsys):
    bench.table(["what", "seconds", "ratio", "target"], [["a", "1.0", "", ">= 2 MISS"], ["b", "2.0", "2.0 x", ""]],
                "a note")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["| what | seconds | ratio | target |", "| --- | ---: | ---: | --- |",
                         "| a | 1.0 |  | >= 2 MISS |", "| b | 2.0 | 2.0 x |  |"]
    assert lines[4:] == ["", "a note", ""]


def test_a_device_this_machine_lacks_is_one_line_from_the_projects_device_chooser(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--device", "cuda", "--only", "train"])  # the tests see no GPU (conftest.py)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--device cuda: " in err and "has no such device" in err


def test_the_prepare_section_reads_the_excerpt_shipped_in_the_repository_by_default(tmp_path, capsys):
    assert bench.TINYSTORIES == os.path.join(HERE, "tinystories", "train.jsonl.gz")
    assert os.path.exists(bench.TINYSTORIES)
    stories = tmp_path / "stories.jsonl.gz"  # the same format, smaller
    with gzip.open(stories, "wt") as f:
        f.writelines(json.dumps({"text": s}) + "\n" for s in generated_stories(50))
    r = bench.main(["--quick", "--only", "prepare", "--data", str(stories)])["prepare"]
    assert r["stories"] == 50 and r["same_tokens"] is True  # prepare.py's tokens are tiktoken's
    assert r["fraction"] == pytest.approx(r["prepare.py"]["tokens_per_s"] / r["tiktoken"]["tokens_per_s"])
    assert "| prepare.py (read, tokenize, write) |" in capsys.readouterr().out
