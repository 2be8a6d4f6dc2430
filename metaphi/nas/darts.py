"""DARTS: differentiable architecture search (Liu, Simonyan & Yang 2019).

The architecture is relaxed into the mixing weights α of a search network (metaphi/nas/space.py)
and found by the bilevel problem

    min_α L_val(w*(α), α)      s.t.   w*(α) = argmin_w L_train(w, α).

DARTS approximates w*(α) by one training step, w' = w − ξ ∇_w L_train(w, α), and alternates an α
step on ∇_α L_val(w', α) with an ordinary w step on L_train. The architecture gradient is

    second order:  ∇_α L_val(w', α) − ξ ∇²_{α,w} L_train(w, α) ∇_{w'} L_val(w', α)
    first order:   ∇_α L_val(w, α)                                     (ξ = 0)

The Hessian-vector product of the second-order term is what DARTS approximates by central finite
differences of the training gradient,

    ∇²_{α,w} L_train(w, α) v ≈ [∇_α L_train(w⁺, α) − ∇_α L_train(w⁻, α)] / 2ε,
    w^± = w ± ε v,   v = ∇_{w'} L_val(w', α),   ε = 0.01 / ‖v‖,

which costs two more gradients and no second derivatives (``FiniteDifference``).

A third estimate (``Implicit``, ``arch_grad="implicit"``) takes the current w as the inner
solution w* and differentiates the stationarity condition instead of the step, as in iDARTS (Zhang
et al. 2021), with the library's ``metaphi.outer.implicit.hypergradient``:

    ∇_α L_val(w, α) − ∇²_{α,w} L_train(w, α) v,     (∇²_{w,w} L_train(w, α) + δI) v = ∇_w L_val(w, α).

DARTS's second-order gradient is this with the linear system solved by one term of the Neumann
series, v ≈ ξ ∇_{w'} L_val (and evaluated at w' instead of w).

This is one meta-learning task in this library's terms: φ = α, the task is (support = a training
batch, query = a validation batch), and the inner loop is the one step from w. ``SearchProblem``
states it as an algorithm (``task_loss``), so the library's own unrolled estimators compute the
architecture gradient: ``Unrolled(first_order=False)`` with ξ > 0 is the exact second-order gradient
(by autograd through the step), and ξ = 0 gives first-order DARTS. The current weights w travel in φ
as constants under ``w.*`` (they get no gradient), so nothing hides in the algorithm's state.

The result is ``derive(α)``: DARTS's discrete genotype (space.py), which is then retrained from
scratch. Published context: on CIFAR-10, second order 2.76 ± 0.09% test error (4 GPU-days), first
order 3.00 ± 0.14% (1.5 GPU-days), random search in the same space 3.29 ± 0.15%.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from metaphi.functional import Params, call, detach, grads_or_zeros, prefixed, with_prefix
from metaphi.inner import FIRST_ORDER, SGD, Unroll, adapt
from metaphi.inner.rules import MomentumSGD, TorchAdam
from metaphi.outer.es import derived_seed
from metaphi.tasks import Task
from metaphi.nas.child import Split, batch_of, loss_and_grads
from metaphi.nas.space import Network, NetworkConfig, alpha_init, derive, init_params


class SearchProblem:
    """DARTS's bilevel problem as an algorithm: φ = {"alpha.normal", "alpha.reduce"} (and the
    current weights as constants under "w.*"); a task is (train batch, val batch).

    ``task_loss`` is the validation loss after ξ-step SGD from w on the training batch (no step when
    ξ = 0). ``unroll.first_order`` holds the step's gradient constant (the inner loop's usual meaning).
    """

    name = "darts"
    estimators = ("second-order", "first-order")

    def __init__(self, net: Network, xi: float):
        if xi < 0:
            raise ValueError(f"the unrolled step size ξ must be >= 0, got {xi}")
        self.net, self.xi = net, float(xi)

    def split(self, phi: Params) -> tuple[Params, Params]:
        return prefixed(phi, "alpha"), prefixed(phi, "w")

    def train_loss(self, w: Params, alpha: Params, batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(call(self.net, w, x, alpha), y)

    def unrolled(self, phi: Params, batch, unroll: Unroll = Unroll()) -> Params:
        """w' = w − ξ ∇_w L_train(w, α), differentiable in α unless ``unroll.first_order``."""
        alpha, w = self.split(phi)
        steps = 1 if self.xi > 0 else 0
        if unroll.first_order:  # the step's gradient is a constant in α as well as in w
            alpha = detach(alpha)
        return adapt(lambda p: self.train_loss(p, alpha, batch), w, SGD(self.xi), {}, steps, unroll)

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        alpha, _ = self.split(phi)
        x, y = task.query
        out = call(self.net, self.unrolled(phi, task.support, unroll), x, alpha)
        return F.cross_entropy(out, y), {"accuracy": (out.argmax(-1) == y).to(out.dtype).mean()}


