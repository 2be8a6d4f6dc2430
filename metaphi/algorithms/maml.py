"""The MAML family: a learned initialization, adapted to each task by gradient steps.

MAML (Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks"). φ is the initialization θ₀. For a task with support S and query Q,

    θ_{s+1} = θ_s − α ∇_θ L_S(θ_s),   s = 0 .. k−1        (inner loop, from θ₀ = φ)
    L(φ)    = Σ_tasks L_Q(θ_k(φ))                          (the loss of the learning algorithm)

and φ follows ∇_φ L, which backpropagates through the inner steps (second order).

First-order MAML (same paper, §5.2) drops the second derivatives: the inner gradients are treated
as constants, so ∇_φ L_Q(θ_k) ≈ ∇_θ L_Q(θ_k).

ANIL (Raghu et al. 2020, "Rapid Learning or Feature Reuse?") adapts only the head in the inner
loop; the body is meta-learned but used as it is for every task.

Meta-SGD (Li et al. 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning") learns a step
size per coordinate as well: θ_{s+1} = θ_s − α ⊙ ∇L_S(θ_s), φ = (θ₀, α).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metaphi.functional import Params, call, params_of, prefixed, with_prefix
from metaphi.models import build_model
from metaphi.inner import SGD, MetaSGD, UpdateRule, adapt, adapt_steps, build_rule
from metaphi.tasks import Task
from metaphi.algorithms.base import Algorithm, Problem, problem_named


class MAML(Algorithm):
    """Learn an initialization by backpropagating through ``inner_steps`` of the update rule.

    ``trainable`` = ``"all"`` adapts every parameter, ``"head"`` only the last layer (ANIL).
    ``first_order`` makes ``task_loss`` default to the first-order approximation.
    """

    name = "maml"

    def __init__(self, model: nn.Module, problem: Problem, rule: UpdateRule, inner_steps: int = 1,
                 eval_steps: int | None = None, trainable: str = "all", first_order: bool = False,
                 name: str | None = None, estimators: tuple[str, ...] | None = None, trains: bool = True):
        if inner_steps < 0:
            raise ValueError("inner_steps must be >= 0")
        if trainable not in ("all", "head"):
            raise ValueError("trainable must be 'all' or 'head'")
        self.model, self.problem, self.rule = model, problem, rule
        self.inner_steps = inner_steps
        self.eval_steps = inner_steps if eval_steps is None else eval_steps
        self.trainable = trainable
        self.first_order = first_order
        if name:
            self.name = name
        if estimators is None:
            estimators = ("first-order", "second-order") if first_order else ("second-order", "first-order")
        self.estimators = tuple(estimators)
        self.trains = trains
        # Scoring test tasks under vmap pays for small MLPs; for convnets on a CPU the loop over
        # tasks was faster (benchmarks/engine_speed.py), so it is used there.
        self.batched_eval = problem.name == "regression"
        names = [k for k, _ in model.named_parameters()]
        self._adapted = names if trainable == "all" else [k for k in names if k.startswith("head.")]

    # φ = {"init.<param>": θ₀} ∪ {"rule.<param>": the update rule's own meta-parameters}
    def init_meta_params(self) -> Params:
        init = params_of(self.model)
        rule = self.rule.meta_params({k: init[k] for k in self._adapted})
        phi = {**with_prefix(init, "init"), **with_prefix(rule, "rule")}
        return {k: v.detach().clone().requires_grad_() for k, v in phi.items()}

    def _support_loss(self, support: Any):
        x, y = support
        return lambda p: self.problem.loss(call(self.model, p, x), y)

    def learn(self, phi: Params, support: Any, steps: int | None = None, first_order: bool = False) -> Params:
        steps = self.inner_steps if steps is None else steps
        return adapt(self._support_loss(support), prefixed(phi, "init"), self.rule, prefixed(phi, "rule"), steps,
                     first_order=first_order, trainable=self._adapted)

    def task_loss(self, phi: Params, task: Task, first_order: bool | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        first_order = self.first_order if first_order is None else first_order
        params = self.learn(phi, task.support, first_order=first_order)
        xq, yq = task.query
        out = call(self.model, params, xq)
        return self.problem.loss(out, yq), {self.problem.metric: self.problem.score(out, yq).detach()}

    def evaluate(self, phi: Params, task: Task, steps: int | None = None) -> Tensor:
        steps = self.eval_steps if steps is None else steps
        xq, yq = task.query
        phi = {k: v.detach() for k, v in phi.items()}
        scores = []
        for params in adapt_steps(self._support_loss(task.support), prefixed(phi, "init"), self.rule,
                                  prefixed(phi, "rule"), steps, first_order=True, trainable=self._adapted):
            with torch.no_grad():
                scores.append(self.problem.score(call(self.model, params, xq), yq))
        return torch.stack(scores)

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int | None = None) -> Tensor:
        phi = {k: v.detach() for k, v in phi.items()}
        params = self.learn(phi, support, self.eval_steps if steps is None else steps, first_order=True)
        with torch.no_grad():
            return call(self.model, params, x)

    def spec(self) -> dict:
        return {"class": "maml", "name": self.name, "model": self.model.spec, "problem": self.problem.name,
                "rule": self.rule.spec(), "inner_steps": self.inner_steps, "eval_steps": self.eval_steps,
                "trainable": self.trainable, "first_order": self.first_order,
                "estimators": list(self.estimators), "trains": self.trains}


def task_model(benchmark, ways: int) -> nn.Module:
    """The benchmark's network with an output per class (one output for regression)."""
    return benchmark.model(1 if benchmark.problem.name == "regression" else ways)


def maml(benchmark, ways, inner_lr, inner_steps=1, eval_steps=None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), inner_steps, eval_steps, name="maml")


def fomaml(benchmark, ways, inner_lr, inner_steps=1, eval_steps=None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), inner_steps, eval_steps,
                first_order=True, name="fomaml")


def anil(benchmark, ways, inner_lr, inner_steps=1, eval_steps=None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), inner_steps, eval_steps,
                trainable="head", name="anil")


def metasgd(benchmark, ways, inner_lr, inner_steps=1, eval_steps=None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, MetaSGD(inner_lr), inner_steps, eval_steps,
                name="metasgd")


def maml_from_spec(spec: dict) -> MAML:
    return MAML(build_model(spec["model"]), problem_named(spec["problem"]), build_rule(spec["rule"]), spec["inner_steps"],
                spec["eval_steps"], spec["trainable"], spec["first_order"], name=spec["name"],
                estimators=tuple(spec["estimators"]), trains=spec["trains"])
