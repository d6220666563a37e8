"""
test_tools.py: the tools that the scripts in runs/ call: tools/record.py (a result as JSON, with its
command, commit and machine) and tools/budget.py (the steps that fill a budget of minutes).

    python -m pytest test_tools.py
"""
import json, subprocess

import pytest

from conftest import HERE, cli, write_jsonl, generated_stories
from tools import budget, record


def test_record_keeps_the_figures_of_eval_the_command_commit_machine_and_the_other_runs(tmp_path):
    (tmp_path / "eval.txt").write_text("note: something\nloss 2.0813 nats/token, 0.7323 bits/byte, "
                                       "perplexity 8.01, 133 stories in 134 windows\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 3.5}\n{"step": 1, "trai')
    path = tmp_path / "result.json"
    for run in ("seed1", "seed2"):
        record.main([str(path), "--command", "bash runs/x.sh", "--run", run, "--eval",
                     f"after={tmp_path / 'eval.txt'}", "--metrics", str(tmp_path / "metrics.jsonl"),
                     "--set", "steps=320", "--set", "note=plain words"])
    result = json.loads(path.read_text())
    assert result["command"] == "bash runs/x.sh" and set(result["runs"]) == {"seed1", "seed2"}
    run = result["runs"]["seed1"]
    assert run["after"] == dict(loss=2.0813, bpb=0.7323, perplexity=8.01, stories=133, windows=134)
    assert run["metrics"] == [{"step": 0, "val_loss": 3.5}]  # the torn last line left out
    assert (run["steps"], run["note"]) == (320, "plain words")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True)
    assert run["commit"] == head.stdout.strip() and run["machine"]["cores"] >= 1
    (tmp_path / "empty.txt").write_text("nothing measured\n")
    with pytest.raises(SystemExit, match="no line of `gemma.py eval` figures"):
        record.main([str(path), "--command", "x", "--eval", f"a={tmp_path / 'empty.txt'}"])


def test_record_calls_a_change_of_code_uncommitted_but_not_a_change_of_its_own_file(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "assets").mkdir()
    (tmp_path / "train.py").write_text("steps = 1\n")
    result = tmp_path / "assets" / "search.json"
    result.write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first")
    assert record.commit(result, tmp_path)["uncommitted_changes"] is False
    result.write_text('{"runs": {"first": {}}}\n')  # the search's first run, recorded
    assert record.commit(result, tmp_path)["uncommitted_changes"] is False
    (tmp_path / "train.py").write_text("steps = 2\n")  # the code the next run runs
    assert record.commit(result, tmp_path)["uncommitted_changes"] is True


@pytest.mark.slow
def test_record_reads_what_gemma_py_eval_prints(tmp_path, data_dir):
    out = tmp_path / "out"
    cli("gemma.py", "train", "--preset", "small", "--hidden_size", "32", "--intermediate_size",
        "64", "--head_dim", "8", "--block_size", "32", "--batch_size", "2", "--total_batch_size",
        "64", "--max_steps", "1", "--eval_windows", "2", "--data_dir", data_dir, "--out_dir", out)
    printed = cli("gemma.py", "eval", "--out_dir", out, "--files",
                  write_jsonl(tmp_path / "s.jsonl", generated_stories(3))).stdout
    (tmp_path / "eval.txt").write_text(printed)
    figures = record.read_eval(str(tmp_path / "eval.txt"))
    assert printed == (f"loss {figures['loss']:.4f} nats/token, {figures['bpb']:.4f} bits/byte, "
                       f"perplexity {figures['perplexity']:.2f}, {figures['stories']} stories in "
                       f"{figures['windows']} windows\n")


def test_budget_fills_the_minutes_at_the_probes_median_step_time(monkeypatch):
    def probe(command, cwd, capture_output, text):  # steps of 0.5 s after two slow ones
        out = command[command.index("--out_dir") + 1]
        with open(f"{out}/metrics.jsonl", "w") as f:
            for step in range(1, budget.PROBE_STEPS + 1):
                seconds = 3.0 if step <= 2 else 0.5
                f.write(json.dumps(dict(step=step, tokens=step * 1000,
                                        tokens_per_s=1000 / seconds)) + "\n")
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(subprocess, "run", probe)
    assert budget.steps_for(5, ["--preset", "small"]) == int(0.9 * 5 * 60 / 0.5)  # 540
