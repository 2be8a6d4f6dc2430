"""iMAML (Rajeswaran, Finn, Kakade & Levine 2019, "Meta-Learning with Implicit Gradients").

φ is an initialization, as in MAML, but a task is learned by solving a proximally regularised problem

    θ*(φ) = argmin_θ  g(θ, φ) = L_S(θ) + λ/2 ‖θ − φ‖²              (inner problem, any solver)
    L(φ)  = Σ_tasks L_Q(θ*(φ))

The proximal term keeps θ* near φ, so θ* depends on φ smoothly and, by the implicit function
theorem, dθ*/dφ = (I + H_S(θ*)/λ)⁻¹:

    ∇_φ L_Q(θ*(φ)) = (I + H_S/λ)⁻¹ ∇_θ L_Q(θ*)

which needs θ* alone, not the inner optimizer's path (metaphi.outer.implicit solves it with
conjugate gradient or a Neumann series on Hessian-vector products). The inner problem here is
solved by ``inner_steps`` of gradient descent with step α, stopping early once
‖∇_θ g‖ ≤ ``inner_tol``; the same regularised descent, for ``eval_steps``, adapts to a test task.

The published settings for Omniglot: λ = 2, 16 inner steps of α = 0.1 (5-way 1-shot), 5 CG steps,
meta-batch 32, Adam with meta lr 1e-3. ``reg`` (λ) defaults to 2. With a ReLU/batch-norm network the
support loss is far from convex near the initialization (Hessian eigenvalues below −λ), so the CG
system needs damping: ``metaphi run imaml --inner-lr 0.1 --inner-steps 5 --eval-steps 5
--solver-damping 10`` is what benchmarks/imaml_accuracy.py runs (without flags the benchmark's
inner-loop defaults apply, e.g. one step of 0.4 on glyphs).

With the "second-order" estimator the meta-gradient backpropagates through the regularised inner
loop instead (it converges to the implicit one as the inner problem is solved); "first-order" holds
the inner gradients and the anchor φ constant, giving ∇_θ L_Q(θ_k).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metaphi.functional import Params, call, detach, norm, prefixed
from metaphi.inner import SGD, adapt, adapt_steps
from metaphi.models import build_model
from metaphi.outer.implicit import Bilevel
from metaphi.tasks import Task
from metaphi.algorithms.base import Problem, problem_named
from metaphi.algorithms.maml import MAML, task_model

DEFAULT_REG = 2.0


class IMAML(MAML):
    """A learned initialization, adapted by gradient descent on the proximally regularised support loss."""

    name = "imaml"

    def __init__(self, model: nn.Module, problem: Problem, inner_lr: float, inner_steps: int = 10,
                 eval_steps: int | None = None, reg: float = DEFAULT_REG, inner_tol: float = 0.0,
                 trainable: str = "all", name: str | None = None,
                 estimators: tuple[str, ...] = ("implicit", "second-order", "first-order"), trains: bool = True):
        if reg <= 0:
            raise ValueError(f"iMAML's regularization λ must be > 0, got {reg}")
        super().__init__(model, problem, SGD(inner_lr), inner_steps, eval_steps, trainable=trainable,
                         name=name or "imaml", estimators=estimators, trains=trains)
        self.reg = float(reg)
        self.inner_tol = float(inner_tol)

    def _proximal_loss(self, support: Any, anchor: Params):
        """θ ↦ L_S(θ) + λ/2 ‖θ − anchor‖² over the adapted parameters."""
        support_loss = self._support_loss(support)

        def loss(params: Params) -> Tensor:
            prox = sum(((params[k] - anchor[k]) ** 2).sum() for k in self._adapted)
            return support_loss(params) + 0.5 * self.reg * prox
        return loss

    def learn(self, phi: Params, support: Any, steps: int | None = None, first_order: bool = False) -> Params:
        steps = self.inner_steps if steps is None else steps
        init = prefixed(phi, "init")
        # first order: the pull toward φ is a constant too, so dθ_k/dφ = I as in first-order MAML
        anchor = detach(init) if first_order else init
        return adapt(self._proximal_loss(support, anchor), init, self.rule, {}, steps, first_order=first_order,
                     trainable=self._adapted)

    def evaluate(self, phi: Params, task: Task, steps: int | None = None) -> Tensor:
        steps = self.eval_steps if steps is None else steps
        xq, yq = task.query
        init = detach(prefixed(phi, "init"))
        scores = []
        for params in adapt_steps(self._proximal_loss(task.support, init), init, self.rule, {}, steps,
                                  first_order=True, trainable=self._adapted):
            with torch.no_grad():
                scores.append(self.problem.score(call(self.model, params, xq), yq))
        return torch.stack(scores)

    def solve(self, phi: Params, support: Any, batched: bool = False) -> Params:
        """θ* for the adapted parameters by at most ``inner_steps`` of gradient descent on g, stopping
        once ‖∇_θ g‖ ≤ ``inner_tol``; no graph is kept. ``batched`` (under ``vmap``): the stop is a
        mask, not a branch, so the steps after it are computed and discarded."""
        init = detach(prefixed(phi, "init"))
        fixed = {k: v for k, v in init.items() if k not in self._adapted}
        theta = {k: init[k] for k in self._adapted}
        loss = self._proximal_loss(support, init)
        grad = torch.func.grad(lambda t: loss({**fixed, **t}))
        for _ in range(self.inner_steps):
            grads = grad(theta)
            step = torch.full((), self.rule.lr, dtype=theta[self._adapted[0]].dtype)
            if self.inner_tol > 0:
                if not batched and float(norm(grads)) <= self.inner_tol:
                    break
                step = torch.where(norm(grads) > self.inner_tol, step, torch.zeros_like(step))
            theta = {k: v - step * grads[k] for k, v in theta.items()}
        return theta

    def bilevel(self, phi: Params, task: Task, batched: bool = False) -> Bilevel:
        """The task as an implicit-differentiation problem (see metaphi.outer.implicit)."""
        xq, yq = task.query

        def inner_loss(theta: Params, phi: Params) -> Tensor:
            init = prefixed(phi, "init")
            return self._proximal_loss(task.support, init)({**init, **theta})

        def outer_loss(theta: Params, phi: Params) -> tuple[Tensor, dict[str, Tensor]]:
            out = call(self.model, {**prefixed(phi, "init"), **theta}, xq)
            return self.problem.loss(out, yq), {self.problem.metric: self.problem.score(out, yq).detach()}

        return Bilevel(inner_loss, self.solve(phi, task.support, batched), outer_loss, step_size=self.rule.lr)

    def spec(self) -> dict:
        return {"class": "imaml", "name": self.name, "model": self.model.spec, "problem": self.problem.name,
                "inner_lr": self.rule.lr, "inner_steps": self.inner_steps, "eval_steps": self.eval_steps,
                "reg": self.reg, "inner_tol": self.inner_tol, "trainable": self.trainable,
                "estimators": list(self.estimators), "trains": self.trains}


def imaml(benchmark, ways, inner_lr, inner_steps=10, eval_steps=None) -> IMAML:
    return IMAML(task_model(benchmark, ways), benchmark.problem, inner_lr, inner_steps, eval_steps)


def imaml_from_spec(spec: dict) -> IMAML:
    return IMAML(build_model(spec["model"]), problem_named(spec["problem"]), spec["inner_lr"], spec["inner_steps"],
                 spec["eval_steps"], spec["reg"], spec["inner_tol"], spec["trainable"], name=spec["name"],
                 estimators=tuple(spec["estimators"]), trains=spec["trains"])
