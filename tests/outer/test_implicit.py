"""Implicit meta-gradients (CG and Neumann) against closed forms and long unrolls, in float64."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metaphi.algorithms import REGRESSION, build_algorithm
from metaphi.config import UsageError
from metaphi.algorithms.imaml import IMAML, IMAMLOptions
from metaphi.algorithms.maml import MAML
from metaphi.evaluate import evaluate
from metaphi.inner import SGD
from metaphi.models import MLP
from metaphi.outer import Unrolled, build_estimator
from metaphi.outer.implicit import Implicit, _masked_solve, conjugate_gradient, hypergradient, neumann
from metaphi.tasks import Task


pytestmark = pytest.mark.usefixtures("float64")


def spd(n, seed, low=1.0, high=4.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q @ torch.diag(torch.linspace(low, high, n)) @ q.T


def regression_tasks(n=2, k=6, features=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, k, features, generator=g), torch.randn(n, k, features, generator=g)
    ys, yq = torch.randn(n, k, 1, generator=g), torch.randn(n, k, 1, generator=g)
    return Task((xs, ys), (xq, yq))


def small_net():
    torch.manual_seed(0)
    return MLP(2, 1, (5,), activation="tanh").double()


def max_abs_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def max_abs(a):
    return max(float(v.abs().max()) for v in a.values())


# --- the linear solvers -------------------------------------------------------------------------

@pytest.mark.parametrize("solver, options", [(conjugate_gradient, {"steps": 6}),
                                              (neumann, {"steps": 400, "alpha": 0.4})])
def test_solvers_solve_a_positive_definite_system(solver, options):
    a = spd(6, seed=1)
    b = [torch.randn(6, generator=torch.Generator().manual_seed(2))]
    x, info = solver(lambda v: [a @ v[0]], b, tol=1e-13, **options)
    assert torch.allclose(x[0], torch.linalg.solve(a, b[0]), atol=1e-10)
    assert info.residual <= 1e-12 and info.iterations <= options["steps"]
    assert info.residual == pytest.approx(float((a @ x[0] - b[0]).norm() / b[0].norm()), abs=1e-12)


def test_solvers_stop_at_the_tolerance_and_report_the_residual():
    a = spd(30, seed=3, high=50.0)
    b = [torch.randn(30, generator=torch.Generator().manual_seed(4))]
    x, info = conjugate_gradient(lambda v: [a @ v[0]], b, steps=100, tol=1e-3)
    assert info.residual <= 1e-3 and info.iterations < 30
    x, info = neumann(lambda v: [a @ v[0]], b, steps=3, alpha=0.01)
    assert info.iterations == 3 and info.residual == pytest.approx(float((a @ x[0] - b[0]).norm() / b[0].norm()))


def test_cg_stops_at_nonpositive_curvature():
    a = torch.diag(torch.tensor([1.0, -1.0]))
    x, info = conjugate_gradient(lambda v: [a @ v[0]], [torch.tensor([1.0, 1.0])], steps=10)
    assert torch.isfinite(x[0]).all() and info.iterations == 1 and info.residual == pytest.approx(1.0)


@pytest.mark.parametrize("solver, a, options", [
    (conjugate_gradient, [1.0, -0.99], {}),                # a tiny positive pᵀAp: the first CG step overshoots
    (neumann, [1.0, 10.0], {"alpha": 0.5}),                # α above 2 / λ_max: the series diverges
])
def test_solvers_return_the_smallest_residual_on_hard_systems(solver, a, options):
    a = torch.diag(torch.tensor(a))
    b = [torch.tensor([1.0, 1.0])]
    x, info = solver(lambda v: [a @ v[0]], b, steps=6, **options)
    true = float((a @ x[0] - b[0]).norm() / b[0].norm())
    assert info.residual <= 1.0 and info.residual == pytest.approx(true, abs=1e-12)
    name = "cg" if solver is conjugate_gradient else "neumann"
    x_masked, used, residual = _masked_solve(name, lambda v: [a @ v[0]], b, 6, 1e-10, options.get("alpha"))
    assert torch.allclose(x_masked[0], x[0]) and float(residual) == pytest.approx(info.residual, abs=1e-12)


# --- a quadratic bilevel problem with a closed form -----------------------------------------------

@pytest.mark.parametrize("solver, options", [("cg", {"steps": 8}), ("neumann", {"steps": 600, "alpha": 0.3})])
def test_quadratic_bilevel_hypergradient_is_exact(solver, options):
    """g = ½θᵀAθ − θᵀBφ, so θ* = A⁻¹Bφ; f = ½‖Cθ − d‖² + eᵀφ; dF/dφ = BᵀA⁻¹Cᵀ(Cθ* − d) + e."""
    g = torch.Generator().manual_seed(5)
    a, bm = spd(8, seed=6), torch.randn(8, 3, generator=g)
    c, d, e = torch.randn(4, 8, generator=g), torch.randn(4, generator=g), torch.randn(3, generator=g)
    phi = {"phi": torch.randn(3, generator=g)}
    theta_star = torch.linalg.solve(a, bm @ phi["phi"])
    exact = bm.T @ torch.linalg.solve(a, c.T @ (c @ theta_star - d)) + e

    inner = lambda t, p: 0.5 * t["t"] @ a @ t["t"] - t["t"] @ bm @ p["phi"]
    outer = lambda t, p: 0.5 * ((c @ t["t"] - d) ** 2).sum() + e @ p["phi"]
    grads, info = hypergradient(inner, {"t": theta_star}, outer, phi, solver, tol=1e-14, **options)
    assert torch.allclose(grads["phi"], exact, atol=1e-10)
    assert info["residual"] < 1e-10 and info["inner_grad_norm"] < 1e-10


def closed_form_imaml_loss(phi, task, reg):
    """iMAML on a linear regressor, solved exactly: L_S + λ/2‖θ−φ‖² is quadratic in θ = (w, b)."""
    (xs, ys), (xq, yq) = task
    zs, zq = (torch.cat([x, torch.ones(len(x), 1)], 1) for x in (xs, xq))
    anchor = torch.cat([phi["init.head.weight"].reshape(-1), phi["init.head.bias"]])
    k = len(xs)
    lhs = 2.0 / k * zs.T @ zs + reg * torch.eye(zs.shape[1])
    theta = torch.linalg.solve(lhs, 2.0 / k * zs.T @ ys[:, 0] + reg * anchor)
    return ((zq @ theta - yq[:, 0]) ** 2).mean()


def test_imaml_gradient_on_a_quadratic_inner_problem_is_exact():
    torch.manual_seed(0)
    model = MLP(3, 1, ()).double()
    algo = IMAML(model, REGRESSION, inner_lr=0.1, inner_steps=5000, options=IMAMLOptions(reg=0.7, inner_tol=1e-12))
    tasks = regression_tasks(n=3, k=5, features=3, seed=7)
    phi = algo.init_meta_params()
    loss = sum(closed_form_imaml_loss(phi, t, 0.7) for t in tasks.unstack()) / 3
    exact = dict(zip(phi, torch.autograd.grad(loss, list(phi.values()))))
    grads, metrics = Implicit("cg", steps=10, tol=1e-14)(algo, phi, tasks)
    assert max_abs_diff(grads, exact) < 1e-9
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-9)
    assert metrics["inner_grad_norm"] <= 1e-12 and metrics["residual"] < 1e-12


def test_one_dataset_problem_sample_reweighting_hypergradient_is_exact():
    """A learned weight per training sample (Ren et al. 2018's setting, solved exactly): θ* is
    weighted ridge regression, the outer loss a clean validation set's MSE."""
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(12, 4, generator=g), torch.randn(12, generator=g)
    xv, yv = torch.randn(7, 4, generator=g), torch.randn(7, generator=g)
    phi = {"logits": torch.randn(12, generator=g).requires_grad_()}

    def inner(theta, phi):
        w = torch.sigmoid(phi["logits"])
        return (w * (x @ theta["w"] - y) ** 2).mean() + 0.1 * (theta["w"] ** 2).sum()

    def outer(theta, phi):
        return ((xv @ theta["w"] - yv) ** 2).mean()

    def exact_theta(phi):
        w = torch.sigmoid(phi["logits"])
        return torch.linalg.solve(x.T @ (w[:, None] * x) / 12 + 0.1 * torch.eye(4), x.T @ (w * y) / 12)

    exact = torch.autograd.grad(outer({"w": exact_theta(phi)}, phi), phi["logits"])[0]
    grads, info = hypergradient(inner, {"w": exact_theta(phi).detach()}, outer, phi, "cg", steps=4, tol=1e-14)
    assert torch.allclose(grads["logits"], exact, atol=1e-12)
    assert info["solver_iterations"] <= 4


# --- a small network ------------------------------------------------------------------------------

def reference_imaml_loss(model, phi, tasks, lr, reg, steps):
    """The regularised inner loop written out with torch.autograd.grad, independently of metaphi."""
    init = {k[len("init."):]: v for k, v in phi.items()}
    total = 0.0
    for (xs, ys), (xq, yq) in zip(zip(*tasks.support), zip(*tasks.query)):
        params = dict(init)
        for _ in range(steps):
            loss = F.mse_loss(functional_call(model, params, (xs,)), ys)
            loss = loss + 0.5 * reg * sum(((params[k] - init[k]) ** 2).sum() for k in params)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {k: v - lr * g for (k, v), g in zip(params.items(), grads)}
        total = total + F.mse_loss(functional_call(model, params, (xq,)), yq)
    return total / tasks.support[0].shape[0]


def test_unrolled_regularised_loop_equals_an_independent_autograd_loop():
    model, tasks = small_net(), regression_tasks()
    algo = IMAML(model, REGRESSION, inner_lr=0.1, inner_steps=7, options=IMAMLOptions(reg=1.0))
    phi = algo.init_meta_params()
    grads, _ = Unrolled()(algo, phi, tasks)
    ref = torch.autograd.grad(reference_imaml_loss(model, phi, tasks, 0.1, 1.0, 7), list(phi.values()))
    assert max_abs_diff(grads, dict(zip(phi, ref))) < 1e-12


def test_implicit_matches_a_long_unroll_as_the_inner_problem_converges():
    model, tasks = small_net(), regression_tasks()
    implicit = Implicit("cg", steps=100, tol=1e-14)
    errors, implicit_grads = [], None
    for steps in (20, 100, 800):
        algo = IMAML(model, REGRESSION, inner_lr=0.1, inner_steps=steps, options=IMAMLOptions(reg=1.0))
        phi = algo.init_meta_params()
        implicit_grads, metrics = implicit(algo, phi, tasks)
        errors.append(max_abs_diff(implicit_grads, Unrolled(vectorize=True)(algo, phi, tasks)[0]))
        assert metrics["residual"] < 1e-12
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-9 * max_abs(implicit_grads) + 1e-12
    assert errors[0] > 1e-3  # the comparison can tell a short unroll from a converged one


def test_cg_and_neumann_agree_on_a_well_conditioned_problem():
    model, tasks = small_net(), regression_tasks()
    algo = IMAML(model, REGRESSION, inner_lr=0.1, inner_steps=300, options=IMAMLOptions(reg=4.0))
    phi = algo.init_meta_params()
    cg, cg_metrics = Implicit("cg", steps=20, tol=1e-13)(algo, phi, tasks)
    # the Neumann step defaults to the inner step size, stable wherever the inner descent is
    nm, nm_metrics = Implicit("neumann", steps=200, tol=1e-13)(algo, phi, tasks)
    assert max_abs_diff(cg, nm) < 1e-10 * max_abs(cg)
    assert nm_metrics["solver_iterations"] > cg_metrics["solver_iterations"]
    assert nm_metrics["residual"] < 1e-12


@pytest.mark.parametrize("solver, steps, tol", [("cg", 30, 1e-6), ("neumann", 200, 1e-2)])
def test_vmapped_tasks_equal_the_loop_over_tasks(solver, steps, tol):
    model, tasks = small_net(), regression_tasks(n=3)
    algo = IMAML(model, REGRESSION, inner_lr=0.1, inner_steps=300, options=IMAMLOptions(reg=1.0, inner_tol=1e-3))
    phi = algo.init_meta_params()
    loop, loop_metrics = Implicit(solver, steps, tol, damping=0.1)(algo, phi, tasks)
    options = {"solver": solver, "solver_steps": steps, "solver_tol": tol, "solver_damping": 0.1}
    batch, batch_metrics = build_estimator("implicit", options)(algo, phi, tasks)
    assert max_abs_diff(loop, batch) < 1e-8 * max_abs(loop)
    # the batched solver masks the products after convergence; the count is the same
    assert batch_metrics["solver_iterations"] == pytest.approx(loop_metrics["solver_iterations"])
    assert 0 < loop_metrics["residual"] <= tol and 0 < batch_metrics["residual"] <= tol
    assert loop_metrics["inner_grad_norm"] == pytest.approx(batch_metrics["inner_grad_norm"], rel=1e-8)
    assert loop_metrics["inner_grad_norm"] <= 1e-3


def test_damping_regularises_the_system():
    model, tasks = small_net(), regression_tasks()
    algo = IMAML(model, REGRESSION, inner_lr=0.1, inner_steps=50, options=IMAMLOptions(reg=1.0))
    phi = algo.init_meta_params()
    plain, _ = Implicit("cg", steps=50, tol=1e-14)(algo, phi, tasks)
    damped, _ = Implicit("cg", steps=50, tol=1e-14, damping=1e6)(algo, phi, tasks)
    assert max_abs(damped) < 1e-4 * max_abs(plain)  # (H + δI)⁻¹ → 0 as δ grows


def test_inner_tolerance_stops_the_inner_solve_early():
    model, tasks = small_net(), regression_tasks(n=1)
    algo = IMAML(model, REGRESSION, inner_lr=0.1, inner_steps=10_000, options=IMAMLOptions(reg=1.0, inner_tol=1e-6))
    _, metrics = Implicit()(algo, algo.init_meta_params(), tasks)
    assert 1e-8 < metrics["inner_grad_norm"] <= 1e-6


def test_implicit_needs_an_algorithm_with_a_bilevel_problem():
    maml = MAML(small_net(), REGRESSION, SGD(0.1), 1)
    with pytest.raises(ValueError, match="bilevel"):
        Implicit()(maml, maml.init_meta_params(), regression_tasks())
    with pytest.raises(ValueError, match="unknown solver"):
        Implicit(solver="lu")
    with pytest.raises(UsageError, match="solver: 'lu' is not one of cg, neumann"):
        build_estimator("implicit", {"solver": "lu"})


def test_checkpoint_spec_rebuilds_imaml_and_batched_evaluation_is_the_loop():
    from metaphi.tasks.registry import build_benchmark

    bench = build_benchmark("sinusoid")
    algo = IMAML(MLP(1, 1, (8,)).double(), REGRESSION, 0.05, 4, 6, options=IMAMLOptions(reg=3.0, inner_tol=1e-3))
    rebuilt = build_algorithm(json.loads(json.dumps(algo.spec())))
    assert rebuilt.spec() == algo.spec() and rebuilt.reg == 3.0
    phi = algo.init_meta_params()
    sampler = bench.episodes("test", 1, 5, 10)
    batched = evaluate(algo, phi, sampler, 6, seed=2)
    one_by_one = evaluate(rebuilt, phi, sampler, 6, seed=2, chunk=1)
    assert len(batched["per_step"]) == 7
    for a, b in zip(batched["per_step"], one_by_one["per_step"]):
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-10)


# --- the command line -----------------------------------------------------------------------------

def test_cli_runs_imaml_with_the_implicit_estimator_and_logs_the_residual(tmp_path, capsys):
    from metaphi.cli import main

    out = tmp_path / "run"
    args = ["run", "imaml", "--benchmark", "sinusoid", "--iterations", "3", "--meta-batch", "2", "--inner-steps", "4",
            "--eval-tasks", "10", "--val-tasks", "5", "--quiet", "--no-baselines", "--out", str(out),
            "--solver", "neumann", "--solver-steps", "3", "--solver-damping", "0.5"]
    assert main(args) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["estimator"] == "implicit" and result["iterations"] == 3
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 3 and all(r["solver_iterations"] == 3 and 0 <= r["residual"] < 1 for r in rows)
    assert main(["eval", str(out / "checkpoint.pt"), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["mean"] == pytest.approx(result["mean"], rel=1e-6)
