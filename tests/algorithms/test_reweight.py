"""Sample reweighting methods (metaphi/algorithms/reweight.py): L2RW and Meta-Weight-Net against
independent computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaphi.algorithms import reweight as rw
from metaphi.experiments import reweight as study
from metaphi.functional import call, params_of
from metaphi.models import MLP
from metaphi.outer import build_estimator
from metaphi.tasks import Task


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
    split = study.make_splits(load_digits(), 10, 20, study.Corruption(), seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = study.build_model({"name": "mlp", "hidden": [32]}, 10, (1, 8, 8))
    params, _ = study.train("plain", model, params_of(model, False), split["train"], None,
                            study.TrainConfig(epochs=6, lr=0.03), torch.Generator().manual_seed(0))
    assert study.accuracy(model, params, *split["test"]) > 0.8  # the model has learned something
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
    grads, _ = build_estimator("second-order", {"loop": True})(algo, phi, tasks)
    first, _ = build_estimator("first-order", {"loop": True})(algo, phi, tasks)
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
    exact, _ = build_estimator("second-order", {"loop": True})(algo, phi, tasks)
    es = build_estimator("es", {"population": 400, "sigma": 1e-4, "shaping": "none", "estimator_seed": 0})
    approx, metrics = es(algo, phi, tasks)
    a = torch.cat([approx[k].reshape(-1) for k in phi])
    b = torch.cat([exact[k].reshape(-1) for k in phi])
    assert float(a @ b / (a.norm() * b.norm())) > 0.8
    with torch.no_grad():
        assert abs(metrics["loss"] - float(algo.task_loss(phi, tasks.unstack()[0])[0])) < 1e-12
