import json
import subprocess
import sys

import pytest
import torch

from metaphi.cli import main

FAST = ["--benchmark", "sinusoid", "--iterations", "4", "--meta-batch", "2", "--eval-tasks", "20", "--val-tasks",
        "5", "--quiet"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "metaphi", *args], capture_output=True, text=True, timeout=300)


def test_run_writes_result_checkpoint_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "maml", *FAST, "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    for key in ("algorithm", "benchmark", "metric", "mean", "ci95", "per_step", "iterations", "wall_seconds", "seed"):
        assert key in result
    assert result["iterations"] == 4 and len(result["per_step"]) == result["eval_steps"] + 1
    assert set(result["baselines"]) == {"scratch", "pretrain"}
    assert (out / "checkpoint.pt").exists() and (out / "baselines" / "pretrain" / "checkpoint.pt").exists()
    table = capsys.readouterr().out
    assert "maml" in table and "scratch" in table and "pretrain" in table


def test_eval_reproduces_the_saved_result(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "fomaml", *FAST, "--no-baselines", "--out", str(out)]) == 0
    capsys.readouterr()
    result = json.loads((out / "result.json").read_text())
    assert main(["eval", str(out / "checkpoint.pt"), "--out", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["mean"] == pytest.approx(result["mean"], rel=1e-6)


def test_resume_after_a_finished_run_keeps_its_result(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "maml", *FAST, "--no-baselines", "--out", str(out)]) == 0
    first = json.loads((out / "result.json").read_text())
    assert main(["run", "maml", *FAST, "--no-baselines", "--out", str(out), "--resume"]) == 0
    second = json.loads((out / "result.json").read_text())
    assert second["mean"] == first["mean"] and second["iterations"] == 4


@pytest.mark.parametrize("args, message", [
    (["run", "nope"], "invalid choice: 'nope'"),
    (["run", "maml", "--benchmark", "nope"], "unknown benchmark 'nope' (valid: glyphs, sinusoid"),
    (["run", "maml", "--benchmark", "sinusoid", "--shots", "0"], "--shots must be a positive number, got 0"),
    (["run", "maml", "--benchmark", "sinusoid", "--meta-batch", "-3"], "--meta-batch must be a positive number"),
    (["run", "maml", "--benchmark", "sinusoid", "--iterations", "-1"], "--iterations must be >= 0"),
    (["run", "maml", "--benchmark", "sinusoid", "--out", "/proc/forbidden"], "is not a writable folder"),
    (["run", "reptile", "--benchmark", "sinusoid", "--estimator", "bogus"], "invalid choice: 'bogus'"),
    (["eval", "/nonexistent/checkpoint.pt"], "no checkpoint at /nonexistent/checkpoint.pt"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_estimator_must_fit_the_algorithm(tmp_path):
    proc = run_cli("run", "maml", *FAST, "--estimator", "reptile", "--out", str(tmp_path))
    assert proc.returncode == 2 and "does not apply to maml" in proc.stderr


def test_threads_leave_the_cores_that_other_work_uses():
    from metaphi.cli import auto_threads
    assert auto_threads(cpus=2, load=0.3, default=2) == 2
    assert auto_threads(cpus=2, load=1.2, default=2) == 1
    assert auto_threads(cpus=2, load=9.0, default=2) == 1
    assert auto_threads(cpus=16, load=3.0, default=8) == 8
    assert auto_threads(cpus=16, load=12.0, default=8) == 4


def test_threads_option_sets_torch_threads(tmp_path):
    import torch

    from metaphi.config import UsageError

    from metaphi.cli import set_threads
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        with pytest.raises(UsageError, match="--threads must be a positive number"):
            set_threads(-2)
    finally:
        torch.set_num_threads(before)


def test_run_with_a_cosine_schedule_logs_its_step_sizes(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "fomaml", *FAST, "--no-baselines", "--iterations", "5", "--meta-lr", "0.01", "--lr-schedule",
                 "cosine", "--warmup", "2", "--lr-min-factor", "0.1", "--out", str(out)]) == 0
    lrs = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]
    # iterations 1-2 warm up to 0.01; then cosine from 0.01 down to 0.1 × 0.01 at iteration 5
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.01 * (0.1 + 0.9 * 0.5), 0.001])
    assert "lr_schedule: cosine" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["--lr-schedule", "linear"], "invalid choice: 'linear'"),
    (["--lr-min-factor", "0.5"], "--lr-min-factor applies to --lr-schedule cosine only"),
    (["--lr-schedule", "cosine", "--lr-min-factor", "2"], "--lr-min-factor must be in [0, 1]"),
    (["--warmup", "4"], "--warmup 4 leaves none of the 4 iterations after the warm-up"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
])
def test_bad_schedules_exit_2_with_one_line(tmp_path, capsys, args, message):
    try:
        code = main(["run", "maml", *FAST, "--no-baselines", "--out", str(tmp_path / "run"), *args])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_run_keeps_and_tests_the_best_validation_checkpoint_and_eval_picks_it(tmp_path, capsys):
    # a step size too large for the sinusoid: the validation error is lowest after the first step
    out = tmp_path / "run"
    assert main(["run", "maml", *FAST, "--no-baselines", "--meta-lr", "0.2", "--eval-steps", "2", "--val-every", "1",
                 "--iterations", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    vals = [json.loads(line)["val"] for line in open(out / "metrics.jsonl")]
    assert result["best_val"] == min(vals) and result["best_iteration"] == vals.index(min(vals)) + 1 == 1
    assert result["best"]["iteration"] == 1 and result["iterations"] == 6
    assert "best validation at iteration 1 of 6" in printed and "best.pt" in printed
    e = tmp_path / "e.json"
    for given, chosen in ((out, "best.pt"), (out / "checkpoint.pt", "best.pt"), (out / "best.pt", "best.pt"),
                          (out, "checkpoint.pt --last"), (out / "best.pt", "checkpoint.pt --last")):
        name, *flags = chosen.split()
        assert main(["eval", str(given), *flags, "--out", str(e)]) == 0
        again = json.loads(e.read_text())
        assert again["checkpoint"] == str(out / name)
        expected = result["best"]["mean"] if name == "best.pt" else result["mean"]
        assert again["mean"] == pytest.approx(expected, rel=1e-6)
        said = capsys.readouterr().err
        assert f"tested {out / name}" in said
        assert ("the best validation score" in said) == (name == "best.pt")


def test_a_run_whose_best_is_its_last_adds_only_the_best_keys(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "maml", *FAST, "--no-baselines", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["best_iteration"] == result["iterations"] == 4 and "best" not in result
    assert (out / "best.pt").exists()


def test_model_flag_trains_a_resnet12_that_eval_rebuilds(tmp_path, capsys, monkeypatch):
    from tiny import install_tiny

    install_tiny(monkeypatch)
    out = tmp_path / "rn"
    assert main(["run", "protonet", "--benchmark", "tiny", "--model", "resnet12", "--iterations", "1",
                 "--eval-tasks", "2", "--no-baselines", "--quiet", "--out", str(out)]) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["algorithm"]["model"]["name"] == "resnet12"
    assert "model: resnet12" in (out / "config.yaml").read_text() and "pool: null" in (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-tasks", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["algorithm"] == "protonet"
    assert main(["run", "protonet", "--benchmark", "tiny", "--model", "resnet12", "--pool", "max",
                 "--out", str(tmp_path / "x")]) == 2
    assert "has its own" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_model_conv4_width_widens_the_recipes_conv4_and_keeps_its_pooling(tmp_path, capsys, monkeypatch):
    from tiny import install_tiny

    install_tiny(monkeypatch)
    out = tmp_path / "wide"
    assert main(["run", "protonet", "--benchmark", "tiny", "--model", "conv4-24", "--iterations", "1",
                 "--eval-tasks", "2", "--no-baselines", "--quiet", "--out", str(out)]) == 0
    spec = torch.load(out / "checkpoint.pt", weights_only=True)["algorithm"]["model"]
    plain = tmp_path / "plain"
    assert main(["run", "protonet", "--benchmark", "tiny", "--iterations", "1", "--eval-tasks", "2",
                 "--no-baselines", "--quiet", "--out", str(plain)]) == 0
    plain_spec = torch.load(plain / "checkpoint.pt", weights_only=True)["algorithm"]["model"]
    # 24 filters a layer; everything else (the pooling the recipe chose included) as the run without --model
    assert spec["name"] == "conv4" and spec["hidden"] == 24 and plain_spec["hidden"] != 24
    assert {k: v for k, v in spec.items() if k != "hidden"} == {k: v for k, v in plain_spec.items() if k != "hidden"}
    capsys.readouterr()
    assert main(["eval", str(out), "--eval-tasks", "2"]) == 0  # rebuilt from the checkpoint's spec
    assert json.loads(capsys.readouterr().out)["algorithm"] == "protonet"
    for bad in ("conv4-0", "conv4-x"):
        assert main(["run", "protonet", "--benchmark", "tiny", "--model", bad, "--out", str(tmp_path / "x")]) == 2
        assert "unknown model" in capsys.readouterr().err


def test_pool_on_a_benchmark_without_conv4_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "sine"
    assert main(["run", "maml", "--benchmark", "sinusoid", "--pool", "max", "--iterations", "1", "--quiet",
                 "--out", str(out)]) == 2
    assert "benchmark sinusoid has no Conv4" in capsys.readouterr().err and not out.exists()
