"""metaphi l2o train | eval: a tiny run end to end, a learned optimizer file that loads everywhere, the
config file that reproduces a run, flags over the file, bad input."""
import json
import os

import torch

from metaphi.cli import main
from metaphi.inner.optim import LearnedOptimizer

TINY_TRAIN = ["--family", "quadratic", "--horizon", "6", "--unroll", "3", "--iterations", "2", "--problems", "2",
              "--val-every", "1", "--val-problems", "2", "--eval-problems", "3", "--quiet"]


def test_l2o_command_trains_and_evaluates(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["l2o", "train", "--rule", "mlp-rule", "--family", "quadratic", "--horizon", "6", "--unroll", "3",
                 "--iterations", "2", "--problems", "2", "--val-every", "1", "--val-problems", "2",
                 "--eval-problems", "3", "--out", out, "--quiet"]) == 0
    result = json.load(open(os.path.join(out, "result.json")))
    assert result["iterations"] == 2 and result["truncations"] == 4 and "6" in result["test"]
    model = torch.nn.Linear(3, 1)
    LearnedOptimizer(model.parameters(), os.path.join(out, "optimizer.pt"))
    assert main(["l2o", "eval", os.path.join(out, "optimizer.pt"), "--family", "quadratic", "--horizons", "3", "6",
                 "--problems", "3", "--baselines", "adam", "--grid", "0.1", "1", "--tune-problems", "2",
                 "--out", str(tmp_path / "eval.json"), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "adam" in table and "mlp-rule" in table
    rows = json.load(open(tmp_path / "eval.json"))["rows"]
    assert rows["adam"]["6"]["lr"] in (0.1, 1.0) and len(json.load(open(tmp_path / "eval.json"))["curves"]["adam"]) == 7


def test_l2o_command_rejects_bad_input(tmp_path, capsys):
    assert main(["l2o", "train", "--horizon", "0", "--out", str(tmp_path / "x")]) == 2
    torch.save({"not": "an optimizer"}, tmp_path / "bad.pt")
    assert main(["l2o", "eval", str(tmp_path / "bad.pt")]) == 2
    assert main(["l2o", "eval", "--baselines", "adagrad"]) == 2
    assert "metaphi: error" in capsys.readouterr().err


def test_l2o_config_file_reproduces_the_run_and_flags_override_it(tmp_path):
    import yaml

    first, again, shorter = (str(tmp_path / name) for name in ("first", "again", "shorter"))
    assert main(["l2o", "train", "--rule", "lstm", "--clip", "0.5", "--out", first, *TINY_TRAIN]) == 0
    config = os.path.join(first, "config.yaml")
    saved = yaml.safe_load(open(config))
    assert saved["rule"] == "lstm" and saved["horizon"] == 6 and saved["clip"] == 0.5 and saved["out"] == first
    assert main(["l2o", "train", "--config", config, "--out", again]) == 0
    a, b = (json.load(open(os.path.join(d, "result.json"))) for d in (first, again))
    assert a["test"] == b["test"] and a["best_val"] == b["best_val"] and a["config"]["seed"] == b["config"]["seed"]
    meta_a, meta_b = (torch.load(os.path.join(d, "optimizer.pt"), weights_only=True)["meta"] for d in (first, again))
    assert all(torch.equal(meta_a[k], meta_b[k]) for k in meta_a)
    # a flag on the command line wins over the file; the rest comes from the file
    assert main(["l2o", "train", "--config", config, "--out", shorter, "--iterations", "1"]) == 0
    c = json.load(open(os.path.join(shorter, "result.json")))
    assert c["iterations"] == 1 and c["truncations"] == 2 and c["config"]["clip"] == 0.5
    assert yaml.safe_load(open(os.path.join(shorter, "config.yaml")))["iterations"] == 1


def test_l2o_eval_reads_lists_spaced_comma_separated_or_from_a_file(tmp_path, capsys):
    import yaml

    common = ["--family", "quadratic", "--problems", "2", "--tune-problems", "2", "--quiet"]
    assert main(["l2o", "eval", "--horizons", "2", "4", "--baselines", "sgd", "adam", "--grid", "0.1", "1",
                 "--out", str(tmp_path / "spaced.json"), *common]) == 0
    assert main(["l2o", "eval", "--horizons", "2,4", "--baselines", "sgd,adam", "--grid", "0.1,1",
                 "--out", str(tmp_path / "comma.json"), *common]) == 0
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({"horizons": [2, 4], "baselines": ["sgd", "adam"],
                                                        "grid": [0.1, 1.0], "family": "quadratic", "problems": 2,
                                                        "tune_problems": 2, "quiet": True}))
    assert main(["l2o", "eval", "--config", str(tmp_path / "eval.yaml"), "--out", str(tmp_path / "file.json")]) == 0
    rows = [json.load(open(tmp_path / f"{name}.json")) for name in ("spaced", "comma", "file")]
    strip = lambda r: {k: {h: v for h, v in row.items() if h != "seconds"} for k, row in r["rows"].items()}
    assert strip(rows[0]) == strip(rows[1]) == strip(rows[2]) and list(rows[0]["rows"]) == ["sgd", "adam"]
    assert rows[2]["config"]["grid"] == [0.1, 1.0]


def test_l2o_command_refuses_what_does_not_apply(tmp_path, capsys):
    assert main(["l2o", "train", "--estimator", "es", "--population", "3", "--out", str(tmp_path / "x")]) == 2
    assert main(["l2o", "train", "--clip", "-1", "--out", str(tmp_path / "x")]) == 2
    assert main(["l2o", "train", "--resume", "--out", str(tmp_path / "empty")]) == 2
    (tmp_path / "bad.yaml").write_text("horizon: 6\nhorizons: [1]\n")
    assert main(["l2o", "train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--population" in err and "--clip" in err and "--resume" in err and "unknown option horizons" in err
