"""--log csv,tensorboard,wandb: the same rows as metrics.jsonl, the run's config attached; a resumed
run's files hold exactly its checkpointed rows plus the new ones. TensorBoard and W&B are optional
packages: stand-ins record what metaphi hands them (their own file formats are theirs to test)."""
import csv
import json
import sys
import types

import pytest

from metaphi.cli import main
from tiny import install_tiny

RUN = ["maml", "--benchmark", "tiny", "--val-every", "2", "--eval-tasks", "2", "--no-baselines", "--quiet"]


def jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_csv_holds_the_rows_of_metrics_jsonl_and_a_resume_continues_it(tmp_path, monkeypatch):
    install_tiny(monkeypatch)
    out = tmp_path / "run"
    assert main(["run", *RUN, "--iterations", "3", "--log", "csv", "--out", str(out)]) == 0
    assert main(["run", *RUN, "--iterations", "5", "--log", "csv", "--out", str(out), "--resume"]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    expected = jsonl(out / "metrics.jsonl")
    assert [int(r["iteration"]) for r in rows] == [r["iteration"] for r in expected] == [1, 2, 3, 4, 5]
    for r, e in zip(rows, expected):
        assert float(r["loss"]) == pytest.approx(e["loss"], rel=1e-12)
        assert (r["val"] == "") == ("val" not in e)


class FakeWriter:
    made = []

    def __init__(self, logdir):
        self.logdir, self.scalars, self.texts, self.closed = logdir, [], [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text):
        self.texts.append((tag, text))

    def close(self):
        self.closed = True


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_tensorboard_and_wandb_get_the_same_scalars_and_the_config(tmp_path, monkeypatch):
    install_tiny(monkeypatch)
    import metaphi.loggers as loggers

    runs = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: runs.append(FakeWandbRun(**kw))
                                                                    or runs[-1]))
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: object())
    out = tmp_path / "run"
    FakeWriter.made.clear()
    assert main(["run", *RUN, "--iterations", "3", "--log", "tensorboard,wandb", "--out", str(out)]) == 0
    expected = jsonl(out / "metrics.jsonl")
    writer, run = FakeWriter.made[0], runs[0]
    assert writer.logdir == str(out / "tensorboard") and writer.closed and "algorithm: maml" in writer.texts[0][1]
    assert sorted((s, t) for t, _, s in writer.scalars) == sorted(
        (r["iteration"], k) for r in expected for k in r if k != "iteration")
    assert [s for s, _ in run.logged] == [1, 2, 3] and run.finished
    assert run.init["config"]["algorithm"] == "maml" and run.init["config"]["iterations"] == 3
    assert [d["loss"] for _, d in run.logged] == [r["loss"] for r in expected]
    # a --resume refused for other settings opens no logger (no stray W&B run, no event file); one that
    # goes on continues the same W&B run
    assert main(["run", *RUN, "--iterations", "4", "--seed", "5", "--log", "tensorboard,wandb", "--out", str(out),
                 "--resume"]) == 2
    assert len(runs) == 1 and len(FakeWriter.made) == 1
    assert main(["run", *RUN, "--iterations", "4", "--log", "tensorboard,wandb", "--out", str(out), "--resume"]) == 0
    assert len(runs) == 2 and runs[1].init["id"] == runs[0].init["id"] and runs[1].init["resume"] == "allow"
    assert [s for s, _ in runs[1].logged] == [4]


def test_a_missing_package_or_unknown_logger_exits_2_before_anything_runs(tmp_path, capsys, monkeypatch):
    import metaphi.loggers as loggers

    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)
    for log, message in [("wandb", "pip install wandb"), ("csv,nope", "unknown logger 'nope'")]:
        assert main(["run", "maml", "--benchmark", "glyphs", "--log", log, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
