"""Benchmarks: where tasks come from, which model fits them, and the settings they are run with.

A benchmark gives episode samplers for its splits ("train", "val", "test"), a pooled sampler of
training examples with their global labels (for the pre-training baseline), and a model factory.
Data set modules are imported only when their benchmark is asked for.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from metaphi.algorithms.base import CLASSIFICATION, REGRESSION, Problem
from metaphi.models import MLP, Conv4
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


def sinusoid() -> Benchmark:
    return Benchmark(
        name="sinusoid", problem=REGRESSION,
        defaults=dict(ways=1, shots=10, query=10, eval_shots=5, eval_query=100, inner_lr=0.01, inner_steps=1,
                      eval_steps=10, meta_batch=25, iterations=2000, eval_tasks=600, meta_lr=1e-3),
        make_model=lambda out: MLP(1, out, (40, 40)),
        regression_tasks=lambda shots, query: SinusoidTasks(shots, query),
    )


def image_benchmark(name: str, splits: dict[str, ImageClasses], defaults: dict, hidden: int = 64,
                    pool: str = "stride", invert: bool = False) -> Benchmark:
    c, h, _ = splits["train"].image_shape
    return Benchmark(name=name, problem=CLASSIFICATION, defaults=defaults, splits=splits, invert=invert,
                     make_model=lambda out: Conv4(c, out, hidden=hidden, image_size=h, pool=pool))


GLYPHS_DEFAULTS = dict(ways=5, shots=1, query=5, eval_shots=None, eval_query=15, inner_lr=0.4, inner_steps=1,
                       eval_steps=3, meta_batch=8, iterations=300, eval_tasks=600, meta_lr=1e-3)
# MAML's Omniglot settings (Finn et al. 2017), with a shorter default run
OMNIGLOT_DEFAULTS = dict(ways=5, shots=1, query=5, eval_shots=None, eval_query=15, inner_lr=0.4, inner_steps=1,
                         eval_steps=3, meta_batch=32, iterations=2000, eval_tasks=600, meta_lr=1e-3)
# MAML's miniImageNet settings: 32 filters with max pooling, 5 steps at α = 0.01 (10 at test)
IMAGENET_DEFAULTS = dict(ways=5, shots=1, query=15, eval_shots=None, eval_query=15, inner_lr=0.01, inner_steps=5,
                         eval_steps=10, meta_batch=4, iterations=2000, eval_tasks=600, meta_lr=1e-3)
FOLDER_DEFAULTS = dict(ways=5, shots=1, query=1, eval_shots=None, eval_query=None, inner_lr=0.1, inner_steps=1,
                       eval_steps=5, meta_batch=8, iterations=500, eval_tasks=600, meta_lr=1e-3)


def default_data_root() -> str:
    """``$METAPHI_DATA``, else ``~/.cache/metaphi/data``: where archives are looked for and downloaded."""
    return os.environ.get("METAPHI_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "metaphi", "data")


def glyphs(options: dict) -> Benchmark:
    from metaphi.tasks.glyphs import glyph_splits, load_glyphs

    splits = glyph_splits(load_glyphs())
    return image_benchmark("glyphs", splits, dict(GLYPHS_DEFAULTS), hidden=32, invert=True)


def _omniglot(protocol: str):
    def build(options: dict) -> Benchmark:
        from metaphi.tasks import omniglot

        root, download = options["data_root"], options.get("download", False)
        if protocol == "omniglot":
            splits = omniglot.maml_splits(root, download=download)
        elif protocol == "omniglot-lake":
            splits = omniglot.lake_splits(root, download=download)
        else:
            splits = omniglot.minimal_splits(root, "small1", test="unseen", download=download)
        return image_benchmark(protocol, splits, dict(OMNIGLOT_DEFAULTS), invert=True)
    return build


def _imagenet(name: str):
    def build(options: dict) -> Benchmark:
        from metaphi.tasks import imagenet

        read = imagenet.mini_imagenet_splits if name == "mini-imagenet" else imagenet.tiered_imagenet_splits
        return image_benchmark(name, read(options["data_root"]), dict(IMAGENET_DEFAULTS), hidden=32, pool="max")
    return build


def _cifar(name: str):
    def build(options: dict) -> Benchmark:
        from metaphi.tasks import cifar

        read = cifar.cifar_fs_splits if name == "cifar-fs" else cifar.fc100_splits
        splits = read(options["data_root"], download=options.get("download", False))
        return image_benchmark(name, splits, dict(IMAGENET_DEFAULTS, inner_steps=5, eval_steps=10), pool="max")
    return build


def folder(path: str, options: dict) -> Benchmark:
    from metaphi.tasks.folder import folder_splits

    size = options.get("image_size") or 84
    channels = options.get("channels") or 3
    splits = folder_splits(path, seed=options.get("split_seed", 0), split=options.get("split_file"),
                           channels=channels, image_size=size, invert=options.get("invert", False))
    return image_benchmark(f"folder:{path}", splits, dict(FOLDER_DEFAULTS), pool="max" if size >= 64 else "stride",
                           hidden=32, invert=options.get("invert", False))


#: name -> builder(options); ``folder:PATH`` is handled apart
BENCHMARKS = {
    "glyphs": glyphs,
    "sinusoid": lambda options: sinusoid(),
    "omniglot": _omniglot("omniglot"),
    "omniglot-lake": _omniglot("omniglot-lake"),
    "omniglot-small": _omniglot("omniglot-small"),
    "mini-imagenet": _imagenet("mini-imagenet"),
    "tiered-imagenet": _imagenet("tiered-imagenet"),
    "cifar-fs": _cifar("cifar-fs"),
    "fc100": _cifar("fc100"),
}


def build_benchmark(name: str, data_root: str | None = None, **options) -> Benchmark:
    """The benchmark called ``name`` (or ``folder:PATH``); raises DataError with the valid names otherwise.

    ``options``: ``download`` (fetch missing archives), ``within_group`` (test and validation
    episodes from one alphabet), and for folders ``image_size``, ``channels``, ``invert``,
    ``split_file``, ``split_seed``.
    """
    options = {**options, "data_root": data_root or default_data_root()}
    if name.startswith("folder:"):
        bench = folder(name[len("folder:"):], options)
    elif name in BENCHMARKS:
        bench = BENCHMARKS[name](options)
    else:
        raise DataError(f"unknown benchmark '{name}' (valid: {', '.join(BENCHMARKS)}, folder:PATH)")
    bench.eval_within_group = bool(options.get("within_group"))
    return bench


# -- whole labelled data sets by name -----------------------------------------------------------------
# For problems where the task is one data set (architecture search, augmentation, sample reweighting,
# distillation): ``digits`` (shipped in the package), ``glyphs`` (built in) and ``omniglot`` (the small1
# minimal split, read from ``data_root``).

NAMED = ("digits", "glyphs", "omniglot")


def load_named(name: str, data_root: str | None = None, classes: int | None = None, seed: int = 0) -> ImageClasses:
    """The data set ``name``; ``classes`` keeps that many of its classes, drawn with ``seed`` and kept in
    their original order."""
    if name == "digits":
        from metaphi.tasks.digits import load_digits
        data = load_digits()
    elif name == "glyphs":
        from metaphi.tasks.glyphs import load_glyphs
        data = load_glyphs()
    elif name == "omniglot":
        from metaphi.tasks import omniglot
        data = omniglot.read(data_root or default_data_root(), "small1")
    else:
        raise ValueError(f"unknown data set {name!r} (valid: {', '.join(NAMED)})")
    if classes is not None:
        if not 2 <= classes <= data.num_classes:
            raise ValueError(f"--classes must be between 2 and {data.num_classes} for {name}, got {classes}")
        pick = torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(seed))[:classes]
        data = data.subset(sorted(pick.tolist()))
    return data
