"""No code runs from a file: a ``.pt`` holding a pickle payload, put wherever a command reads a
checkpoint, is refused with exit code 2 and one line, and its payload never runs.

Each entry point is reached as a user reaches it: a checkpoint named on the command line (eval,
predict, run --init, compare NAME@FILE, l2o eval), or a run folder that holds one (run --resume,
l2o train --resume, search-arch --resume, and the studies that resume on their own when rerun into
their folder: reweight, augment, distill, continual, domaingen). For the studies, a tiny study is run
first, then every ``.pt`` it left is replaced by the payload and its results removed, so that the
rerun must read the files it would resume from.
"""
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

import metaphi.experiments.distill as distill_study
from metaphi.cli import main

from tiny import install_tiny, tiny_store


class Payload:
    """Unpickling it calls open(path, "w"): the file exists afterwards exactly when the payload ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_payload(path: Path, marker: Path) -> None:
    """A file that torch.load(weights_only=False) would unpickle, running the payload: torch's own zip
    format with the payload inside a checkpoint-like dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"phi": {}, "run": {}, "x": Payload(marker)}, path)
    assert zipfile.is_zipfile(path)


def refused(argv, capsys, marker: Path) -> None:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert not marker.exists(), f"metaphi {' '.join(argv)}: the payload ran"
    assert code == 2, f"metaphi {' '.join(argv)}: exit {code}, expected 2; stderr: {err}"
    assert err.strip() and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "not plain data" in err and "nothing in it ran" in err, err  # refused for the payload, not for another reason


def poison(folder: Path, marker: Path) -> int:
    """Every .pt under ``folder`` replaced by the payload and every result file removed; how many."""
    n = 0
    for p in sorted(folder.rglob("*.pt")):
        write_payload(p, marker)
        n += 1
    for p in set(folder.rglob("result*.json")):  # result.json and results.json
        p.unlink()
    return n


TINY_RUN = ["--benchmark", "tiny", "--iterations", "1", "--eval-tasks", "2", "--quiet"]


@pytest.fixture
def marker(tmp_path, monkeypatch):
    install_tiny(monkeypatch)
    return tmp_path / "payload-ran"


@pytest.mark.parametrize("argv", [
    lambda f: ["eval", str(f)],
    lambda f: ["predict", "--checkpoint", str(f), "--support", str(f.parent), "--query", str(f.parent)],
    lambda f: ["run", "maml", "--init", str(f), *TINY_RUN, "--out", str(f.parent / "o")],
    lambda f: ["run", "maml", "--init", f"ssl:{f}", *TINY_RUN, "--out", str(f.parent / "o")],
    lambda f: ["compare", f"maml@{f}", "--benchmark", "tiny", "--eval-tasks", "2", "--out", str(f.parent / "o")],
    lambda f: ["l2o", "eval", str(f)],
], ids=["eval", "predict", "run --init", "run --init ssl:", "compare NAME@FILE", "l2o eval"])
def test_a_checkpoint_named_on_the_command_line(tmp_path, capsys, marker, argv):
    f = tmp_path / "model.pt"
    write_payload(f, marker)
    refused(argv(f), capsys, marker)


def test_run_resume(tmp_path, capsys, marker):
    out = tmp_path / "run"
    write_payload(out / "checkpoint.pt", marker)
    refused(["run", "maml", *TINY_RUN, "--out", str(out), "--resume"], capsys, marker)


L2O = ["--family", "quadratic", "--horizon", "6", "--unroll", "3", "--iterations", "2", "--problems", "2",
       "--val-every", "1", "--val-problems", "2", "--eval-problems", "3", "--quiet"]
SEARCH = ["random", "--budget", "6", "--child-steps", "2", "--channels", "2", "--nodes", "2", "--batch", "16",
          "--retrain-steps", "3", "--quiet"]
STUDIES = {
    "reweight": ["reweight", "--epochs", "1", "--seeds", "0", "--methods", "plain,l2rw", "--hidden", "8",
                 "--noise", "none", "--imbalance", "10", "--quiet"],
    "augment": ["augment", "--methods", "none,gradient", "--seeds", "0", "--search-steps", "3", "--train-steps",
                "4", "--hidden", "4", "--batch", "16", "--val-batch", "20", "--samples", "2", "--quiet"],
    "distill": ["distill", "glyphs", "--pair", "mlp", "--methods", "alone,kd", "--teacher-epochs", "1",
                "--epochs", "1", "--seeds", "0", "--per-class", "2,1,1", "--batch", "4", "--quiet"],
    "continual": ["continual", "--method", "finetune", "--init", "scratch", "--seeds", "0", "--epochs", "1",
                  "--experiences", "2", "--classes-per-experience", "2", "--train-per-class", "2",
                  "--test-per-class", "2", "--hidden", "4", "--blocks", "2", "--quiet"],
    "domaingen": ["domaingen", "glyph-styles", "--domains", "plain,inverted,bold", "--classes", "3", "--iterations",
                  "2", "--seeds", "0", "--methods", "erm", "--batch", "3", "--hidden", "8", "--blocks", "2",
                  "--test-per-class", "2", "--adapt-per-class", "2", "--adapt-shots", "1", "--adapt-steps", "2",
                  "--adapt-draws", "2", "--held-out", "bold", "--quiet"],
    "l2o train --resume": ["l2o", "train", *L2O],
    "search-arch --resume": ["search-arch", *SEARCH],
}
RESUME = {"l2o train --resume": ["--resume"], "search-arch --resume": ["--resume"]}


@pytest.mark.parametrize("name", list(STUDIES))
def test_a_study_rerun_into_its_folder(tmp_path, capsys, monkeypatch, marker, name):
    monkeypatch.setattr(distill_study, "load_data", tiny_store)
    out = tmp_path / "study"
    argv = [*STUDIES[name], "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert poison(out, marker) >= 1, f"{name} left no .pt to resume from"
    refused([*argv, *RESUME.get(name, [])], capsys, marker)
