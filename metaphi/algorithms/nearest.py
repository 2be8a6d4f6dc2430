"""Nearest neighbour in pixel space: the weakest sensible few-shot learner, and a gauge of how hard a
data set is. Nothing is learned; a query gets the class of its nearest support example in Euclidean
distance on raw inputs (Lake et al. 2015 report this baseline for the Omniglot challenge)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metaphi.functional import Params
from metaphi.tasks import Task
from metaphi.algorithms.base import CLASSIFICATION, Algorithm, NoOptions, Problem


class PixelNN(Algorithm):
    name = "pixel-nn"
    estimators = ()
    trains = False
    batched_eval = False
    spec_class = "pixel-nn"

    def __init__(self, problem: Problem = CLASSIFICATION, options: NoOptions | None = None, name: str | None = None):
        self.problem = problem
        self.options = options if options is not None else NoOptions()
        if name:
            self.name = name

    def init_meta_params(self) -> Params:
        return {}

    def _logits(self, support: Any, x: Tensor) -> Tensor:
        xs, ys = support
        dist = torch.cdist(x.flatten(1).double(), xs.flatten(1).double())
        ways = int(ys.max()) + 1
        # a class's score is minus the distance to its nearest support example
        per_class = torch.full((x.shape[0], ways), float("inf"), dtype=dist.dtype)
        per_class = per_class.scatter_reduce(1, ys.expand_as(dist), dist, reduce="amin")
        return -per_class

    def evaluate(self, phi: Params, task: Task, steps: int | None = None) -> Tensor:
        xq, yq = task.query
        return self.problem.score(self._logits(task.support, xq), yq).reshape(1)

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int | None = None) -> Tensor:
        return self._logits(support, x)


def pixel_nn(benchmark, ways, inner_lr, inner_steps=0, eval_steps=0, options: NoOptions | None = None) -> PixelNN:
    if benchmark.problem.name != "classification":
        raise ValueError("pixel-nn classifies; it does not apply to regression benchmarks")
    return PixelNN(benchmark.problem, options)

