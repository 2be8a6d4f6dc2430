"""Sample reweighting (metaphi/reweight.py): L2RW and Meta-Weight-Net against independent computations."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from metaphi.experiments import reweight as rw
from metaphi.functional import call, params_of
from metaphi.models import MLP
from metaphi.outer import build_estimator
from metaphi.tasks import Task
import shared_data
from metaphi.evaluate import mean_ci95, t_quantile_975


def _problem(seed: int = 0, n: int = 12, m: int = 10, dtype=torch.float64):
    """A tanh MLP (smooth, for finite differences), a training batch and a meta batch, all float64."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MLP(6, 3, (7,), activation="tanh").to(dtype)
    params = params_of(model, False)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(3, (n,), generator=g)
    xm = torch.randn(m, 6, generator=g, dtype=dtype)
    ym = torch.randint(3, (m,), generator=g)
    return model, params, (x, y), (xm, ym)


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(params.values()))])


@pytest.mark.parametrize("mode", rw.L2RW_MODES)
def test_l2rw_scores_equal_per_example_dot_products_float64(mode):
    model, params, batch, meta = _problem()
    lr = 0.3
    scores = rw.l2rw_scores(model, params, batch, meta, lr, mode)
    theta = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    g_meta = _flat_grad(F.cross_entropy(call(model, theta, meta[0]), meta[1]), theta)
    # independent 1: α ∇ℓ_i · ∇L_meta, one plain autograd gradient per example
    expected = torch.stack([lr * _flat_grad(F.cross_entropy(call(model, theta, batch[0][i:i + 1]),
                                                            batch[1][i:i + 1]), theta) @ g_meta
                            for i in range(len(batch[1]))])
    # independent 2: −∂L_meta/∂ε at ε = 0 through a hand-written virtual step, plain autograd only
    eps = torch.zeros(len(batch[1]), dtype=torch.float64, requires_grad=True)
    weighted = (eps * F.cross_entropy(call(model, theta, batch[0]), batch[1], reduction="none")).sum()
    grads = torch.autograd.grad(weighted, list(theta.values()), create_graph=True)
    stepped = {k: v - lr * g for (k, v), g in zip(theta.items(), grads)}
    direct = -torch.autograd.grad(F.cross_entropy(call(model, stepped, meta[0]), meta[1]), eps)[0]
    assert scores.dtype == torch.float64
    assert torch.allclose(direct, expected, rtol=1e-10, atol=1e-13)
    assert torch.allclose(scores, expected, rtol=1e-10, atol=1e-13)
    assert (scores > 0).any() and (scores < 0).any()  # the clipping below is exercised


def test_l2rw_weights_are_clipped_and_normalised():
    scores = torch.tensor([0.5, -1.0, 0.0, 1.5, -0.2], dtype=torch.float64)
    w = rw.l2rw_weights(scores)
    assert torch.allclose(w, torch.tensor([0.25, 0.0, 0.0, 0.75, 0.0], dtype=torch.float64))
    assert torch.equal(rw.l2rw_weights(-scores.abs()), torch.zeros(5, dtype=torch.float64))
    model, params, batch, meta = _problem(seed=3)
    w = rw.l2rw_weights(rw.l2rw_scores(model, params, batch, meta, 0.1))
    assert (w >= 0).all() and abs(float(w.sum()) - 1.0) < 1e-12


