"""Self-supervised pre-training: the pretext pieces against hand computations, each objective
lowering its own loss on a fixed batch, and starting other learners from its body."""
import json
import math

import pytest
import torch

from metaphi.algorithms import build_algorithm, create_algorithm
from metaphi.algorithms.ssl import augment, body_of, nt_xent, rotations, start_from
from metaphi.outer import build_estimator
from metaphi.tasks import DataError
from metaphi.train import TrainConfig, load_checkpoint, meta_train
from tiny import install_tiny, tiny_benchmark


pytestmark = pytest.mark.usefixtures("one_thread")


def test_rotations_label_each_quarter_turn():
    x = torch.arange(2 * 9, dtype=torch.float).view(2, 1, 3, 3)
    views, labels = rotations(x)
    assert views.shape == (8, 1, 3, 3) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for view, label, original in zip(views, labels, x.repeat(4, 1, 1, 1)):
        assert torch.equal(torch.rot90(view, -int(label), dims=(-2, -1)), original)


def test_nt_xent_equals_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    total = 0.0
    for i in range(8):
        partner = (i + 4) % 8
        others = sum(math.exp(float(z[i] @ z[m]) / 0.5) for m in range(8) if m != i)
        total += -math.log(math.exp(float(z[i] @ z[partner]) / 0.5) / others)
    assert float(nt_xent(z1, z2, 0.5)) == pytest.approx(total / 8, rel=1e-12)


def test_augment_is_seeded_keeps_shape_and_range_and_varies():
    x = torch.zeros(6, 1, 12, 12)
    x[:, :, 3:9, 5:7] = 1.0
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a[0], a[1])


@pytest.mark.parametrize("name", ["ssl-rotation", "ssl-simclr"])
def test_pretraining_lowers_its_own_loss_on_a_fixed_batch(name):
    bench = tiny_benchmark()
    torch.manual_seed(0)
    algo = create_algorithm(name, bench, 3, 0.1, 0, 2)
    batch = algo.training_tasks(bench, 3, 1, 2)(2, torch.Generator().manual_seed(0))
    assert all(t.shape[:2] == (2, algo.batch_size) for t in batch.query)  # images only, no labels
    phi = algo.init_meta_params()
    optimizer = torch.optim.Adam(phi.values(), lr=1e-2)
    estimator = build_estimator("first-order")
    losses = []
    for _ in range(15):
        grads, metrics = estimator(algo, phi, batch)
        losses.append(metrics["loss"])
        for k, p in phi.items():
            p.grad = grads[k]
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0], losses


def ssl_checkpoint(tmp_path, name="ssl-rotation"):
    bench = tiny_benchmark()
    torch.manual_seed(0)
    algo = create_algorithm(name, bench, 3, 0.1, 0, 2)
    meta_train(algo, build_estimator("first-order", {"loop": True}), algo.training_tasks(bench, 3, 1, 2),
               TrainConfig(iterations=2, meta_batch=1), out_dir=str(tmp_path), progress=False)
    return bench, str(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("name", ["ssl-rotation", "ssl-simclr"])
def test_checkpoint_rebuilds_and_fine_tunes_to_predict(tmp_path, name):
    bench, path = ssl_checkpoint(tmp_path, name)
    ck = load_checkpoint(path)
    algo = build_algorithm(ck["algorithm"])
    assert algo.name == name and algo.spec() == ck["algorithm"]
    task = bench.episodes("test", 3, 2, 3).sample(torch.Generator().manual_seed(0))
    logits = algo.predict(ck["phi"], task.support, task.query[0], 2)
    assert logits.shape == (9, 3) and torch.isfinite(logits).all()
    per_step = algo.evaluate(ck["phi"], task, 2)
    assert per_step.shape == (3,) and per_step[0] == pytest.approx(1 / 3)  # the zero head: all tied
    assert (logits.argmax(-1) == task.query[1]).float().mean() == per_step[-1]


@pytest.mark.parametrize("name", ["maml", "metasgd", "protonet", "relation"])
def test_start_from_copies_the_body_only(tmp_path, name):
    bench, path = ssl_checkpoint(tmp_path)
    body = body_of(load_checkpoint(path)["phi"])
    torch.manual_seed(1)
    plain = create_algorithm(name, bench, 3, 0.1, 1, 1)
    own = plain.init_meta_params()
    started = start_from(plain, "ssl:" + path)
    phi = started.init_meta_params()
    assert phi.keys() == own.keys() and started.spec() == plain.spec() and started.name == name
    copied = [k for k in phi if k.split(".", 1)[1] in body and k.split(".", 1)[0] in ("init", "embed")]
    assert copied and all(k.split(".", 1)[1].startswith("body.") for k in copied)
    for k in phi:
        if k in copied:
            assert torch.equal(phi[k], body[k.split(".", 1)[1]]) and phi[k].requires_grad
        else:  # heads, relation modules, Meta-SGD's step sizes ("rule.body.*") stay the learner's own
            assert torch.equal(phi[k], own[k]), k


def test_start_from_refuses_another_network(tmp_path):
    _, path = ssl_checkpoint(tmp_path)
    from metaphi.tasks.registry import image_benchmark

    wide = tiny_benchmark()
    wide = image_benchmark("wide", wide.splits, wide.defaults, hidden=16)
    with pytest.raises(DataError, match="has shape"):
        start_from(create_algorithm("maml", wide, 3, 0.1, 1, 1), path)
    with pytest.raises(DataError, match="no checkpoint"):
        start_from(create_algorithm("maml", wide, 3, 0.1, 1, 1), str(tmp_path / "missing.pt"))


def test_cli_maml_from_a_self_supervised_run(tmp_path, monkeypatch, capsys):
    from metaphi.cli import main

    install_tiny(monkeypatch)
    common = ["--benchmark", "tiny", "--no-baselines", "--quiet", "--val-tasks", "2"]
    assert main(["run", "ssl-rotation", *common, "--out", str(tmp_path / "ssl")]) == 0
    ssl_ck = str(tmp_path / "ssl" / "checkpoint.pt")
    assert main(["run", "maml", *common, "--init", "ssl:" + ssl_ck, "--iterations", "0",
                 "--out", str(tmp_path / "maml")]) == 0
    result = json.loads((tmp_path / "maml" / "result.json").read_text())
    assert result["init"] == "ssl:" + ssl_ck
    maml_ck = load_checkpoint(str(tmp_path / "maml" / "checkpoint.pt"))
    assert maml_ck["run"]["init"] == "ssl:" + ssl_ck
    ssl_body = body_of(load_checkpoint(ssl_ck)["phi"])
    assert all(torch.equal(v, ssl_body[k]) for k, v in body_of(maml_ck["phi"]).items())  # 0 iterations
    assert main(["eval", str(tmp_path / "maml" / "checkpoint.pt"), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["mean"] == pytest.approx(result["mean"])
    capsys.readouterr()
    # "ssl:" insists on a self-supervised run
    assert main(["run", "maml", *common, "--init", "ssl:" + str(tmp_path / "maml" / "checkpoint.pt"),
                 "--out", str(tmp_path / "again")]) == 2
    assert "not a self-supervised one" in capsys.readouterr().err
