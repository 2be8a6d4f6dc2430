import json

import numpy as np
import pytest
import torch

from metaphi.algorithms import Algorithm, create_algorithm
from metaphi.tasks.registry import build_benchmark
from metaphi.cli import main
from metaphi.inner import Unroll
from metaphi.outer import build_estimator
from metaphi.outer.es import (CMAES, EvolutionStrategies, centered_ranks, derived_seed, es_gradient, es_step,
                              flatten, unflatten)
from metaphi.tasks import Task
from metaphi.train import TrainConfig, load_checkpoint, meta_train


def quadratic(dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    h = a @ a.T / dim + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    theta = torch.randn(dim, generator=g, dtype=torch.float64)
    return (lambda x: 0.5 * ((x @ h) * x).sum(-1) + x @ b), theta, h @ theta + b


def cosine(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("shaping", ["none", "centered_ranks"])
def test_es_estimate_converges_to_the_true_gradient_of_a_quadratic(shaping):
    f, theta, true = quadratic()
    # the true gradient comes from the closed form H θ + b; check autograd agrees, in float64
    x = theta.clone().requires_grad_()
    assert torch.allclose(torch.autograd.grad(f(x[None]).sum(), x)[0], true)
    cos = []
    for pairs in (10, 4000):
        g, losses = es_step(f, theta, 1e-3, pairs, torch.Generator().manual_seed(0), shaping)
        assert losses.shape == (2 * pairs,)
        cos.append(cosine(g, true))
    assert cos[1] > 0.95 and cos[1] > cos[0]
    if shaping == "none":  # the raw estimate has the gradient's scale as well as its direction
        assert float(g.norm() / true.norm()) == pytest.approx(1.0, abs=0.1)


def test_antithetic_pairs_cancel_the_constant_term():
    f, theta, _ = quadratic(dim=8)
    noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pop = torch.cat([theta + 0.1 * noise, theta - 0.1 * noise])
    g = es_gradient(f(pop), noise, 0.1, "none")
    g_shifted = es_gradient(f(pop) + 1e3, noise, 0.1, "none")
    assert torch.allclose(g, g_shifted, atol=1e-9)
    assert torch.equal(es_gradient(torch.full((32,), 7.0, dtype=torch.float64), noise, 0.1, "none"),
                       torch.zeros(8, dtype=torch.float64))
    # an even function of the perturbation (here the curvature term at the centre) cancels within each pair
    even = ((pop - theta) ** 2).sum(-1)
    assert torch.allclose(es_gradient(even, noise, 0.1, "none"), torch.zeros(8, dtype=torch.float64), atol=1e-12)
    # without the antithetic partner, the constant term leaks into a single-sided estimate
    one_sided = ((f(pop[:16]) + 1e3)[:, None] * noise).mean(0) / 0.1
    assert float(one_sided.norm()) > 100 * float(g.norm())


def test_centered_ranks_ignore_the_scale_of_the_loss():
    values = torch.tensor([3.0, -1.0, 10.0, 2.0])
    assert torch.allclose(centered_ranks(values), torch.tensor([1 / 6, -0.5, 0.5, -1 / 6], dtype=torch.float64))
    noise = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(es_gradient(values, noise, 0.1), es_gradient(torch.exp(values), noise, 0.1))


def test_flatten_round_trip_keeps_a_population_dimension():
    phi = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    flat = flatten(phi, ["a", "b"])
    back = unflatten(torch.stack([flat, 2 * flat]), phi, ["a", "b"])
    assert back["a"].shape == (2, 2, 3) and torch.equal(back["b"][1], 2 * phi["b"])


def sinusoid_maml():
    bench = build_benchmark("sinusoid")
    torch.manual_seed(0)
    algo = create_algorithm("maml", bench, 1, 0.01, 1, 2)
    return algo, algo.training_tasks(bench, 1, 5, 5)


def test_es_population_under_vmap_matches_the_loop():
    algo, sample = sinusoid_maml()
    phi = algo.init_meta_params()
    tasks = sample(3, torch.Generator().manual_seed(0))
    results = []
    for vectorize in (True, False):
        est = EvolutionStrategies(population=6, sigma=0.05, seed=3, vectorize=vectorize)
        results.append(est(algo, phi, tasks))
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
    for k in phi:
        assert torch.allclose(results[0][0][k], results[1][0][k], atol=1e-6), k


def test_es_perturbs_only_the_named_entries():
    algo, sample = sinusoid_maml()
    phi = algo.init_meta_params()
    grads, _ = EvolutionStrategies(4, 0.01, seed=0, prefixes=["init.head"])(algo, phi, sample(2, torch.Generator()))
    moved = {k for k, v in grads.items() if v.abs().sum() > 0}
    assert moved and all(k.startswith("init.head.") for k in moved)


def test_es_run_is_reproducible_from_its_seed_and_resumes_exactly(tmp_path):
    algo, sample = sinusoid_maml()
    est = build_estimator("es", {"population": 8, "sigma": 0.02})
    cfg = lambda n, seed=0: TrainConfig(iterations=n, meta_batch=2, checkpoint_every=2, seed=seed, meta_lr=1e-2)
    a = meta_train(algo, est, sample, cfg(4), out_dir=str(tmp_path / "a"), progress=False)
    b = meta_train(algo, est, sample, cfg(4), progress=False)  # the same estimator object, reused
    c = meta_train(algo, est, sample, cfg(4, seed=1), progress=False)
    meta_train(algo, est, sample, cfg(2), out_dir=str(tmp_path / "r"), progress=False)
    fresh = build_estimator("es", {"population": 8, "sigma": 0.02})
    r = meta_train(algo, fresh, sample, cfg(4), out_dir=str(tmp_path / "r"), resume=True, progress=False)
    for k in a.phi:
        assert torch.equal(a.phi[k], b.phi[k]) and torch.equal(a.phi[k], r.phi[k]), k
    assert any(not torch.equal(a.phi[k], c.phi[k]) for k in a.phi)
    assert load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))["estimator"] == {"seed": 0, "step": 4}


