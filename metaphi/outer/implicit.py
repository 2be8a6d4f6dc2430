"""Implicit meta-gradients: differentiate the inner problem's solution, not the inner loop.

For a bilevel problem with meta-parameters φ and inner parameters θ,

    θ*(φ) = argmin_θ g(θ, φ)             (inner problem: a task's proximal support loss, a training loss)
    F(φ)  = f(θ*(φ), φ)                  (outer loss: the query loss, a validation loss)

the implicit function theorem on the stationarity condition ∇_θ g(θ*, φ) = 0 gives

    dF/dφ = ∂_φ f − (∂²_φθ g) v,   where   (∂²_θθ g + δ I) v = ∂_θ f          (δ = damping, 0 exactly)

so the meta-gradient needs only θ*, not the path the inner optimizer took to it: memory does not
grow with the number of inner steps, and any optimizer, run to any tolerance, can solve the inner
problem. The linear system is solved with Hessian-vector products only, never the Hessian:

* conjugate gradient (Hestenes & Stiefel 1952), exact in dim(θ) steps for a positive-definite
  Hessian and usually good in a handful; iMAML uses 5 (Rajeswaran, Finn, Kakade & Levine 2019,
  "Meta-Learning with Implicit Gradients");
* a truncated Neumann series  v ≈ α Σ_{j<K} (I − α A)^j b  (Lorraine, Vicol & Duvenaud 2020,
  "Optimizing Millions of Hyperparameters by Implicit Differentiation"), which converges when
  0 < α < 2 / λ_max(A); the inner optimizer's step size is the natural α, since gradient descent
  on g with that step converges under the same condition.

For iMAML, g(θ, φ) = L_S(θ) + λ/2 ‖θ − φ‖², so ∂²_θθ g = H_S + λI, ∂²_φθ g = −λI, f = L_Q(θ), and
dF/dφ = λ v = (I + H_S/λ)⁻¹ ∇L_Q(θ*).

``hypergradient`` is the whole computation for any pair of losses, so a one-dataset bilevel problem
(per-sample weights, architecture weights, augmentation parameters as φ; the network's weights as θ)
can use it in place of unrolling its training steps:

    grads, info = hypergradient(lambda w, phi: train_loss(w, phi), w_star,
                                lambda w, phi: val_loss(w), phi, solver="cg", steps=10, damping=0.1)

(an unregularised training loss often has a singular or indefinite Hessian: damping makes the system
solvable, at the price of a biased gradient). ``hypergradient_func`` is the same under ``vmap``.
``Implicit`` is the estimator that applies it to each task of a meta-batch, for algorithms whose
``bilevel(phi, task, batched)`` states their inner and outer problems as a ``Bilevel``. The solver
reports its relative residual ‖A v − b‖ / ‖b‖, and the estimator logs it with the inner problem's
gradient norm ‖∇_θ g(θ*, φ)‖ (how far θ* is from stationary, which is what the theorem assumes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from metaphi.algorithms.base import check_first_step
from metaphi.config import UsageError, option
from metaphi.functional import Params, detach
from metaphi.outer.es import LOOP_HELP

Vector = Sequence[Tensor]
MatVec = Callable[[Vector], Vector]


class SolveInfo(NamedTuple):
    iterations: int        # matrix-vector products used
    residual: float        # ‖A x − b‖ / ‖b‖ of the returned x (0 when b = 0)


def _dot(a: Vector, b: Vector) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def _axpy(alpha, x: Vector, y: Vector) -> list[Tensor]:
    return [yi + alpha * xi for xi, yi in zip(x, y)]


def conjugate_gradient(matvec: MatVec, b: Vector, steps: int = 5, tol: float = 1e-10) -> tuple[list[Tensor], SolveInfo]:
    """Solve A x = b for a symmetric positive-definite A given as ``matvec``, from x₀ = 0.

    Stops after ``steps`` products or when ‖r‖ ≤ tol ‖b‖. If a search direction shows A is not
    positive definite along it (pᵀAp ≤ 0, as an indefinite Hessian can), CG stops there rather than
    step to a saddle. On such a system, or a nearly singular one, a CG step can also overshoot; so
    the iterate returned is the one with the smallest residual seen, x₀ = 0 included (for a
    well-conditioned positive-definite A, the last one).
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    b_norm = float(rs.sqrt())
    if b_norm == 0.0:
        return x, SolveInfo(0, 0.0)
    used, best_x, best_rs = 0, x, float(rs)
    for _ in range(steps):
        if math.sqrt(float(rs)) <= tol * b_norm:
            break
        ap = matvec(p)
        used += 1
        pap = _dot(p, ap)
        if not float(pap) > 0.0:
            break
        alpha = rs / pap
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = _dot(r, r)
        p = _axpy(rs_new / rs, p, r)
        rs = rs_new
        if float(rs) < best_rs:
            best_x, best_rs = x, float(rs)
    return best_x, SolveInfo(used, math.sqrt(best_rs) / b_norm)


