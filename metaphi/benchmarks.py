"""Benchmarks: where tasks come from, which model fits them, and the settings they are run with.

A benchmark gives episode samplers for its splits ("train", "val", "test"), a pooled sampler of
training examples with their global labels (for the pre-training baseline), and a model factory.
Data set modules are imported only when their benchmark is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .algorithms.base import CLASSIFICATION, REGRESSION, Problem
from .models import MLP, Conv4
from .tasks import DataError, EpisodeSampler, ImageClasses, Task
from .tasks.sinusoid import SinusoidTasks


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
    within_group: bool = False
    regression_tasks: Callable[[int, int], SinusoidTasks] | None = None

    def episodes(self, split: str, ways: int, shots: int, query: int):
        if self.regression_tasks is not None:
            return self.regression_tasks(shots, query)
        if split not in self.splits:
            raise DataError(f"benchmark '{self.name}' has no '{split}' split (it has {', '.join(self.splits)})")
        return EpisodeSampler(self.splits[split], ways, shots, query, within_group=self.within_group,
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
        return {"kind": "image", "channels": c, "height": h, "width": w, "scale": "x/255", "ink": "high"}


def sinusoid() -> Benchmark:
    return Benchmark(
        name="sinusoid", problem=REGRESSION,
        defaults=dict(ways=1, shots=10, query=10, eval_shots=5, eval_query=100, inner_lr=0.01, inner_steps=1,
                      eval_steps=10, meta_batch=25, iterations=2000, eval_tasks=600, meta_lr=1e-3),
        make_model=lambda out: MLP(1, out, (40, 40)),
        regression_tasks=lambda shots, query: SinusoidTasks(shots, query),
    )


def image_benchmark(name: str, splits: dict[str, ImageClasses], defaults: dict, within_group: bool = False,
                    hidden: int = 64, pool: str = "stride") -> Benchmark:
    c, h, _ = splits["train"].image_shape
    return Benchmark(name=name, problem=CLASSIFICATION, defaults=defaults, splits=splits, within_group=within_group,
                     make_model=lambda out: Conv4(c, out, hidden=hidden, image_size=h, pool=pool))


GLYPHS_DEFAULTS = dict(ways=5, shots=1, query=5, eval_shots=None, eval_query=None, inner_lr=0.4, inner_steps=1,
                       eval_steps=3, meta_batch=16, iterations=300, eval_tasks=600, meta_lr=1e-3)


def glyphs(data_root=None) -> Benchmark:
    from .tasks.glyphs import glyph_splits, load_glyphs

    splits = glyph_splits(load_glyphs(data_root))
    return image_benchmark("glyphs", splits, dict(GLYPHS_DEFAULTS), hidden=32)


BENCHMARKS = ("glyphs", "sinusoid")


def build_benchmark(name: str, data_root=None) -> Benchmark:
    """The benchmark called ``name``; raises DataError with the valid names otherwise."""
    if name == "sinusoid":
        return sinusoid()
    if name == "glyphs":
        return glyphs(data_root)
    raise DataError(f"unknown benchmark '{name}' (valid: {', '.join(BENCHMARKS)})")
