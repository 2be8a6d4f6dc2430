"""Benchmarks: where few-shot episodes come from, which model fits them, and the settings they are run with.

A benchmark gives episode samplers for its splits ("train", "val", "test"), a pooled sampler of
training examples with their global labels (for the pre-training baseline), and a model factory.
Benchmarks by name (``glyphs``, ``omniglot``, ..., ``folder:PATH``) are built by
:func:`metaphi.tasks.registry.build_benchmark`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from metaphi.algorithms.base import CLASSIFICATION, Problem
from metaphi.models import Conv4
from metaphi.tasks import DataError, EpisodeSampler, ImageClasses, Task
from metaphi.tasks.sinusoid import SinusoidTasks


class PooledSampler:
    """Batches of training examples with their global class labels, shaped as tasks whose support
    is empty: what the "pre-train on all training classes, then fine-tune" baseline learns from."""

    def __init__(self, data: ImageClasses, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def sample_batch(self, n: int, generator: torch.Generator) -> Task:
        idx = torch.randint(len(self.data.targets), (n, self.batch_size), generator=generator)
        x = self.data.images[idx].float().div_(255.0)
        y = self.data.targets[idx]
        empty = (x[:, :0], y[:, :0])
        return Task(empty, (x, y))


@dataclass
class Benchmark:
    name: str
    problem: Problem
    defaults: dict
    make_model: Callable[[int], nn.Module]
    splits: dict[str, ImageClasses] = field(default_factory=dict)
    #: test and validation episodes draw all their classes from one group (alphabet)
    eval_within_group: bool = False
    #: image files were inverted (dark ink on light paper -> ink high) when this data was read
    invert: bool = False
    regression_tasks: Callable[[int, int], SinusoidTasks] | None = None

    def episodes(self, split: str, ways: int, shots: int, query: int):
        if self.regression_tasks is not None:
            return self.regression_tasks(shots, query)
        if split not in self.splits:
            raise DataError(f"benchmark '{self.name}' has no '{split}' split (it has {', '.join(self.splits)})")
        within = self.eval_within_group and split != "train"
        return EpisodeSampler(self.splits[split], ways, shots, query, within_group=within,
                              name=f"{self.name} {split} split")

    def pooled(self, split: str, batch_size: int):
        if self.regression_tasks is not None:
            return self.regression_tasks(batch_size // 2, batch_size - batch_size // 2)
        return PooledSampler(self.splits[split], batch_size)

    def num_classes(self, split: str) -> int:
        return self.splits[split].num_classes if self.splits else 1

    def model(self, out_features: int) -> nn.Module:
        return self.make_model(out_features)

    def input_spec(self) -> dict:
        """What inputs the models of this benchmark take, for checkpoints and ``predict``."""
        if not self.splits:
            return {"kind": "vector", "features": 1}
        c, h, w = self.splits["train"].image_shape
        return {"kind": "image", "channels": c, "height": h, "width": w, "scale": "x/255", "invert": self.invert}


def image_benchmark(name: str, splits: dict[str, ImageClasses], defaults: dict, hidden: int = 64,
                    pool: str = "stride", invert: bool = False) -> Benchmark:
    c, h, _ = splits["train"].image_shape
    return Benchmark(name=name, problem=CLASSIFICATION, defaults=defaults, splits=splits, invert=invert,
                     make_model=lambda out: Conv4(c, out, hidden=hidden, image_size=h, pool=pool))