def neumann(matvec: MatVec, b: Vector, steps: int = 20, tol: float = 1e-10, alpha: float = 0.1
            ) -> tuple[list[Tensor], SolveInfo]:
    """A x = b by the truncated Neumann series x = α Σ_{j<K} (I − αA)^j b.

    Written as Richardson's iteration x ← x + α r, r ← r − α A r (r = b − A x throughout), so the
    residual of every partial sum comes for free. Converges iff the spectrum of αA lies in (0, 2);
    where it does not, the partial sum with the smallest residual (x₀ = 0 included) is returned.
    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    b_norm = float(_dot(b, b).sqrt())
    if b_norm == 0.0:
        return x, SolveInfo(0, 0.0)
    r_norm, used, best_x, best_norm = b_norm, 0, x, b_norm
    for _ in range(steps):
        if r_norm <= tol * b_norm:
            break
        x = _axpy(alpha, r, x)
        r = _axpy(-alpha, matvec(r), r)
        used += 1
        r_norm = float(_dot(r, r).sqrt())
        if r_norm < best_norm:
            best_x, best_norm = x, r_norm
    return best_x, SolveInfo(used, best_norm / b_norm)


SOLVERS = {"cg": conjugate_gradient, "neumann": neumann}


def _requiring_grad(tree: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().requires_grad_() for k, v in tree.items()}


def _zeros_if_none(grads, like: Vector) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def hypergradient(inner_loss: Callable[[Params, Params], Tensor], solution: Mapping[str, Tensor],
                  outer_loss: Callable[[Params, Params], Tensor | tuple[Tensor, dict]], meta_params: Mapping[str, Tensor],
                  solver: str = "cg", steps: int = 5, tol: float = 1e-10, damping: float = 0.0,
                  alpha: float | None = None) -> tuple[Params, dict]:
    """dF/dφ of F(φ) = f(θ*(φ), φ) at the inner solution θ* ≈ argmin_θ g(θ, φ), by the implicit
    function theorem (see the module docstring).

    ``inner_loss(theta, phi)`` is g and ``outer_loss(theta, phi)`` is f (it may also return
    ``(loss, metrics)``); both are called with fresh leaf tensors, so closures over data are all
    they need. ``solution`` is θ* (its graph, if any, is cut). ``solver`` is "cg" or "neumann", run
    for at most ``steps`` Hessian-vector products or to relative residual ``tol``; ``damping`` adds
    δI to the Hessian (for a Hessian that is singular or indefinite, e.g. an unregularised
    training loss); ``alpha`` is the Neumann step (required for "neumann").

    Returns the gradient (a dict with φ's keys; zeros where F does not depend on an entry) and
    ``info``: ``loss`` (f at θ*), ``residual`` and ``solver_iterations`` of the linear solve,
    ``inner_grad_norm`` = ‖∇_θ g(θ*, φ)‖, and the outer loss's metrics, if it returns any.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}' (valid: {', '.join(SOLVERS)})")
    if solver == "neumann" and not (alpha and alpha > 0):
        raise ValueError("the Neumann solver needs a step size alpha > 0 (below 2 / the Hessian's largest eigenvalue)")
    theta, phi = _requiring_grad(solution), _requiring_grad(meta_params)
    t_keys, p_keys = list(theta), list(phi)
    t_list, p_list = [theta[k] for k in t_keys], [phi[k] for k in p_keys]
    with torch.enable_grad():
        out = outer_loss(theta, phi)
        f, metrics = out if isinstance(out, tuple) else (out, {})
        f_grads = torch.autograd.grad(f, t_list + p_list, allow_unused=True)
        f_theta = _zeros_if_none(f_grads[:len(t_list)], t_list)
        f_phi = _zeros_if_none(f_grads[len(t_list):], p_list)

        # ∇_θ g with its graph, built once: every Hessian-vector product and the mixed term below is
        # one backward pass through it
        g_theta = torch.autograd.grad(inner_loss(theta, phi), t_list, create_graph=True)

        def hvp(v: Vector) -> list[Tensor]:
            hv = torch.autograd.grad(g_theta, t_list, grad_outputs=list(v), retain_graph=True, allow_unused=True)
            hv = _zeros_if_none(hv, t_list)
            return [h + damping * vi for h, vi in zip(hv, v)] if damping else hv

        options = {"steps": steps, "tol": tol} | ({"alpha": alpha} if solver == "neumann" else {})
        v, info = SOLVERS[solver](hvp, [t.detach() for t in f_theta], **options)
        v = [t.detach() for t in v]
        mixed = torch.autograd.grad(g_theta, p_list, grad_outputs=v, allow_unused=True) if p_list else []
        mixed = _zeros_if_none(mixed, p_list)
    grads = {k: (fp - m).detach() for k, fp, m in zip(p_keys, f_phi, mixed)}
    inner_norm = math.sqrt(sum(float((g.detach() ** 2).sum()) for g in g_theta))
    info_dict = {"loss": float(f.detach()), "residual": info.residual, "solver_iterations": info.iterations,
                 "inner_grad_norm": inner_norm, **{k: float(m) for k, m in metrics.items()}}
    return grads, info_dict


def _masked_solve(solver: str, matvec: MatVec, b: Vector, steps: int, tol: float, alpha: float | None
                  ) -> tuple[list[Tensor], Tensor, Tensor]:
    """``conjugate_gradient`` or ``neumann`` without data-dependent branches, so that ``vmap`` can
    batch it: all ``steps`` products are computed, and once a solve has converged (or, for CG, met
    nonpositive curvature) its later updates are masked out. Like them it returns the iterate with
    the smallest residual, with the products that counted and that relative residual, as tensors."""
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    rs = _dot(r, r)
    b_norm = rs.sqrt()
    stopped = b_norm <= 0
    used = torch.zeros((), dtype=b_norm.dtype, device=b_norm.device)
    best_x, best_rs = x, rs

    def keep_best(x, rs, best_x, best_rs):
        better = rs < best_rs
        return [torch.where(better, xi, bi) for xi, bi in zip(x, best_x)], torch.where(better, rs, best_rs)

    if solver == "cg":
        p = list(b)
        for _ in range(steps):
            stopped = stopped | (rs.sqrt() <= tol * b_norm)
            ap = matvec(p)
            pap = _dot(p, ap)
            stopped = stopped | ~(pap > 0)
            go = ~stopped
            a = torch.where(go, rs / torch.where(go, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            x = _axpy(a, p, x)
            r = _axpy(-a, ap, r)
            rs_new = _dot(r, r)
            beta = rs_new / torch.where(go, rs, torch.ones_like(rs))
            p = [torch.where(go, ri + beta * pi, pi) for ri, pi in zip(r, p)]
            rs = torch.where(go, rs_new, rs)
            used = used + go
            best_x, best_rs = keep_best(x, rs, best_x, best_rs)
    else:
        for _ in range(steps):
            stopped = stopped | (rs.sqrt() <= tol * b_norm)
            step = torch.where(stopped, torch.zeros_like(rs), torch.full_like(rs, alpha))
            ar = matvec(r)
            x = _axpy(step, r, x)
            r = _axpy(-step, ar, r)
            rs = _dot(r, r)
            used = used + ~stopped
            best_x, best_rs = keep_best(x, rs, best_x, best_rs)
    residual = torch.where(b_norm > 0, best_rs.sqrt() / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm)),
                           torch.zeros_like(b_norm))
    return best_x, used, residual


def hypergradient_func(inner_loss: Callable[[Params, Params], Tensor], solution: Mapping[str, Tensor],
                       outer_loss: Callable[[Params, Params], Tensor | tuple[Tensor, dict]],
                       meta_params: Mapping[str, Tensor], solver: str = "cg", steps: int = 5, tol: float = 1e-10,
                       damping: float = 0.0, alpha: float | None = None) -> tuple[Params, dict[str, Tensor]]:
    """``hypergradient`` written with ``torch.func`` and without data-dependent branches, so that it
    runs under ``vmap`` (one batch of tasks at once). The losses must be pure functions of their
    arguments (``functional_call`` models are). The solver always computes ``steps`` products and
    masks those after convergence; ``info`` holds tensors."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}' (valid: {', '.join(SOLVERS)})")
    if solver == "neumann" and not (alpha and alpha > 0):
        raise ValueError("the Neumann solver needs a step size alpha > 0 (below 2 / the Hessian's largest eigenvalue)")
    theta, phi = detach(solution), detach(meta_params)

    def outer(t: Params, p: Params):
        out = outer_loss(t, p)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        return loss, (loss.detach(), {k: v.detach() for k, v in metrics.items()})

    (f_theta, f_phi), (loss, metrics) = torch.func.grad(outer, argnums=(0, 1), has_aux=True)(theta, phi)
    # the linearisation of (θ, φ) ↦ ∇_θ g, built once; its transpose gives H v and the mixed term together
    g_theta, vjp = torch.func.vjp(torch.func.grad(inner_loss, argnums=0), theta, phi)
    keys = list(theta)

    def hvp(v: Vector) -> list[Tensor]:
        hv = vjp(dict(zip(keys, v)))[0]
        return [hv[k] + damping * vi for k, vi in zip(keys, v)] if damping else [hv[k] for k in keys]

    v, used, residual = _masked_solve(solver, hvp, [f_theta[k] for k in keys], steps, tol, alpha)
    mixed = vjp(dict(zip(keys, v)))[1]
    grads = {k: f_phi[k] - mixed[k] for k in phi}
    inner_norm = _dot(list(g_theta.values()), list(g_theta.values())).sqrt()
    return grads, {"loss": loss, "residual": residual, "solver_iterations": used, "inner_grad_norm": inner_norm,
                   **metrics}


class Bilevel(NamedTuple):
    """A task's inner and outer problems, as an algorithm states them for ``Implicit``.

    ``inner_loss(theta, phi)`` g; ``solution`` θ* ≈ argmin_θ g (detached); ``outer_loss(theta,
    phi)`` f, returning ``(loss, metrics)``; ``step_size`` the inner optimizer's step, used as the
    Neumann α unless the estimator is given one.
    """

    inner_loss: Callable[[Params, Params], Tensor]
    solution: Params
    outer_loss: Callable[[Params, Params], tuple[Tensor, dict]]
    step_size: float | None = None


class Implicit:
    """The implicit meta-gradient, averaged over the tasks of a meta-batch.

    The algorithm must provide ``bilevel(phi, task, batched) -> Bilevel`` (iMAML does). With
    ``vectorize`` the tasks run as one ``vmap`` batch through ``hypergradient_func``, and ``bilevel``
    is called with ``batched=True``: it must then avoid data-dependent branches (masking where it
    would stop early); otherwise the tasks run one by one through ``hypergradient``, whose solver
    stops as soon as it reaches ``tol``. Both give the same gradient. Metrics are task
    means: ``loss`` and the algorithm's metric at θ*, ``residual`` and ``solver_iterations`` of the
    linear solves, ``inner_grad_norm`` of the inner problems.
    """

    name = "implicit"

    def __init__(self, solver: str = "cg", steps: int = 5, tol: float = 1e-10, damping: float = 0.0,
                 alpha: float | None = None, vectorize: bool = False):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver '{solver}' (valid: {', '.join(SOLVERS)})")
        if steps < 1:
            raise ValueError(f"the solver needs at least one step, got {steps}")
        if damping < 0 or tol < 0:
            raise ValueError("damping and tol must be >= 0")
        self.solver, self.steps, self.tol, self.damping, self.alpha = solver, steps, tol, damping, alpha
        self.vectorize = vectorize

    def _solve(self, fn, algorithm, phi: Params, task, batched: bool):
        problem = algorithm.bilevel(phi, task, batched=batched)
        alpha = self.alpha if self.alpha is not None else problem.step_size
        return fn(problem.inner_loss, problem.solution, problem.outer_loss, phi, self.solver, self.steps, self.tol,
                  self.damping, alpha)

    def __call__(self, algorithm, phi: Params, tasks) -> tuple[Params, dict[str, float]]:
        if not hasattr(algorithm, "bilevel"):
            raise ValueError(f"the implicit estimator needs an algorithm that states its inner problem "
                             f"(a bilevel() method, as imaml has); {algorithm.name} does not")
        check_first_step(algorithm, tasks, vmapped=self.vectorize)
        phi_c = detach(phi)
        if self.vectorize:
            grads, info = torch.func.vmap(lambda t: self._solve(hypergradient_func, algorithm, phi_c, t, True))(tasks)
            return {k: g.mean(0) for k, g in grads.items()}, {k: float(v.mean()) for k, v in info.items()}
        total = {k: torch.zeros_like(v) for k, v in phi.items()}
        sums: dict[str, float] = {}
        parts = tasks.unstack()
        for task in parts:
            grads, info = self._solve(hypergradient, algorithm, phi_c, task, False)
            for k, g in grads.items():
                total[k] += g / len(parts)
            for k, v in info.items():
                sums[k] = sums.get(k, 0.0) + v / len(parts)
        return total, sums


@dataclass
class ImplicitOptions:
    """Settings of the implicit estimator."""

    solver: str = option("cg", "implicit estimator: linear solver, conjugate gradient or a Neumann series",
                         choices=tuple(SOLVERS))
    solver_steps: int = option(5, "implicit estimator: most Hessian-vector products per solve", check="positive")
    solver_tol: float = option(1e-10, "implicit estimator: relative residual to stop at", check="nonneg")
    solver_damping: float = option(0.0, "implicit estimator: δ added to the Hessian's diagonal (for a singular or "
                                   "indefinite one; biases the gradient)", check="nonneg")
    neumann_alpha: float | None = option(None, "implicit estimator with --solver neumann: the series' step "
                                         "(none: the inner lr)", check="positive")
    loop: bool = option(False, LOOP_HELP)


def implicit(options: ImplicitOptions) -> Implicit:
    if options.neumann_alpha is not None and options.solver != "neumann":
        raise UsageError(f"--neumann-alpha applies to --solver neumann, not --solver {options.solver}")
    return Implicit(options.solver, options.solver_steps, options.solver_tol, options.solver_damping,
                    options.neumann_alpha, vectorize=not options.loop)
