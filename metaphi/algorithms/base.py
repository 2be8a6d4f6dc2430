"""What every algorithm provides to the trainer, the estimators and the evaluator."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from metaphi.functional import Params
from metaphi.tasks import Task


@dataclass(frozen=True)
class Problem:
    """The loss a learner minimises and the metric reported for it."""

    name: str
    metric: str
    higher_is_better: bool

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.name == "classification":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y)

    def score(self, out: Tensor, y: Tensor) -> Tensor:
        if self.name == "classification":
            return (out.argmax(-1) == y).float().mean()
        return F.mse_loss(out, y)


CLASSIFICATION = Problem("classification", "accuracy", True)
REGRESSION = Problem("regression", "mse", False)


def problem_named(name: str) -> Problem:
    return {"classification": CLASSIFICATION, "regression": REGRESSION}[name]


class Algorithm:
    """A learning algorithm with a learnable part φ.

    Subclasses define:
      ``init_meta_params()``             φ, a flat dict of tensors that require grad
      ``task_loss(phi, task, first_order)``  the query loss after learning the task's support set,
                                          and a dict of metrics (tensors); differentiable in φ
      ``evaluate(phi, task, steps)``     the query metric after 0..steps inner steps (1-D tensor)
      ``spec()``                         a dict from which ``build_algorithm`` rebuilds it
    and may override ``learn`` (used by Reptile's estimator) and ``training_tasks`` (the sampler of
    meta-training tasks, which defaults to the benchmark's episodes).
    """

    name: str = "algorithm"
    #: estimators that make sense for this algorithm; the first is the default
    estimators: tuple[str, ...] = ("second-order", "first-order")
    #: whether the trainer has anything to meta-train (the scratch baseline has not)
    trains: bool = True

    def init_meta_params(self) -> Params:
        raise NotImplementedError

    def task_loss(self, phi: Params, task: Task, first_order: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def evaluate(self, phi: Params, task: Task, steps: int) -> Tensor:
        raise NotImplementedError

    def spec(self) -> dict:
        raise NotImplementedError

    def training_tasks(self, benchmark: Any, ways: int, shots: int, query: int) -> Callable[[int, torch.Generator], Task]:
        sampler = benchmark.episodes("train", ways, shots, query)
        return sampler.sample_batch

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int) -> Tensor:
        """Outputs (logits or values) for inputs ``x`` after learning ``support``."""
        raise NotImplementedError
