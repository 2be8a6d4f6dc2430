"""Domain generalization by meta-learning: MLDG, its first-order form, and the ERM ("Deep-All") baseline.

MLDG (Li, Yang, Song & Hospedales 2018, "Learning to Generalize: Meta-Learning for Domain
Generalization", AAAI). The source domains S are split at every iteration into meta-train domains
S̄ and meta-test domains S̆ (one of them, drawn at random). With ℓ_d(θ) the mean loss on a batch
of domain d,

    F(θ)  = mean_{d ∈ S̄} ℓ_d(θ)                  the meta-train loss
    θ'    = θ − α ∇F(θ)                           a virtual step on the meta-train domains
    G(θ') = mean_{d ∈ S̆} ℓ_d(θ')                 the meta-test loss after that step
    L(θ)  = F(θ) + β G(θ − α ∇F(θ))               (paper, eq. 3)

and θ follows ∇_θ L = ∇F(θ) + β (I − α ∇²F(θ)) ∇G(θ'). A first-order Taylor expansion shows what
this asks for: L ≈ F(θ) + β G(θ) − αβ ∇F(θ)·∇G(θ): low loss on both, and gradients of the
meta-train and meta-test domains that point the same way, so a step that helps the seen domains
helps an unseen one too. φ = θ, the parameters of the network itself; at test time they are used as
they are (domain generalization) or fine-tuned on K labelled examples per class of the new domain
(few-shot domain adaptation).

* second order: the exact ∇_θ L, backpropagating through the virtual step;
* first order: the Hessian term is dropped, ∇_θ L ≈ ∇F(θ) + β ∇G(θ') (the form DomainBed runs).

Both come from the core's ``Unrolled`` estimator: ``task_loss`` is L for one split, and the virtual
step is ``metaphi.inner.adapt`` with one SGD step, unrolled as the estimator says (``Unroll``):
its ``first_order`` drops the Hessian.

ERM, "Deep-All" in the paper: one network trained on all source domains pooled, the baseline
every domain generalization method is measured against; here it is fed the same batches as MLDG
(the meta-train and the meta-test domains' together) so the two see the same data.

With a single source domain there is no domain to hold out: the meta-test batch is empty, G is left
out, and MLDG's update is exactly ERM's (tests/test_mldg.py).

A task is ``Task(support=(x, y), query=(x, y))`` with ``x [domains, batch, C, H, W]``: the
meta-train domains' batches and the meta-test domains' (see ``metaphi.tasks.domains.SourceBatches``).
For testing, a task is the held-out domain's K labelled examples per class (support, maybe empty)
and its test images (query).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.functional import Params, call, params_of, prefixed, with_prefix
from metaphi.inner import FIRST_ORDER, SGD, Unroll, adapt, adapt_steps
from metaphi.tasks import Task
from metaphi.algorithms.base import CLASSIFICATION, Algorithm, Problem, model_spec, problem_named, rebuild_model


def _pooled(batch: Any) -> tuple[Tensor, Tensor]:
    """[domains, batch, ...] -> [domains * batch, ...]: equal batches make the pooled mean loss the
    mean over domains of each domain's mean loss."""
    x, y = batch
    return x.flatten(0, 1), y.flatten(0, 1)


