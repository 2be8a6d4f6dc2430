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
meta-batch 32, Adam with meta lr 1e-3. The options (``IMAMLOptions``: ``reg`` = λ, default 2, and
``inner_tol``) are ``metaphi run imaml --reg 0.5 --inner-tol 1e-4``. With a ReLU/batch-norm network the
support loss is far from convex near the initialization (Hessian eigenvalues below −λ), so the CG
system needs damping: ``metaphi run imaml --inner-lr 0.1 --inner-steps 5 --eval-steps 5
--solver-damping 10`` is what benchmarks/imaml_accuracy.py runs (without flags the benchmark's
inner-loop defaults apply, e.g. one step of 0.4 on glyphs).

With the "second-order" estimator the meta-gradient backpropagates through the regularised inner
loop instead (it converges to the implicit one as the inner problem is solved); "first-order" holds
the inner gradients and the anchor φ constant, giving ∇_θ L_Q(θ_k).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metaphi.config import UsageError, option
from metaphi.functional import Params, call, detach, norm, prefixed
from metaphi.inner import FIRST_ORDER, SGD, Unroll, adapt, adapt_steps
from metaphi.outer.implicit import Bilevel
from metaphi.tasks import Task
from metaphi.algorithms.base import Problem
from metaphi.algorithms.maml import MAML, task_model


@dataclass
class IMAMLOptions:
    reg: float = option(2.0, "iMAML: λ, the weight of the proximal term λ/2 ‖θ − φ‖² of the inner problem",
                        check="positive")
    inner_tol: float = option(0.0, "iMAML: the inner solver stops once ‖∇_θ g‖ is at most this (0: never early)",
                              check="nonneg")


class IMAML(MAML):
    """A learned initialization, adapted by gradient descent on the proximally regularised support loss."""

    name = "imaml"
    Options = IMAMLOptions
    spec_class = "imaml"
    spec_args = ("inner_lr", "inner_steps", "eval_steps", "trainable", "estimators", "trains")

    def __init__(self, model: nn.Module, problem: Problem, inner_lr: float, inner_steps: int = 10,
                 eval_steps: int | None = None, options: IMAMLOptions | None = None, trainable: str = "all",
                 name: str | None = None, estimators: tuple[str, ...] = ("implicit", "second-order", "first-order"),
                 trains: bool = True):
        options = options if options is not None else IMAMLOptions()
        if not options.reg > 0:
            raise UsageError(f"iMAML's regularization λ (--reg) must be > 0, got {options.reg}")
        super().__init__(model, problem, SGD(inner_lr), inner_steps, eval_steps, trainable=trainable,
                         name=name or "imaml", estimators=estimators, trains=trains, options=options)
        self.reg = float(options.reg)
        self.inner_tol = float(options.inner_tol)

    @property
    def inner_lr(self) -> float:
        return self.rule.lr

    def _proximal_loss(self, support: Any, anchor: Params):
        """θ ↦ L_S(θ) + λ/2 ‖θ − anchor‖² over the adapted parameters."""
        support_loss = self._support_loss(support)

        def loss(params: Params) -> Tensor:
            prox = sum(((params[k] - anchor[k]) ** 2).sum() for k in self._adapted)
            return support_loss(params) + 0.5 * self.reg * prox
        return loss

    def learn(self, phi: Params, support: Any, steps: int | None = None, unroll: Unroll = Unroll()) -> Params:
        steps = self.inner_steps if steps is None else steps
        init = prefixed(phi, "init")
        # first order: the pull toward φ is a constant too, so dθ_k/dφ = I as in first-order MAML
        anchor = detach(init) if unroll.first_order else init
        return adapt(self._proximal_loss(support, anchor), init, self.rule, {}, steps, unroll, trainable=self._adapted)

    def evaluate(self, phi: Params, task: Task, steps: int | None = None) -> Tensor:
        steps = self.eval_steps if steps is None else steps
        xq, yq = task.query
        init = detach(prefixed(phi, "init"))
        scores = []
        for params in adapt_steps(self._proximal_loss(task.support, init), init, self.rule, {}, steps,
                                  FIRST_ORDER, trainable=self._adapted):
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


def imaml(benchmark, ways, inner_lr, inner_steps=10, eval_steps=None, options: IMAMLOptions | None = None) -> IMAML:
    return IMAML(task_model(benchmark, ways), benchmark.problem, inner_lr, inner_steps, eval_steps, options)