def test_derived_seeds_differ_by_step_and_seed():
    seeds = {derived_seed(s, t) for s in range(5) for t in range(50)}
    assert len(seeds) == 250 and all(0 <= s < 2 ** 63 for s in seeds)


class Rounded(Algorithm):
    """A task loss with zero gradient almost everywhere, that also cannot run under vmap (.item())."""

    name = "rounded"
    estimators = ("first-order",)

    def init_meta_params(self):
        return {"w": torch.zeros(3, requires_grad=True)}

    def task_loss(self, phi, task, unroll=Unroll()):
        target = task.support[0]
        w = torch.round(phi["w"] * 20) / 20
        loss = ((w - target) ** 2).sum()
        assert float(loss.detach()) >= 0  # .item() under the hood: vmap refuses it
        return loss, {}

    def spec(self):
        return {"class": "rounded"}


def test_es_optimizes_a_piecewise_constant_loss_and_falls_back_to_a_loop():
    target = torch.tensor([0.5, -0.3, 0.8])
    sample = lambda n, g: Task((target.expand(n, 3) + 0.01 * torch.randn(n, 3, generator=g),), (torch.zeros(n, 1),))
    est = EvolutionStrategies(population=16, sigma=0.1, vectorize=True)
    state = meta_train(Rounded(), est, sample, TrainConfig(iterations=150, meta_batch=2, meta_lr=0.05), progress=False)
    assert est._vmap_ok is False
    assert torch.allclose(state.phi["w"].detach(), target, atol=0.1)


def test_cli_runs_maml_with_es(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "maml", "--benchmark", "sinusoid", "--iterations", "3", "--meta-batch", "2", "--eval-tasks", "10",
            "--val-tasks", "5", "--quiet", "--no-baselines", "--estimator", "es", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "result.json").read_text())
    assert first["estimator"] == "es" and first["iterations"] == 3
    assert load_checkpoint(str(out / "checkpoint.pt"))["estimator"]["step"] == 3
    assert main(args[:-2] + ["--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "result.json").read_text())["mean"] == first["mean"]


def test_cma_es_minimizes_a_small_quadratic_without_touching_numpy_global_state():
    pytest.importorskip("cma")
    before = np.random.get_state()[1].copy()
    target = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    runs = []
    for _ in range(2):
        opt = CMAES([0.0, 0.0, 0.0], 0.3, torch.Generator().manual_seed(0), popsize=8)
        for _ in range(40):
            xs = opt.ask()
            opt.tell(xs, ((xs - target) ** 2).sum(-1).tolist())
        runs.append(opt.mean)
    assert torch.allclose(runs[0], target, atol=1e-3)
    assert torch.equal(runs[0], runs[1])
    assert np.array_equal(np.random.get_state()[1], before)
