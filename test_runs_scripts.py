"""
test_runs_scripts.py: the GPU acceptance run (runs/gpu.sh) on the CPU with a tiny model, and the tools
it and the speed figures use: tools/same_run.py (a resumed run against the uninterrupted one),
tools/run_figures.py (a run's figures and checks) and tools/compare_revisions.py (this gemma.py
against another revision's).

    python -m pytest test_runs_scripts.py
"""
import json, os, subprocess, sys

import pytest

from conftest import HERE, tiny_config
from gemma import PRESETS
from tools import compare_revisions, run_figures

ROWS = [{"step": 0, "tokens": 0, "val_loss": 10.5, "val_bpb": 3.9, "val_perplexity": 36315.5},
        {"step": 1, "tokens": 64, "train_loss": 10.25, "train_bpb": 4.2, "lr": 0.064, "tokens_per_s": 199.0},
        {"step": 2, "tokens": 128, "train_loss": 9.5, "train_bpb": 3.5, "lr": 0.128, "tokens_per_s": 318.0},
        {"step": 2, "tokens": 128, "val_loss": 9.75, "val_bpb": 3.6, "val_perplexity": 17154.2}]


def run_folder(path, rows):
    """A run folder whose metrics.jsonl holds `rows`."""
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tool(name, *args):
    """Run tools/NAME.py ARGS as runs/gpu.sh does."""
    return subprocess.run([sys.executable, f"tools/{name}.py", *map(str, args)], cwd=HERE, capture_output=True,
                          text=True)


def test_same_run_passes_runs_whose_rows_differ_only_in_speed(tmp_path):
    a = run_folder(tmp_path / "a", ROWS)
    b = run_folder(tmp_path / "b", [{**r, "tokens_per_s": 1.0} if "tokens_per_s" in r else r for r in ROWS])
    done = tool("same_run", a, b)
    assert done.returncode == 0 and "the same: the 4 rows of" in done.stdout


@pytest.mark.parametrize("change", ["a loss", "a missing row", "an extra row", "no rows"])
def test_same_run_fails_on_any_other_difference_and_prints_the_first_row_that_differs(tmp_path, change):
    rows = [dict(r) for r in ROWS]
    if change == "a loss":
        rows[2]["train_loss"] = 9.75
    elif change == "a missing row":
        del rows[1]
    elif change == "an extra row":
        rows.append({"step": 3, "tokens": 192, "train_loss": 9.0, "train_bpb": 3.4, "lr": 0.1})
    a = run_folder(tmp_path / "a", ROWS if change != "no rows" else [])
    b = run_folder(tmp_path / "b", rows if change != "no rows" else [])
    done = tool("same_run", a, b)
    assert done.returncode == 1 and done.stdout.startswith("not the same")
    if change == "a loss":
        assert "row 3 differs (the largest loss difference at one step: 0.25)" in done.stdout
        assert "'train_loss': 9.5," in done.stdout and "'train_loss': 9.75," in done.stdout
    if change == "an extra row":
        assert "row 5 differs" in done.stdout and "no such row" in done.stdout


def test_run_figures_prints_a_runs_figures_and_checks_the_loss_falls_and_stays_finite(tmp_path):
    run = run_folder(tmp_path / "run", ROWS)
    done = tool("run_figures", run, "--falling")
    assert done.returncode == 0
    # the median tokens/s leaves out the first logged step (compiling, warming up)
    assert json.loads(done.stdout) == dict(steps=2, val_loss=[10.5, 9.75], tokens_per_s=318.0, finite=True,
                                           loss_falling=True)
    rising = run_folder(tmp_path / "rising", ROWS[:3] + [{**ROWS[3], "val_loss": 11.0}])
    assert tool("run_figures", rising).returncode == 0  # without --falling, only finite losses are asked for
    assert tool("run_figures", rising, "--falling").returncode == 1
    assert run_figures.figures([*ROWS, {"step": 3, "tokens": 192, "train_loss": float("nan")}])["finite"] is False
    assert run_figures.figures([])["finite"] is False  # a run that logged nothing is no pass