class FiniteDifference:
    """DARTS's second-order architecture gradient with the Hessian-vector product by finite
    differences (module docstring); an estimator ``(problem, phi, tasks) -> (grads, metrics)``."""

    name = "darts-finite-difference"

    def __init__(self, epsilon: float = 0.01):
        self.epsilon = float(epsilon)

    def __call__(self, problem: SearchProblem, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        def one_task(task: Task):
            alpha, w = problem.split(phi)
            alpha = {k: v.detach().requires_grad_() for k, v in alpha.items()}
            w_prime = {k: v.detach().requires_grad_() for k, v in
                       problem.unrolled({**with_prefix(alpha, "alpha"), **with_prefix(w, "w")}, task.support,
                                        FIRST_ORDER).items()}
            x, y = task.query
            out = call(problem.net, w_prime, x, alpha)
            loss = F.cross_entropy(out, y)
            g_alpha = grads_or_zeros(loss, alpha, retain_graph=True)
            v = grads_or_zeros(loss, w_prime)
            if problem.xi > 0:
                r = self.epsilon / (float(torch.sqrt(sum((t.double() ** 2).sum() for t in v.values()))) + 1e-12)
                w_plus = {k: w[k].detach() + r * v[k] for k in w}
                w_minus = {k: w[k].detach() - r * v[k] for k in w}
                g_plus = grads_or_zeros(problem.train_loss(w_plus, alpha, task.support), alpha)
                g_minus = grads_or_zeros(problem.train_loss(w_minus, alpha, task.support), alpha)
                g_alpha = {k: g_alpha[k] - problem.xi * (g_plus[k] - g_minus[k]) / (2 * r) for k in g_alpha}
            return ({k: g.detach() for k, g in g_alpha.items()}, float(loss.detach()),
                    float((out.argmax(-1) == y).double().mean()))

        return _mean_over_tasks(phi, tasks, one_task)


class Implicit:
    """The implicit architecture gradient at the current weights (module docstring): conjugate
    gradient for ``steps`` Hessian-vector products with damping δ; an estimator like the others."""

    name = "darts-implicit"

    def __init__(self, steps: int = 5, damping: float = 0.1):
        self.steps, self.damping = int(steps), float(damping)

    def __call__(self, problem: SearchProblem, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        from metaphi.outer.implicit import hypergradient

        def one_task(task: Task):
            alpha, w = problem.split(phi)

            def outer(w_, alpha_):
                out = call(problem.net, w_, task.query[0], alpha_)
                return (F.cross_entropy(out, task.query[1]),
                        {"accuracy": (out.argmax(-1) == task.query[1]).to(out.dtype).mean()})

            g, info = hypergradient(lambda w_, alpha_: problem.train_loss(w_, alpha_, task.support), w, outer, alpha,
                                    solver="cg", steps=self.steps, damping=self.damping)
            return g, info["loss"], info["accuracy"]

        return _mean_over_tasks(phi, tasks, one_task)


def _mean_over_tasks(phi: Params, tasks: Task, one_task) -> tuple[Params, dict[str, float]]:
    """The architecture gradient and metrics averaged over a batch of tasks; ``one_task(task)`` gives
    (gradient of the α entries, query loss, query accuracy) for one."""
    grads = {k: torch.zeros_like(v) for k, v in phi.items()}
    parts = tasks.unstack()
    total, acc = 0.0, 0.0
    for task in parts:
        g_alpha, loss, accuracy = one_task(task)
        for k, g in g_alpha.items():
            grads["alpha." + k] += g / len(parts)
        total += loss
        acc += accuracy
    return grads, {"loss": total / len(parts), "accuracy": acc / len(parts)}


# -- the search loop ----------------------------------------------------------------------------
ARCH_GRADS = ("finite-difference", "exact", "implicit")


@dataclass(frozen=True)
class DartsSettings:
    """DARTS's optimizers (weights: momentum SGD, cosine step size, weight decay 3e-4, clipping 5;
    α: Adam with β = (0.5, 0.999) and weight decay 1e-3), with a larger α step size than the
    paper's 3e-4 because a CPU search runs hundreds of steps instead of tens of thousands."""

    iterations: int = 300
    order: int = 1                      # 1: first order (ξ = 0); 2: second order (ξ = the weights' step size)
    arch_grad: str = "finite-difference"  # second order only: "finite-difference" (DARTS), "exact" (autograd
    #                                       through the step) or "implicit" (implicit function theorem)
    batch: int = 64
    w_lr: float = 0.05
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float = 3e-4
    grad_clip: float = 5.0
    alpha_lr: float = 3e-3
    alpha_weight_decay: float = 1e-3
    epsilon: float = 0.01
    implicit_steps: int = 5
    implicit_damping: float = 0.1

    def __post_init__(self):
        if self.order not in (1, 2):
            raise ValueError(f"DARTS has first (1) and second (2) order, got {self.order}")
        if self.arch_grad not in ARCH_GRADS:
            raise ValueError(f"arch_grad must be one of {', '.join(ARCH_GRADS)}, got {self.arch_grad!r}")
        if self.iterations < 1 or self.batch < 1:
            raise ValueError("iterations and batch must be positive")

    def w_lr_at(self, t: int) -> float:
        return self.w_lr_min + (self.w_lr - self.w_lr_min) * (1 + math.cos(math.pi * t / self.iterations)) / 2

    def grad_evals_per_iteration(self) -> int:
        """Minibatch gradient evaluations per iteration: the w step (1) and the α gradient (first
        order 1; finite differences: w' (1), the val gradient (1), two train gradients (2); exact:
        w' (1) and one backward through it, counted as 2; implicit: the val gradient (1), the train
        gradient with its graph (1), 2 per Hessian-vector product and 1 for the mixed term)."""
        if self.order == 1:
            return 2
        if self.arch_grad == "implicit":
            return 4 + 2 * self.implicit_steps
        return 5 if self.arch_grad == "finite-difference" else 4

    def to_dict(self) -> dict:
        return asdict(self)


def estimator_for(settings: DartsSettings):
    from metaphi.outer import build_estimator
    if settings.order == 1:
        return build_estimator("first-order", {"loop": True})
    if settings.arch_grad == "exact":
        return build_estimator("second-order", {"loop": True})
    if settings.arch_grad == "implicit":
        return Implicit(settings.implicit_steps, settings.implicit_damping)
    return FiniteDifference(settings.epsilon)


def search(config: NetworkConfig, data: dict[str, Split], settings: DartsSettings, seed: int,
           checkpoint: str | None = None, checkpoint_every: int = 50, progress: Callable | None = None) -> dict:
    """Run DARTS; returns {"alpha", "genotype", "history", "seconds", "grad_evals", "weights"}.

    One step of ``metaphi.train_online``: α takes an Adam step on the architecture gradient of the
    validation batch, then w a momentum-SGD step (``MomentumSGD``, cosine step size) on the training
    batch with the new α. Iteration t draws its batches from ``derived_seed(seed, t)``; the weights
    and α start from generators seeded by ``seed``. With ``checkpoint`` the state is saved every
    ``checkpoint_every`` iterations and a run resumes from it to the same result. ``progress(t, row)``
    after iteration t (from 0)."""
    from metaphi import train_online
    from metaphi.train import NonFiniteLoss

    net = Network(config)
    dtype = data["train"][0].dtype
    w = init_params(net, torch.Generator().manual_seed(derived_seed(seed, -1)), dtype)
    alpha = alpha_init(config, torch.Generator().manual_seed(derived_seed(seed, -2)), dtype=dtype)
    alpha_rule = TorchAdam(settings.alpha_lr, (0.5, 0.999), weight_decay=settings.alpha_weight_decay)

    def w_rule(t: int) -> MomentumSGD:
        return MomentumSGD(settings.w_lr_at(t), settings.w_momentum, settings.w_weight_decay, settings.grad_clip)

    estimator = estimator_for(settings)

    def step(state: dict, t: int, g: torch.Generator) -> tuple[dict, dict]:
        train_batch, val_batch = batch_of(data["train"], settings.batch, g), batch_of(data["val"], settings.batch, g)
        lr = settings.w_lr_at(t)
        problem = SearchProblem(net, xi=lr if settings.order == 2 else 0.0)
        leaves = {k: v.detach().requires_grad_() for k, v in state["alpha"].items()}
        phi = {**with_prefix(leaves, "alpha"), **with_prefix(state["w"], "w")}
        grads, metrics = estimator(problem, phi, Task.stack([Task(train_batch, val_batch)]))
        g_alpha = {k: grads["alpha." + k] for k in leaves}
        if not all(bool(torch.isfinite(v).all()) for v in g_alpha.values()):
            raise NonFiniteLoss(f"the architecture gradient of DARTS became non-finite at iteration {t + 1}; lower "
                                "--w-lr or --alpha-lr")
        alpha, alpha_opt = alpha_rule.update(state["alpha"], g_alpha, state["alpha_opt"], {})
        loss, w_grads = loss_and_grads(net, state["w"], *train_batch, alpha)
        w, velocity = w_rule(t).update(state["w"], w_grads, state["velocity"], {})
        return ({"w": w, "velocity": velocity, "alpha": alpha, "alpha_opt": alpha_opt},
                {"iteration": t + 1, "train_loss": float(loss), "val_loss": metrics["loss"],
                 "val_acc": metrics.get("accuracy")})

    start = {"w": w, "velocity": w_rule(0).init(w), "alpha": alpha, "alpha_opt": alpha_rule.init(alpha)}
    done = train_online.run(
        step, start, settings.iterations, seed=seed, checkpoint=checkpoint, every=checkpoint_every,
        identity={"config": config.to_dict(), "settings": settings.to_dict(), "seed": seed},
        on_step=None if progress is None else (lambda n, row: progress(n - 1, row)),
        hint="lower --w-lr or --alpha-lr")
    alpha_out = done["state"]["alpha"]
    return {"alpha": alpha_out, "genotype": derive(alpha_out, config), "history": done["history"],
            "seconds": done["seconds"], "grad_evals": settings.grad_evals_per_iteration() * settings.iterations,
            "weights": done["state"]["w"]}
