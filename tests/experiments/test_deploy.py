"""``metaphi run --deploy``: a model for ``predict`` trained on every class but a validation split, with no test."""
import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from metaphi.cli import main
from tiny import bar_drawing

CLASSES = 10


def drawing(c: int, i: int, size: int = 28) -> np.ndarray:
    return bar_drawing(c, i, CLASSES, size)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    for c in range(CLASSES):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(drawing(c, i)).save(root / "train" / f"class{c}" / f"{i}.png")
    for c, name in enumerate(["a", "b"]):
        (root / "support" / name).mkdir(parents=True)
        Image.fromarray(drawing(3 * c, 10)).save(root / "support" / name / "x.png")
    (root / "query").mkdir()
    Image.fromarray(drawing(3, 11)).save(root / "query" / "q.png")
    return root


RUN = ["--ways", "2", "--shots", "1", "--query", "1", "--iterations", "4", "--meta-batch", "2", "--val-every", "2",
       "--val-tasks", "2"]


def test_deploy_trains_on_all_but_validation_classes_and_skips_the_test(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "protonet", "--benchmark", f"folder:{folder / 'train'}", "--deploy", *RUN,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "8 train, 2 val, no test: deploy" in printed.err
    assert "deploy: no test classes" in printed.out and "metaphi predict --checkpoint" in printed.out
    result = json.loads((out / "result.json").read_text())
    assert result["test"] is None and result["deploy"] is True
    assert "mean" not in result and "baselines" not in result
    assert 0.0 <= result["val"]["last"] <= 1.0 and 0.0 <= result["val"]["best"] <= 1.0
    assert result["val"]["best_iteration"] in (2, 4) and result["iterations"] == 4
    assert (out / "checkpoint.pt").exists() and (out / "best.pt").exists()
    assert not (out / "baselines").exists()
    from metaphi.train import load_checkpoint
    ck = load_checkpoint(str(out / "checkpoint.pt"))
    assert ck["run"]["benchmark_options"]["deploy"] is True
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert result["val"]["last"] == metrics[-1]["val"]
    # the config it wrote runs it again
    assert "deploy: true" in (out / "config.yaml").read_text()
    # predict labels images with it
    assert main(["predict", "--checkpoint", str(out), "--support", str(folder / "support"), "--query",
                 str(folder / "query")]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["file"] for r in table] == ["q.png"] and table[0]["prediction"] in {"a", "b"}
    # eval has no test classes to test it on: one line
    proc = subprocess.run([sys.executable, "-m", "metaphi", "eval", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "no 'test' split" in proc.stderr


def test_a_run_without_deploy_still_tests_on_its_folder(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "protonet", "--benchmark", f"folder:{folder / 'train'}", *RUN, "--eval-tasks", "2",
                 "--no-baselines", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert "test" not in result and "deploy" not in result and 0.0 <= result["mean"] <= 1.0
    assert "6 train, 2 val, 2 test" in capsys.readouterr().err


def test_val_fraction_sets_how_many_classes_validate(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "protonet", "--benchmark", f"folder:{folder / 'train'}", "--deploy", "--val-fraction", "0.3",
                 *RUN, "--out", str(out)]) == 0
    assert "7 train, 3 val, no test: deploy" in capsys.readouterr().err
    assert "val_fraction: 0.3" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["--benchmark", "glyphs", "--deploy"], "--deploy applies to folder:PATH benchmarks only, not glyphs"),
    (["--deploy", "--split-file", "SPLIT"], "drop the split file"),
    (["--val-fraction", "0.1"], "--val-fraction applies with --deploy only"),
    (["--deploy", "--val-fraction", "1"], "--val-fraction must be between 0 and 1"),
])
def test_deploy_refusals_exit_2_with_one_line(folder, tmp_path, args, message):
    split = tmp_path / "split.txt"
    split.write_text("".join(f"class{c},{'train' if c < 6 else 'val' if c < 8 else 'test'}\n" for c in range(CLASSES)))
    args = [str(split) if a == "SPLIT" else a for a in args]
    if "--benchmark" not in args:
        args = ["--benchmark", f"folder:{folder / 'train'}", *args]
    proc = subprocess.run([sys.executable, "-m", "metaphi", "run", "protonet", *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