def test_compare_revisions_times_two_revisions_with_the_same_weights(tmp_path, monkeypatch, capsys):
    import bench, dataclasses, gemma
    (tmp_path / "gemma_before.py").write_text(open(gemma.__file__).read())  # this very revision, as a baseline
    baseline = compare_revisions.load_revision(str(tmp_path / "gemma_before.py"))
    assert baseline.Gemma is not gemma.Gemma  # a module of its own
    monkeypatch.setitem(PRESETS, "tiny", (tiny_config(), {}))
    monkeypatch.setitem(baseline.PRESETS, "tiny", (baseline.GemmaConfig(**dataclasses.asdict(tiny_config())), {}))
    monkeypatch.setitem(bench.SHAPES, "tiny", (2, 12))
    monkeypatch.setattr(compare_revisions, "load_revision", lambda path: baseline)
    out = tmp_path / "results.json"
    compare_revisions.main(["unused.py", "--quick", "--preset", "tiny", "--out", str(out)])
    results = json.loads(out.read_text())
    [r] = results["baseline"]
    assert r["greedy_tokens_equal"] is True and r["max_logit_difference"] == 0.0
    for what in ("train", "generate"):
        ratio = r[f"{what} after"]["tokens_per_s"] / r[f"{what} before"]["tokens_per_s"]
        assert r[f"{what} after / before"] == pytest.approx(ratio)
    assert results["command"] == "python tools/compare_revisions.py unused.py --quick --preset tiny --out " + str(out)
    assert "commit" in results and results["machine"]["cores"] >= 1
    assert "| tiny, before and after (tokens/s, median of 2) | before | after | after / before |" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_gpu_acceptance_script_runs_on_the_cpu_with_a_tiny_model_and_records_its_checks(tmp_path):
    tiny = ("--preset small --hidden_size 32 --intermediate_size 64 --head_dim 8 --num_hidden_layers 2 "
            "--sliding_window 8 --block_size 16 --batch_size 2 --total_batch_size 64 --eval_windows 4 "
            "--warmup_steps 2")
    env = dict(os.environ, DEVICE="cpu", STEPS="8", MODEL_FLAGS=tiny, DATA=str(tmp_path / "data"),
               OUT=str(tmp_path / "out"), ASSETS=str(tmp_path / "assets"),
               BENCH_FLAGS="--quick --only sliding --preset small")
    done = subprocess.run(["bash", "runs/gpu.sh"], cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    # the run stopped with Ctrl-C half-way and resumed logged what the uninterrupted one did, row for row
    whole, split = ([json.loads(line) for line in open(out / name / "metrics.jsonl")]
                    for name in ("gpu-whole", "gpu-split"))
    assert len(whole) == 8 + 5 and [r["step"] for r in whole] == [r["step"] for r in split]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in whole] == \
        [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in split]
    record = json.loads((tmp_path / "assets" / "gpu_acceptance.json").read_text())
    assert record["command"] == "bash runs/gpu.sh"
    run = record["runs"]["cpu"]
    assert run["passed"] is True and run["steps"] == 8 and run["flags"] == tiny
    assert run["interrupted_status"] == 130 and 4 <= run["interrupted_after"] < 8 and run["resumed_same_rows"] is True
    assert run["train"]["loss_falling"] and run["train"]["finite"] and len(run["train"]["val_loss"]) == 5
    assert run["train"]["tokens_per_s"] > 0 and len(run["metrics"]) == len(whole)
    assert run["float16"]["finite"] is True and run["float16"]["steps"] == 10
    assert run["sample"].startswith("Once upon a time")
    bench = json.loads((tmp_path / "assets" / "gpu_bench.json").read_text())
    assert run["bench"] == bench and bench["command"].startswith("python bench.py --device cpu --quick")
    assert bench["sliding"]["blocked"]["seconds"]
