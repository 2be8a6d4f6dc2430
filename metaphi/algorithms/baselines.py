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

from typing import Any

import torch
from torch import Tensor, nn

from metaphi.functional import Params, call, params_of, prefixed, with_prefix
from metaphi.inner import SGD, adapt, adapt_steps
from metaphi.models import build_model
from metaphi.tasks import Task
from metaphi.algorithms.base import Algorithm, Problem, problem_named
from metaphi.algorithms.maml import MAML, task_model


def scratch(benchmark, ways: int, inner_lr: float, inner_steps: int = 0, eval_steps: int = 20) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), 0, eval_steps, name="scratch", estimators=(), trains=False)


class Pretrain(Algorithm):
    name = "pretrain"
    estimators = ("first-order",)

    def __init__(self, model: nn.Module, problem: Problem, inner_lr: float, eval_steps: int = 20,
                 batch_size: int = 64):
        self.model, self.problem = model, problem
        self.rule = SGD(inner_lr)
        self.eval_steps = eval_steps
        self.batch_size = batch_size
        # the task model differs from the pre-training model only in its head's width
        self._task_models: dict[int, nn.Module] = {}

    def init_meta_params(self) -> Params:
        return with_prefix(params_of(self.model), "init")

    def training_tasks(self, benchmark, ways, shots, query):
        return benchmark.pooled("train", self.batch_size).sample_batch

    def task_loss(self, phi: Params, task: Task, first_order: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
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
        for p in adapt_steps(self._loss(model, task.support), params, self.rule, {}, steps, first_order=True):
            with torch.no_grad():
                scores.append(self.problem.score(call(model, p, xq), yq))
        return torch.stack(scores)

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int | None = None) -> Tensor:
        model, params = self._task_start(phi, support)
        params = adapt(self._loss(model, support), params, self.rule, {},
                       self.eval_steps if steps is None else steps, first_order=True)
        with torch.no_grad():
            return call(model, params, x)

    def spec(self) -> dict:
        return {"class": "pretrain", "name": self.name, "model": self.model.spec, "problem": self.problem.name,
                "rule": self.rule.spec(), "eval_steps": self.eval_steps, "batch_size": self.batch_size}


def pretrain(benchmark, ways: int, inner_lr: float, inner_steps: int = 0, eval_steps: int = 20) -> Pretrain:
    out = 1 if benchmark.problem.name == "regression" else benchmark.num_classes("train")
    return Pretrain(benchmark.model(out), benchmark.problem, inner_lr, eval_steps)


def pretrain_from_spec(spec: dict) -> Pretrain:
    return Pretrain(build_model(spec["model"]), problem_named(spec["problem"]), spec["rule"]["lr"],
                    spec["eval_steps"], spec["batch_size"])