def test_l2rw_down_weights_a_planted_mislabelled_example():
    """A partly trained digits MLP; batches of 20 training images where the first gets a wrong label.

    L2RW's criterion is greedy (one step ahead), so a single wrong label is not always weighted 0
    (on a well-fit model, lowering confidence can help the meta loss); over 20 plantings it should be
    weighted 0 nearly always, get far less than the correct ones, and score below its own correct label."""
    from metaphi.tasks.digits import load_digits
    split = rw.make_splits(load_digits(), 10, 20, rw.Corruption(), seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = rw.build_model({"name": "mlp", "hidden": [32]}, 10, (1, 8, 8))
    params, _ = rw.train("plain", model, params_of(model, False), split["train"], None,
                         rw.ReweightConfig(epochs=6, lr=0.03), torch.Generator().manual_seed(0))
    assert rw.accuracy(model, params, *split["test"]) > 0.8  # the model has learned something
    x, y = split["train"]
    planted_w, others_w, zero, below_own = [], [], 0, 0
    for batch in range(10):
        bx, by = x[batch * 20:(batch + 1) * 20], y[batch * 20:(batch + 1) * 20]
        clean = rw.l2rw_scores(model, params, (bx, by), split["meta"], 0.03)
        for shift in (1, 5):
            wrong = by.clone()
            wrong[0] = (by[0] + shift) % 10
            scores = rw.l2rw_scores(model, params, (bx, wrong), split["meta"], 0.03)
            w = rw.l2rw_weights(scores)
            planted_w.append(float(w[0]))
            others_w.append(float(w[1:].mean()))
            zero += float(w[0]) == 0.0
            below_own += float(scores[0]) < float(clean[0])
    assert zero >= 16, planted_w
    assert below_own >= 16
    assert sum(planted_w) / len(planted_w) < 0.25 * sum(others_w) / len(others_w)


def _mwnet_lookahead(normalize: bool, seed: int = 1):
    model, params, batch, meta = _problem(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = rw.MetaWeightNet(hidden=5).to(torch.float64)
    phi = params_of(net)
    algo = rw.WeightedLookahead(model, params, 0.5, rw.mwnet_weigh(net, normalize))
    return algo, phi, Task.stack([Task(batch, meta)])


@pytest.mark.parametrize("normalize", [True, False])
def test_mwnet_meta_gradient_matches_finite_differences_float64(normalize):
    algo, phi, tasks = _mwnet_lookahead(normalize)
    grads, _ = build_estimator("second-order")(algo, phi, tasks)
    first, _ = build_estimator("first-order")(algo, phi, tasks)
    task = tasks.unstack()[0]
    h = 1e-6
    for k, v in phi.items():
        fd = torch.zeros_like(v)
        for i in range(v.numel()):
            shifted = []
            for sign in (1.0, -1.0):
                p = {kk: vv.detach().clone() for kk, vv in phi.items()}
                p[k].view(-1)[i] += sign * h
                shifted.append(float(algo.task_loss(p, task)[0]))
            fd.view(-1)[i] = (shifted[0] - shifted[1]) / (2 * h)
        assert torch.allclose(grads[k], fd, rtol=1e-6, atol=1e-9), k
        # θ is a constant of φ, so the first-order estimator differentiates the same lookahead
        assert torch.allclose(first[k], grads[k], rtol=1e-12, atol=1e-15), k
    assert sum(float(g.abs().sum()) for g in grads.values()) > 1e-6


def test_es_estimate_on_mwnet_points_along_the_true_gradient():
    algo, phi, tasks = _mwnet_lookahead(True, seed=2)
    exact, _ = build_estimator("second-order")(algo, phi, tasks)
    es = build_estimator("es", population=400, sigma=1e-4, shaping="none", seed=0)
    approx, metrics = es(algo, phi, tasks)
    a = torch.cat([approx[k].reshape(-1) for k in phi])
    b = torch.cat([exact[k].reshape(-1) for k in phi])
    assert float(a @ b / (a.norm() * b.norm())) > 0.8
    with torch.no_grad():
        assert abs(metrics["loss"] - float(algo.task_loss(phi, tasks.unstack()[0])[0])) < 1e-12


def test_splits_are_disjoint_clean_and_corrupted_as_asked():
    from metaphi.tasks.digits import load_digits
    data = load_digits()
    split = rw.make_splits(data, 10, 50, rw.Corruption("uniform", 0.4, 10.0), seed=3)
    assert torch.equal(torch.bincount(split["meta"][1], minlength=10), torch.full((10,), 10))
    assert torch.equal(torch.bincount(split["test"][1], minlength=10), torch.full((10,), 50))
    counts = split["train_counts"]
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.1) and counts == sorted(counts, reverse=True)
    idx = split["indices"]
    parts = [set(idx[k].tolist()) for k in ("train", "meta", "test")]
    assert sum(map(len, parts)) == len(set.union(*parts)) == len(split["train"][1]) + 100 + 500  # disjoint
    assert torch.equal(data.targets[idx["meta"]], split["meta"][1])  # meta and test labels are clean
    assert torch.equal(data.targets[idx["test"]], split["test"][1])
    assert torch.equal(data.targets[idx["train"]] != split["train"][1], split["noisy"])
    assert torch.equal(data.images[idx["train"]].float() / 255, split["train"][0])
    assert 0.25 < float(split["noisy"].float().mean()) < 0.45  # 0.4 · 9/10 expected
    again = rw.make_splits(data, 10, 50, rw.Corruption("uniform", 0.4, 10.0), seed=3)
    assert torch.equal(again["train"][1], split["train"][1]) and torch.equal(again["train"][0], split["train"][0])


def test_reweighting_moves_weight_off_noisy_labels():
    from metaphi.tasks.digits import load_digits
    split = rw.make_splits(load_digits(), 10, 20, rw.Corruption("uniform", 0.4), seed=0)
    cfg = rw.ReweightConfig(epochs=6, lr=0.03)
    shares = {}
    for method in ("plain", "l2rw", "mwnet"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = rw.build_model({"name": "mlp", "hidden": [32]}, 10, (1, 8, 8))
        _, hist = rw.train(method, model, params_of(model, False), split["train"], split["meta"], cfg,
                           torch.Generator().manual_seed(1), noisy=split["noisy"])
        shares[method] = hist["noisy_weight_share"][-1]
    noisy = float(split["noisy"].float().mean())
    assert shares["plain"] == pytest.approx(noisy, abs=0.05)
    assert shares["l2rw"] < 0.5 * noisy
    assert shares["mwnet"] < shares["plain"]


def test_t_interval():
    assert t_quantile_975(4) == 2.776
    for df, q in ((40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert t_quantile_975(df) == pytest.approx(q, abs=1e-3)
    m, ci = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and ci == pytest.approx(2.776 * (2.5 ** 0.5) / 5 ** 0.5)


def test_run_experiment_resumes_from_its_checkpoint(tmp_path):
    ck = str(tmp_path / "checkpoint.pt")
    cfg = rw.ReweightConfig(epochs=1)
    kw = dict(data="digits", methods=("plain", "l2rw"), seeds=(0, 1), corruption=rw.Corruption("flip", 0.4),
              model={"name": "mlp", "hidden": [16]}, cfg=cfg, meta_per_class=5, test_per_class=10)
    first = rw.run_experiment(**kw, checkpoint=ck, log=lambda *a: None)
    messages = []
    second = rw.run_experiment(**kw, checkpoint=ck, log=messages.append)
    assert messages == ["resuming: 4 runs done"]
    assert [r["test_acc"] for r in first["rows"]] == [r["test_acc"] for r in second["rows"]]
    fresh = rw.run_experiment(**kw, log=lambda *a: None)  # a run is a function of its seed alone
    assert [r["test_acc"] for r in fresh["rows"]] == [r["test_acc"] for r in first["rows"]]
    with pytest.raises(ValueError, match="different configuration"):
        rw.run_experiment(**{**kw, "seeds": (0,)}, checkpoint=ck, log=lambda *a: None)


def test_cli_reweight(tmp_path, capsys):
    from metaphi.cli import main
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


OMNIGLOT = str(shared_data.OMNIGLOT)


@pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "images_background_small1.zip")),
                    reason="the Omniglot minimal archive images_background_small1.zip is not available")
def test_omniglot_small1_many_classes(tmp_path):
    result = rw.run_experiment("omniglot", ("plain", "l2rw"), (0,), rw.Corruption("uniform", 0.4),
                               {"name": "mlp", "hidden": [32]}, rw.ReweightConfig(epochs=1, batch=50),
                               meta_per_class=2, test_per_class=4, classes=20, data_root=OMNIGLOT,
                               log=lambda *a: None)
    assert len(result["rows"]) == 2 and all(0 <= r["test_acc"] <= 1 for r in result["rows"])
    assert result["rows"][0]["train_size"] == 20 * 14
