"""The two baselines every result is reported beside, run through the same code as the methods.

* Training from scratch: no meta-training; each test task is learned from a random initialization
  by the same inner update rule, for more steps.
* Pre-training then fine-tuning (the "pretrained" baseline of Finn et al. 2017): one network is
  trained on all training tasks or classes at once (a head over all training classes for
  classification; for regression, one regressor over all tasks), then on each test task the body is
  kept, the head is replaced by a zero-initialised N-way head, and everything is fine-tuned on the
  support set by the inner update rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metaphi.config import option
from metaphi.functional import Params, call, params_of, prefixed, with_prefix
from metaphi.inner import FIRST_ORDER, SGD, Unroll, adapt, adapt_steps
from metaphi.models import build_model
from metaphi.tasks import Task
from metaphi.algorithms.base import Algorithm, Problem
from metaphi.algorithms.maml import MAML, MAMLOptions, task_model


def scratch(benchmark, ways: int, inner_lr: float, inner_steps: int = 0, eval_steps: int = 20,
            options: MAMLOptions | None = None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), 0, eval_steps, name="scratch",
                estimators=(), trains=False, options=options)


@dataclass
class PretrainOptions:
    batch_size: int = option(64, "pre-training: images (or regression tasks' points) per batch", check="positive")


class Pretrain(Algorithm):
    name = "pretrain"
    estimators = ("first-order",)
    Options = PretrainOptions
    spec_class = "pretrain"
    spec_args = ("inner_lr", "eval_steps")

    def __init__(self, model: nn.Module, problem: Problem, inner_lr: float, eval_steps: int = 20,
                 options: PretrainOptions | None = None, name: str | None = None):
        self.model, self.problem = model, problem
        self.rule = SGD(inner_lr)
        self.eval_steps = eval_steps
        self.options = options if options is not None else self.Options()
        self.batch_size = self.options.batch_size
        if name:
            self.name = name
        # the task model differs from the pre-training model only in its head's width
        self._task_models: dict[int, nn.Module] = {}

    @property
    def inner_lr(self) -> float:
        return self.rule.lr

    def init_meta_params(self) -> Params:
        return with_prefix(params_of(self.model), "init")

    def training_tasks(self, benchmark, ways, shots, query):
        return benchmark.pooled("train", self.batch_size).sample_batch

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = task.query
        out = call(self.model, prefixed(phi, "init"), x)
        return self.problem.loss(out, y), {self.problem.metric: self.problem.score(out, y).detach()}

    def _task_start(self, phi: Params, support: Any) -> tuple[nn.Module, Params]:
        params = {k: v.detach() for k, v in prefixed(phi, "init").items()}
        if self.problem.name != "classification":
            return self.model, params
        ways = int(support[1].max()) + 1
        if ways not in self._task_models:
            self._task_models[ways] = build_model({**self.model.spec, "out_features": ways})
        head = self._task_models[ways].head
        params["head.weight"] = torch.zeros_like(head.weight)
        params["head.bias"] = torch.zeros_like(head.bias)
        return self._task_models[ways], params

    def _loss(self, model, support):
        x, y = support
        return lambda p: self.problem.loss(call(model, p, x), y)

    def evaluate(self, phi: Params, task: Task, steps: int | None = None) -> Tensor:
        steps = self.eval_steps if steps is None else steps
        model, params = self._task_start(phi, task.support)
        xq, yq = task.query
        scores = []
        for p in adapt_steps(self._loss(model, task.support), params, self.rule, {}, steps, FIRST_ORDER):
            with torch.no_grad():
                scores.append(self.problem.score(call(model, p, xq), yq))
        return torch.stack(scores)

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int | None = None) -> Tensor:
        model, params = self._task_start(phi, support)
        params = adapt(self._loss(model, support), params, self.rule, {},
                       self.eval_steps if steps is None else steps, FIRST_ORDER)
        with torch.no_grad():
            return call(model, params, x)


def pretrain(benchmark, ways: int, inner_lr: float, inner_steps: int = 0, eval_steps: int = 20,
             options: PretrainOptions | None = None) -> Pretrain:
    out = 1 if benchmark.problem.name == "regression" else benchmark.num_classes("train")
    return Pretrain(benchmark.model(out), benchmark.problem, inner_lr, eval_steps, options)
