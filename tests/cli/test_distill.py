"""metaphi distill: result files, resumption, config.yaml reproducing a run, flags over the file,
options refused with exit code 2."""
import json

import torch
import yaml

import metaphi.experiments.distill as study_module
from metaphi.cli import main
from tiny import tiny_store


def test_cli_distill_writes_results_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study_module, "load_data", tiny_store)
    out = tmp_path / "d"
    argv = ["distill", "glyphs", "--pair", "mlp", "--methods", "alone,kd,meta-fo", "--teacher-epochs", "1,2",
            "--epochs", "1", "--seeds", "0,1", "--per-class", "2,1,1", "--batch", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert len(result["rows"]) == 2 * (1 + 2 * 2) and (out / "checkpoint.pt").exists()
    assert {e["method"] for e in result["summary"]} == {"alone", "kd", "meta-fo"}
    assert main(argv) == 0  # every run is in the checkpoint: nothing is trained again
    assert json.loads((out / "result.json").read_text())["rows"] == result["rows"]
    assert main([*argv[:-3], "--lr", "1e-2", "--out", str(out), "--quiet"]) == 2
    # the refused run left the folder's config.yaml describing the runs its checkpoint holds
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 3e-3
    assert main(["distill", "--methods", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown nope" in capsys.readouterr().err


def _without_wall(result: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in result["rows"]]


def test_config_file_reproduces_a_run_and_flags_override_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study_module, "load_data", tiny_store)
    out, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["distill", "--methods", "alone,meta", "--teacher-epochs", "1", "--epochs", "1", "--seeds", "3",
                 "--per-class", "2,1,1", "--batch", "4", "--meta-teacher-lr", "1e-3", "--out", str(out),
                 "--quiet"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["meta_teacher_lr"] == 1e-3 and saved["seeds"] == [3] and saved["out"] == str(out)
    assert main(["distill", "--config", str(out / "config.yaml"), "--out", str(again)]) == 0
    first, second = (json.loads((d / "result.json").read_text()) for d in (out, again))
    assert _without_wall(second) == _without_wall(first) and second["config"]["out"] == str(again)
    # a flag given on the command line takes precedence over the file
    assert main(["distill", "--config", str(out / "config.yaml"), "--methods", "alone", "--out", str(other)]) == 0
    third = json.loads((other / "result.json").read_text())
    assert [r["method"] for r in third["rows"]] == ["alone"] and _without_wall(third) == _without_wall(first)[:1]
    # an option the study does not have is refused with its name, and so is a bad value
    (tmp_path / "bad.yaml").write_text("epochs: 1\nsolver: cg\n")
    assert main(["distill", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "solver" in capsys.readouterr().err
    assert main(["distill", "--soft-weight", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--soft-weight" in capsys.readouterr().err
    assert main(["distill", "--per-class", "2,1", "--out", str(tmp_path / "x")]) == 2
