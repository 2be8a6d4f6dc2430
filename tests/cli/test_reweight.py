"""``metaphi reweight`` (metaphi/cli/reweight.py): flags, --config, exit codes."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from metaphi.cli import main


def test_cli_reweight(tmp_path, capsys):
    out = str(tmp_path / "run")
    code = main(["reweight", "--epochs", "1", "--seeds", "0,1", "--methods", "plain,plain-meta,l2rw,mwnet",
                 "--hidden", "16", "--imbalance", "10", "--noise", "none", "--out", out, "--quiet"])
    assert code == 0
    result = json.load(open(os.path.join(out, "result.json")))
    assert [e["method"] for e in result["summary"]] == ["plain", "plain-meta", "l2rw", "mwnet"]
    assert result["config"]["corruption"] == {"noise": "none", "noise_rate": 0.0, "imbalance": 10.0}
    assert os.path.exists(os.path.join(out, "checkpoint.pt")) and os.path.exists(os.path.join(out, "result.md"))
    for bad in (["--methods", "plain,foo"], ["--noise-rate", "1.5"], ["--imbalance", "0.5"], ["--epochs", "0"]):
        assert main(["reweight", *bad, "--out", out, "--quiet"]) == 2
        assert "error" in capsys.readouterr().err


def test_config_yaml_reproduces_the_run_and_flags_override_it(tmp_path, capsys):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert main(["reweight", "--epochs", "1", "--seeds", "2", "--methods", "plain,l2rw,mwnet", "--hidden", "12",
                 "--noise", "flip", "--noise-rate", "0.3", "--meta-per-class", "4", "--test-per-class", "8",
                 "--meta-batch", "20", "--out", first, "--quiet"]) == 0
    written = yaml.safe_load(open(os.path.join(first, "config.yaml")))
    assert written["seeds"] == [2] and written["hidden"] == [12] and written["meta_batch"] == 20
    assert written["out"] == first
    assert main(["reweight", "--config", os.path.join(first, "config.yaml"), "--out", second]) == 0
    a, b = (json.load(open(os.path.join(d, "result.json"))) for d in (first, second))
    assert a["config"] == b["config"]
    assert [r["test_acc"] for r in a["rows"]] == [r["test_acc"] for r in b["rows"]]
    assert [e["test_acc"] for e in a["summary"]] == [e["test_acc"] for e in b["summary"]]
    assert yaml.safe_load(open(os.path.join(second, "config.yaml")))["out"] == second
    # a flag given on the command line wins over the file
    third = str(tmp_path / "third")
    assert main(["reweight", "--config", os.path.join(first, "config.yaml"), "--seeds", "3", "--out", third]) == 0
    c = json.load(open(os.path.join(third, "result.json")))
    assert c["config"] == {**a["config"], "seeds": [3]} and [r["seed"] for r in c["rows"]] == [3, 3, 3]


def test_an_option_that_does_not_apply_exits_2_naming_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["reweight", "--methods", "plain", "--mwnet-lr", "0.01", "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--mwnet-lr" in err and len(err.strip().splitlines()) == 1
    assert main(["reweight", "--config", str(tmp_path / "missing.yaml"), "--out", out]) == 2
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal, also one line and code 2
        main(["reweight", "--unknown-flag", "1"])
    assert stop.value.code == 2