class DomainLearner(Algorithm):
    """What MLDG and ERM share: φ = {"init.<param>": θ}, and testing by fine-tuning on the support.

    Few-shot adaptation to the held-out domain is ``eval_steps`` full-batch SGD steps of size
    ``adapt_lr`` on its support set, of the head alone (``adapt_params="head"``: the features are
    computed once, and a few examples cannot wreck them) or of every parameter (``"all"``). With an
    empty support the network is scored as it is: domain generalization.
    """

    name = "domain-learner"
    method = "erm"

    def __init__(self, model: nn.Module, problem: Problem = CLASSIFICATION, adapt_lr: float = 0.1,
                 eval_steps: int = 30, adapt_params: str = "head"):
        if adapt_params not in ("head", "all"):
            raise ValueError(f"adapt_params must be 'head' or 'all', got {adapt_params!r}")
        if adapt_params == "head" and "features" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"adapting the head alone needs a model whose forward takes features=True "
                             f"(such as metaphi.models.GroupNormConvNet); use adapt_params='all' for "
                             f"{type(model).__name__}")
        self.model, self.problem = model, problem
        self.adapt_rule = SGD(adapt_lr)
        self.eval_steps, self.adapt_params = eval_steps, adapt_params
        self.batched_eval = False

    def init_meta_params(self) -> Params:
        return with_prefix(params_of(self.model), "init")

    def training_tasks(self, benchmark, ways=None, shots=None, query=None):
        """``benchmark`` is a ``DomainSplit``; ``query`` is the batch per domain (default 16)."""
        return benchmark.source_batches(query or 16, getattr(self, "meta_test", 1)).sample_batch

    def _loss(self, x: Tensor, y: Tensor):
        return lambda p: self.problem.loss(call(self.model, p, x), y)

    def _adapted(self, phi: Params, support: Any, x: Tensor, steps: int):
        """Outputs on ``x`` after 0, 1, ..., ``steps`` fine-tuning steps on ``support`` (a generator)."""
        xs, ys = support
        theta = {k: v.detach() for k, v in prefixed(phi, "init").items()}
        if len(ys) == 0:
            steps = 0
        if self.adapt_params == "all":
            for params in adapt_steps(self._loss(xs, ys), theta, self.adapt_rule, {}, steps, FIRST_ORDER):
                with torch.no_grad():
                    yield call(self.model, params, x)
            return
        with torch.no_grad():
            fs = call(self.model, theta, xs, features=True) if steps else None
            fx = call(self.model, theta, x, features=True)
        head = {"weight": theta["head.weight"], "bias": theta["head.bias"]}
        loss = lambda p: self.problem.loss(F.linear(fs, p["weight"], p["bias"]), ys)
        for params in adapt_steps(loss, head, self.adapt_rule, {}, steps, FIRST_ORDER):
            yield F.linear(fx, params["weight"], params["bias"]).detach()

    def evaluate(self, phi: Params, task: Task, steps: int | None = None) -> Tensor:
        """The query metric after 0..steps fine-tuning steps on the support (only step 0 if it is empty)."""
        xq, yq = task.query
        steps = self.eval_steps if steps is None else steps
        return torch.stack([self.problem.score(out, yq) for out in self._adapted(phi, task.support, xq, steps)])

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int | None = None) -> Tensor:
        out = None
        for out in self._adapted(phi, support, x, self.eval_steps if steps is None else steps):
            pass
        return out

    def _metrics(self, out: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {self.problem.metric: self.problem.score(out, y).detach()}

    def spec(self) -> dict:
        return {"class": "mldg", "method": self.method, "name": self.name, "model": model_spec(self.model),
                "problem": self.problem.name, "adapt_lr": self.adapt_rule.lr, "eval_steps": self.eval_steps,
                "adapt_params": self.adapt_params}


class ERM(DomainLearner):
    """Empirical risk minimization on all source domains pooled ("Deep-All"): L = mean_d ℓ_d(θ)."""

    name = "erm"
    method = "erm"
    estimators = ("first-order", "second-order")  # no inner step: both give the plain gradient

    def task_loss(self, phi: Params, task: Task, unroll: Unroll | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        xs, ys = _pooled(task.support)
        xq, yq = _pooled(task.query)
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        out = call(self.model, prefixed(phi, "init"), x)
        return self.problem.loss(out, y), self._metrics(out, y)


class MLDG(DomainLearner):
    """L(θ) = F(θ) + β G(θ − α ∇F(θ)); see the module's docstring.

    ``inner_lr`` α and ``inner_steps`` (1 in the paper) shape the virtual step, ``beta`` β weighs
    the meta-test loss, ``meta_test`` is how many source domains each split holds out, and
    ``first_order`` makes ``task_loss`` default to the first-order form (when it is handed no ``Unroll``)
    and the first-order estimator the default.
    """

    name = "mldg"
    method = "mldg"

    def __init__(self, model: nn.Module, problem: Problem = CLASSIFICATION, inner_lr: float = 0.1, beta: float = 1.0,
                 inner_steps: int = 1, meta_test: int = 1, first_order: bool = False, adapt_lr: float = 0.1,
                 eval_steps: int = 30, adapt_params: str = "head", name: str | None = None):
        super().__init__(model, problem, adapt_lr, eval_steps, adapt_params)
        if inner_steps < 1 or meta_test < 1:
            raise ValueError(f"inner_steps and meta_test must be >= 1, got {inner_steps=}, {meta_test=}")
        self.inner_rule = SGD(inner_lr)
        self.beta, self.inner_steps, self.meta_test = float(beta), inner_steps, meta_test
        self.first_order = first_order
        self.name = name or ("mldg-fo" if first_order else "mldg")
        self.estimators = ("first-order", "second-order") if first_order else ("second-order", "first-order")

    def task_loss(self, phi: Params, task: Task, unroll: Unroll | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        unroll = Unroll(first_order=self.first_order) if unroll is None else unroll
        theta = prefixed(phi, "init")
        xs, ys = _pooled(task.support)
        xq, yq = _pooled(task.query)
        out = call(self.model, theta, xs)
        meta_train = self.problem.loss(out, ys)
        metrics = self._metrics(out, ys)
        if len(yq) == 0 or self.beta == 0:  # one source domain: nothing to meta-test on, F alone (ERM)
            return meta_train, metrics
        stepped = adapt(self._loss(xs, ys), theta, self.inner_rule, {}, self.inner_steps, unroll)
        out_q = call(self.model, stepped, xq)
        meta_test = self.problem.loss(out_q, yq)
        metrics.update(meta_train_loss=meta_train.detach(), meta_test_loss=meta_test.detach(),
                       meta_test_accuracy=self.problem.score(out_q, yq).detach())
        return meta_train + self.beta * meta_test, metrics

    def spec(self) -> dict:
        return {**super().spec(), "inner_lr": self.inner_rule.lr, "beta": self.beta, "inner_steps": self.inner_steps,
                "meta_test": self.meta_test, "first_order": self.first_order}


METHODS = ("erm", "mldg", "mldg-fo")


def create(method: str, model: nn.Module, problem: Problem = CLASSIFICATION, inner_lr: float = 0.1,
           beta: float = 1.0, meta_test: int = 1, adapt_lr: float = 0.1, eval_steps: int = 30,
           adapt_params: str = "head") -> DomainLearner:
    """``"erm"``, ``"mldg"`` (second order) or ``"mldg-fo"`` (first order) on ``model``."""
    if method == "erm":
        return ERM(model, problem, adapt_lr, eval_steps, adapt_params)
    if method in ("mldg", "mldg-fo"):
        return MLDG(model, problem, inner_lr, beta, meta_test=meta_test, first_order=method == "mldg-fo",
                    adapt_lr=adapt_lr, eval_steps=eval_steps, adapt_params=adapt_params)
    raise ValueError(f"unknown method '{method}' (valid: {', '.join(METHODS)})")


def mldg_from_spec(spec: dict) -> DomainLearner:
    model, problem = rebuild_model(spec["model"]), problem_named(spec["problem"])
    common = dict(adapt_lr=spec["adapt_lr"], eval_steps=spec["eval_steps"], adapt_params=spec["adapt_params"])
    if spec["method"] == "erm":
        return ERM(model, problem, **common)
    return MLDG(model, problem, spec["inner_lr"], spec["beta"], spec["inner_steps"], spec["meta_test"],
                spec["first_order"], name=spec["name"], **common)
