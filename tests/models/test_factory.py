"""A user's own module rebuilt from its checkpoint by ``module:callable`` (metaphi.models.factory): only
when the user names the callable, never from what the file says alone."""
import csv
import io
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from metaphi import checkpoint
from metaphi.algorithms.base import CLASSIFICATION, model_spec
from metaphi.algorithms.protonet import ProtoNet
from metaphi.cli import main
from metaphi.models import factory, from_factory
from metaphi.outer import build_estimator
from metaphi.train import TrainConfig, load_model, meta_train

USER_MODULE = '''
import torch
from torch import nn

CALLS = []


class Encoder(nn.Module):
    """A user's encoder: no ``spec``, no ``features``, its own layer names."""

    def __init__(self, width, size):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.proj = nn.Linear(width * (size // 2) ** 2, 16)

    def forward(self, x):
        return self.proj(torch.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def make_encoder(width=4, size=12):
    CALLS.append((width, size))
    return Encoder(width, size)


def not_a_module(**kwargs):
    return "no"
'''


@pytest.fixture
def usernets(tmp_path, monkeypatch):
    (tmp_path / "usernets_for_test.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import usernets_for_test

    importlib.reload(usernets_for_test)
    usernets_for_test.CALLS.clear()
    return usernets_for_test


def test_from_factory_builds_and_records_how(usernets):
    model = from_factory("usernets_for_test:make_encoder", width=3, size=12)
    assert isinstance(model, usernets.Encoder) and model.conv.out_channels == 3
    assert model_spec(model) == {"class": "usernets_for_test.Encoder", "factory": "usernets_for_test:make_encoder",
                                 "kwargs": {"width": 3, "size": 12}}
    for name, kwargs, words in [("usernets_for_test", {}, "named 'package.module:callable'"),
                                ("no_such_module_here:make", {}, "cannot import no_such_module_here"),
                                ("usernets_for_test:absent", {}, "has no absent"),
                                ("usernets_for_test:not_a_module", {}, "returned str, not a torch.nn.Module"),
                                ("usernets_for_test:make_encoder", {"width": torch.ones(1)}, "must be plain data"),
                                ("usernets_for_test:make_encoder", {"width": float("nan")}, "must be plain data")]:
        with pytest.raises(ValueError, match=words):
            from_factory(name, **kwargs)


def saved_run(tmp_path, model, run=None, size=12):
    algo = ProtoNet(model, CLASSIFICATION)
    sample = lambda n, g: __import__("metaphi.tasks", fromlist=["Task"]).Task(
        (torch.rand(n, 3, 1, size, size, generator=g), torch.arange(3).expand(n, 3)),
        (torch.rand(n, 3, 1, size, size, generator=g), torch.arange(3).expand(n, 3)))
    state = meta_train(algo, build_estimator("first-order"), sample, TrainConfig(iterations=2), out_dir=str(tmp_path),
                       progress=False, run=run or {})
    return tmp_path / "checkpoint.pt", state


def test_a_checkpoint_rebuilds_the_users_module_only_where_its_factory_is_named(tmp_path, usernets):
    path, state = saved_run(tmp_path, from_factory("usernets_for_test:make_encoder", width=5, size=12))
    usernets.CALLS.clear()
    with pytest.raises(checkpoint.CheckpointError, match="pass --model-factory usernets_for_test:make_encoder"):
        load_model(str(path))
    assert usernets.CALLS == []  # nothing the file named was called
    with factory.allowed("some.other:callable"):
        with pytest.raises(checkpoint.CheckpointError, match="--model-factory usernets_for_test:make_encoder"):
            load_model(str(path))
    with factory.allowed("usernets_for_test:make_encoder"):
        ck, algo = load_model(str(path))
    assert usernets.CALLS == [(5, 12)]  # rebuilt with the recorded arguments
    assert isinstance(algo.model, usernets.Encoder)
    for k, v in state.phi.items():
        assert torch.equal(ck["phi"][k], v.detach())
    # and the weights load into the user's own module by its own names
    mine = usernets.make_encoder(width=5, size=12)
    mine.load_state_dict(checkpoint.module_state(path))


def test_a_checkpoint_naming_another_callable_calls_nothing(tmp_path, usernets, monkeypatch):
    path, _ = saved_run(tmp_path, from_factory("usernets_for_test:make_encoder", width=2, size=12))
    ck = torch.load(path, weights_only=True)
    ck["algorithm"]["model"]["factory"] = "os:system"
    ck["algorithm"]["model"]["kwargs"] = {"command": "echo ran"}
    torch.save(ck, path)
    called = []
    monkeypatch.setattr("os.system", lambda *a, **k: called.append(a))
    with pytest.raises(checkpoint.CheckpointError, match="built by os:system; pass --model-factory os:system"):
        load_model(str(path))
    with factory.allowed("usernets_for_test:make_encoder"):  # the user's own name does not allow the file's
        with pytest.raises(checkpoint.CheckpointError, match="os:system"):
            load_model(str(path))
    assert called == []


def drawing(c: int, i: int, size: int = 24) -> np.ndarray:
    img = np.full((size, size), 255, np.uint8)
    if c == 0:
        img[4 + i:20 - i, 11:13] = 0  # a vertical bar
    elif c == 1:
        img[11:13, 4 + i:20 - i] = 0  # a horizontal one
    else:
        for k in range(4 + i, 20 - i):
            img[k, k] = 0  # a diagonal
    return img


def test_predict_and_eval_rebuild_a_users_module_with_model_factory(tmp_path, usernets, capsys):
    support, query = tmp_path / "support", tmp_path / "query"
    query.mkdir()
    for c, name in enumerate(["bar", "dash", "slash"]):
        (support / name).mkdir(parents=True)
        Image.fromarray(drawing(c, 0)).save(support / name / "a.png")
        Image.fromarray(drawing(c, 2)).save(query / f"{name}.png")
    run = {"benchmark": "glyphs", "data_root": None, "benchmark_options": {}, "ways": 3, "eval_shots": 1,
           "eval_query": 1, "eval_tasks": 3, "eval_seed": 0, "seed": 0,
           "input": {"kind": "image", "channels": 1, "height": 28, "width": 28, "scale": "x/255", "invert": True}}
    path, _ = saved_run(tmp_path / "run", from_factory("usernets_for_test:make_encoder", width=4, size=28), run,
                        size=28)
    args = ["predict", "--checkpoint", str(path), "--support", str(support), "--query", str(query)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pass --model-factory usernets_for_test:make_encoder" in err and err.count("\n") == 1
    assert main([*args, "--model-factory", "usernets_for_test:make_encoder"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted(r["file"].rsplit("/", 1)[-1] for r in rows) == ["bar.png", "dash.png", "slash.png"]
    assert all(r["prediction"] in ("bar", "dash", "slash") for r in rows)
    assert main(["eval", str(path), "--eval-tasks", "3", "--quiet"]) == 2
    assert "--model-factory usernets_for_test:make_encoder" in capsys.readouterr().err
    assert main(["eval", str(path), "--eval-tasks", "3", "--quiet",
                 "--model-factory", "usernets_for_test:make_encoder"]) == 0
