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

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metaphi.functional import Params, call, params_of, prefixed, with_prefix
from metaphi.inner import FIRST_ORDER, SGD, MetaSGD, Unroll, UpdateRule, adapt, adapt_steps, build_rule
from metaphi.tasks import Task
from metaphi.algorithms.base import Algorithm, Problem, learnable_names, loop_only_layers, take_user_model


@dataclass
class MAMLOptions:
    """The MAML family has no options beyond the run's inner loop (``--inner-lr``, ``--inner-steps``,
    ``--eval-steps``): its variants are named algorithms (fomaml, anil, metasgd, reptile)."""


def select_parameters(names: list[str], trainable, model: str = "the model", frozen: list[str] = ()) -> list[str]:
    """The names among ``names`` that ``trainable`` selects (see :class:`MAML`), in the model's order;
    a ValueError when it selects none or names a parameter the model lacks or has ``frozen``
    (``requires_grad=False``: kept as it is)."""
    if trainable == "all":
        chosen = list(names)
    elif trainable == "head":
        chosen = [k for k in names if k.startswith("head.")]
    elif callable(trainable):
        chosen = [k for k in names if trainable(k)]
    elif isinstance(trainable, str):
        patterns = [p.strip() for p in trainable.split(",") if p.strip()]
        chosen = [k for k in names if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    else:
        wanted = list(trainable)
        unknown = [k for k in wanted if k not in names]
        if unknown and unknown[0] in frozen:
            raise ValueError(f"trainable names '{unknown[0]}', which is frozen in {model} (requires_grad=False): "
                             "metaphi keeps frozen parameters as they are; set requires_grad=True to adapt it")
        if unknown:
            raise ValueError(f"trainable names '{unknown[0]}', which {model} does not have (its parameters: "
                             f"{', '.join(names)})")
        chosen = [k for k in names if k in set(wanted)]
    if not chosen:
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        shown += f"; frozen: {', '.join(frozen[:6])}{', ...' if len(frozen) > 6 else ''}" if frozen else ""
        raise ValueError(f"trainable={trainable!r} selects no parameter of {model}, so the inner loop would adapt "
                         f"nothing (its parameters: {shown}); pass a pattern such as 'fc.*', a list of names or a "
                         "predicate")
    return chosen


class MAML(Algorithm):
    """Learn an initialization by backpropagating through ``inner_steps`` of the update rule.

    ``trainable`` chooses the parameters the inner loop adapts: ``"all"``, ``"head"`` (those named
    ``head.*``: ANIL on the built-in backbones), glob patterns of parameter names (``"fc.*"``, or
    ``"layer4.*,fc.*"``; BOIL's body is ``"body.*"``), a list of names, or a predicate on the name. A
    selection that matches no parameter is a ValueError naming the model's parameters. Frozen parameters
    (``requires_grad=False``) are kept as they are: not in φ, never adapted.
    ``estimators``: the ways of optimizing φ that apply, the first the default (first-order MAML is
    this algorithm with "first-order" first: how the inner loop is unrolled is the estimator's choice).
    ``rule`` is an update rule or its spec.
    """

    name = "maml"
    checks_model = True
    Options = MAMLOptions
    spec_class = "maml"
    spec_args = ("rule", "inner_steps", "eval_steps", "trainable", "estimators", "trains")

    def __init__(self, model: nn.Module, problem: Problem, rule: UpdateRule | dict, inner_steps: int = 1,
                 eval_steps: int | None = None, trainable: str = "all", name: str | None = None,
                 estimators: tuple[str, ...] = ("second-order", "first-order"), trains: bool = True,
                 options: MAMLOptions | None = None):
        if inner_steps < 0:
            raise ValueError("inner_steps must be >= 0")
        self.model, self.problem = model, problem
        self.rule = build_rule(rule) if isinstance(rule, dict) else rule
        self.inner_steps = inner_steps
        self.eval_steps = inner_steps if eval_steps is None else eval_steps
        take_user_model(model)
        self._learned = learnable_names(model)
        frozen = [k for k, p in model.named_parameters() if not p.requires_grad]  # the rest of the parameters
        self._adapted = select_parameters(self._learned, trainable, type(model).__name__, frozen)
        # a predicate is stored as the names it chose, so that the spec rebuilds the same selection
        self.trainable = list(self._adapted) if callable(trainable) else trainable
        if name:
            self.name = name
        self.estimators = tuple(estimators)
        self.trains = trains
        self.options = options if options is not None else self.Options()
        # Scoring test tasks under vmap pays for small MLPs; for convnets on a CPU the loop over
        # tasks was faster (benchmarks/engine_speed.py), so it is used there.
        self.batched_eval = problem.name == "regression" and not loop_only_layers(model)

    # φ = {"init.<param>": θ₀} ∪ {"rule.<param>": the update rule's own meta-parameters}
    def init_meta_params(self) -> Params:
        init = params_of(self.model)
        init = {k: init[k] for k in self._learned}
        rule = self.rule.meta_params({k: init[k] for k in self._adapted})
        phi = {**with_prefix(init, "init"), **with_prefix(rule, "rule")}
        return {k: v.detach().clone().requires_grad_() for k, v in phi.items()}

    def _support_loss(self, support: Any):
        x, y = support
        return lambda p: self.problem.loss(call(self.model, p, x), y)

    def learn(self, phi: Params, support: Any, steps: int | None = None, unroll: Unroll = Unroll()) -> Params:
        steps = self.inner_steps if steps is None else steps
        return adapt(self._support_loss(support), prefixed(phi, "init"), self.rule, prefixed(phi, "rule"), steps,
                     unroll, trainable=self._adapted)

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        params = self.learn(phi, task.support, unroll=unroll)
        xq, yq = task.query
        out = call(self.model, params, xq)
        return self.problem.loss(out, yq), {self.problem.metric: self.problem.score(out, yq).detach()}

    def evaluate(self, phi: Params, task: Task, steps: int | None = None) -> Tensor:
        steps = self.eval_steps if steps is None else steps
        xq, yq = task.query
        phi = {k: v.detach() for k, v in phi.items()}
        scores = []
        for params in adapt_steps(self._support_loss(task.support), prefixed(phi, "init"), self.rule,
                                  prefixed(phi, "rule"), steps, FIRST_ORDER, trainable=self._adapted):
            with torch.no_grad():
                scores.append(self.problem.score(call(self.model, params, xq), yq))
        return torch.stack(scores)

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int | None = None) -> Tensor:
        phi = {k: v.detach() for k, v in phi.items()}
        params = self.learn(phi, support, self.eval_steps if steps is None else steps, unroll=FIRST_ORDER)
        with torch.no_grad():
            return call(self.model, params, x)


def task_model(benchmark, ways: int) -> nn.Module:
    """The benchmark's network with an output per class (one output for regression)."""
    return benchmark.model(1 if benchmark.problem.name == "regression" else ways)


def maml(benchmark, ways, inner_lr, inner_steps=1, eval_steps=None, options: MAMLOptions | None = None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), inner_steps, eval_steps, name="maml",
                options=options)


def fomaml(benchmark, ways, inner_lr, inner_steps=1, eval_steps=None, options: MAMLOptions | None = None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), inner_steps, eval_steps,
                name="fomaml", estimators=("first-order", "second-order"), options=options)


def anil(benchmark, ways, inner_lr, inner_steps=1, eval_steps=None, options: MAMLOptions | None = None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), inner_steps, eval_steps,
                trainable="head", name="anil", options=options)


def metasgd(benchmark, ways, inner_lr, inner_steps=1, eval_steps=None, options: MAMLOptions | None = None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, MetaSGD(inner_lr), inner_steps, eval_steps,
                name="metasgd", options=options)
