"""``metaphi compare``: method specifications, the same test episodes for every method, one method
started from another, and the table, JSON and plot it writes."""
import json

import pytest
import torch

from metaphi import evaluate as evaluate_module
from metaphi.cli import main
from metaphi.experiments.compare import Method, parse_method
from tiny import install_tiny


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, method", [
    ("maml", Method("maml", "maml")),
    ("maml@ssl-rotation", Method("maml@ssl-rotation", "maml", "ssl-rotation")),
    ("maml@ssl-rotation:iterations=5,meta_lr=0.01",
     Method("maml@ssl-rotation", "maml", "ssl-rotation", {"iterations": 5, "meta_lr": 0.01})),
    ("long=maml:iterations=5", Method("long", "maml", None, {"iterations": 5})),
    ("p=protonet@ssl:/a/b.pt:train-ways=20", Method("p", "protonet", "ssl:/a/b.pt", {"train_ways": 20})),
    ("maml@ssl=maml@runs/c.pt:iterations=0", Method("maml@ssl", "maml", "runs/c.pt", {"iterations": 0})),
    ("protonet:estimator=first-order", Method("protonet", "protonet", None, {"estimator": "first-order"})),
])
def test_parse_method(text, method):
    assert parse_method(text) == method


def test_compare_runs_every_method_on_the_same_test_tasks(tmp_path, monkeypatch, capsys):
    install_tiny(monkeypatch)
    runs: list[list] = []
    original = evaluate_module.fixed_tasks

    def recording(sampler, n, seed):
        if n == 7:  # the test tasks, not the validation ones
            runs.append([])
        for task in original(sampler, n, seed):
            if n == 7:
                runs[-1].append(task)
            yield task

    monkeypatch.setattr(evaluate_module, "fixed_tasks", recording)
    out = tmp_path / "cmp"
    methods = ["protonet", "relation:train_ways=4", "ssl-rotation:eval_steps=1", "maml@ssl-rotation:iterations=1",
               "pretrain:eval_steps=2"]
    assert main(["compare", *methods, "--benchmark", "tiny", "--eval-tasks", "7", "--val-tasks", "2", "--quiet",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    labels = ["protonet", "relation", "ssl-rotation", "maml@ssl-rotation", "pretrain"]
    assert summary["methods"] == labels and summary["eval_tasks"] == 7
    results = summary["results"]
    assert results["relation"]["train_ways"] == 4 and results["maml@ssl-rotation"]["iterations"] == 1
    assert results["maml@ssl-rotation"]["init"] == results["ssl-rotation"]["checkpoint"]
    assert [len(results[k]["per_step"]) for k in labels] == [1, 1, 2, 3, 3]
    for r in results.values():
        assert r["parameters"] > 0 and r["wall_seconds"] > 0 and 0 <= r["mean"] <= 1
    # five methods, one sequence of test tasks
    assert len(runs) == 5 and all(len(r) == 7 for r in runs)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert all(torch.equal(x, y) for x, y in zip(a.support + a.query, b.support + b.query))
    md = (out / "compare.md").read_text()
    assert md.strip() in table
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(labels) and "± " in rows[1]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --reuse keeps finished methods whose settings are unchanged
    assert main(["compare", *methods[:2], "--benchmark", "tiny", "--eval-tasks", "7", "--val-tasks", "2",
                 "--out", str(out), "--reuse"]) == 0
    assert capsys.readouterr().err.count("reusing") == 2


@pytest.mark.parametrize("methods, message", [
    (["maml:ways=20"], "ways is the same for every method"),
    (["maml:bogus=1"], "unknown setting 'bogus'"),
    (["maml@protonet", "protonet"], "which must come before it"),
    (["maml@nowhere"], "neither an earlier method nor a checkpoint"),
    (["maml", "maml"], "two methods are labelled 'maml'"),
    (["nope"], "unknown algorithm 'nope'"),
    (["maml:solver=cg"], "--solver applies to the implicit estimator, not second-order"),
    (["protonet:reg=2"], "--reg applies to imaml, not protonet"),
    (["maml:resume=true"], "unknown setting 'resume'"),
    (["protonet:distance=manhattan"], "distance: 'manhattan' is not one of euclidean, cosine"),
])
def test_bad_methods_exit_2_with_one_line(tmp_path, monkeypatch, capsys, methods, message):
    install_tiny(monkeypatch)
    assert main(["compare", *methods, "--benchmark", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_compare_takes_a_config_file_and_family_options_per_method(tmp_path, monkeypatch, capsys):
    """A YAML file gives the methods and the base run settings; a flag overrides the file; a method's
    family option reaches its run config, which its folder's config.yaml records."""
    import yaml

    install_tiny(monkeypatch)
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({"methods": ["protonet", "cos=protonet:distance=cosine,cosine_scale=5"],
                                      "base": {"benchmark": "tiny", "eval_tasks": 4, "val_tasks": 2, "iterations": 5},
                                      "quiet": True}))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--iterations", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["methods"] == ["protonet", "cos"] and summary["eval_tasks"] == 4
    assert all(r["iterations"] == 1 for r in summary["results"].values())  # the flag, not the file's 5
    cos = yaml.safe_load((out / "cos" / "config.yaml").read_text())
    assert cos["algorithm"] == "protonet" and cos["algorithm_options"] == {"distance": "cosine", "cosine_scale": 5.0}
    plain = yaml.safe_load((out / "protonet" / "config.yaml").read_text())
    assert plain["algorithm_options"]["distance"] == "euclidean"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["methods"] == ["protonet", "cos=protonet:distance=cosine,cosine_scale=5"]
    assert saved["base"]["iterations"] == 1 and saved["base"]["benchmark"] == "tiny"
    # a method's config.yaml reruns it with metaphi run
    capsys.readouterr()
    assert main(["run", "--config", str(out / "cos" / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["mean"] == summary["results"]["cos"]["mean"]
    config.write_text(yaml.safe_dump({"methods": ["protonet"], "base": {"benchmark": "tiny", "bogus": 1}}))
    capsys.readouterr()
    assert main(["compare", "--config", str(config), "--out", str(out)]) == 2
    assert "base: unknown option bogus" in capsys.readouterr().err
