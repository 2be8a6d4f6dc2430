"""Benchmarks: where few-shot episodes come from, which model fits them, and the settings they are run with.

A benchmark gives episode samplers for its splits ("train", "val", "test"), a pooled sampler of
training examples with their global labels (for the pre-training baseline), and a model factory.
:meth:`Benchmark.with_training` makes more of the training split (rotations as new classes, random
affine augmentation); every sampler of the "train" split it returns sees that, whichever algorithm
asks, and the validation and test splits stay as they are.
Benchmarks by name (``glyphs``, ``omniglot``, ..., ``folder:PATH``) are built by
:func:`metaphi.tasks.registry.build_benchmark`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from metaphi.algorithms.base import CLASSIFICATION, Problem
from metaphi.models import Conv4
from metaphi.tasks import DataError, EpisodeSampler, ImageClasses, Task
from metaphi.tasks.episodes import Transform
from metaphi.tasks.sinusoid import SinusoidTasks
from metaphi.tasks.transforms import MAX_STRENGTH, RandomAffine


class PooledSampler:
    """Batches of training examples with their global class labels, shaped as tasks whose support
    is empty: what the "pre-train on all training classes, then fine-tune" baseline learns from.
    ``augment`` transforms every image, drawing from the same generator after the batch's own draws."""

    def __init__(self, data: ImageClasses, batch_size: int, augment: Transform | None = None):
        self.data, self.batch_size, self.augment = data, batch_size, augment

    def sample_batch(self, n: int, generator: torch.Generator) -> Task:
        idx = torch.randint(len(self.data.targets), (n, self.batch_size), generator=generator)
        x = self.data.images[idx].float().div_(255.0)
        if self.augment is not None:
            x = self.augment(x, generator)
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
    #: one line saying what was read and how (folders: the channels, size and polarity chosen, and why)
    description: str = ""
    #: for each input setting ("channels", "image_size", "invert"): "given" or "inferred" (folders)
    input_origin: dict = field(default_factory=dict)
    #: transforms every image of the "train" split's episodes and pooled batches (see with_training)
    train_augment: Transform | None = None
    #: handwritten characters or other ink drawings (Omniglot; a folder of dark ink on light paper): a
    #: rotated character is a new character, so training classes are rotated by default (run's recipe)
    characters: bool = False
    #: what with_training made of the training split: {"rotations": bool, "reflections": bool, "augment": bool}
    training: dict = field(default_factory=dict)
    #: what ``make_model`` takes besides the output size (Conv4's ``hidden`` and ``pool``); see with_backbone
    backbone: dict = field(default_factory=dict)

    def with_training(self, rotations: bool = False, augment: bool = False,
                      augment_strength: float = 1.0, reflections: bool = False,
                      elastic: float = 0.0, within_group: float = 0.0) -> "Benchmark":
        """This benchmark with more made of its training split; validation and test are untouched.

        ``rotations``: each training class also at 90, 180 and 270 degrees, each rotation a new class
        (Santoro et al. 2016; MAML's and Prototypical Networks' Omniglot protocol). Done once, here:
        the training images are held 4 times as uint8 (a few MB for Omniglot-size data, but 4 x a large
        colour folder). Groups (alphabets) are kept, so within-group sampling works as before.
        ``elastic`` (with ``augment`` only): each image also bent by a smooth random displacement field,
        control points moved by up to this fraction of the image's size (:class:`RandomAffine`'s ``elastic``).
        ``reflections`` (with ``rotations`` only): each rotation's mirror image a new class as well, the
        eight symmetries of the square (8 x the training images).
        ``augment``: every image of every training episode (and pooled training batch) moved by its own
        random affine map (:class:`metaphi.tasks.transforms.RandomAffine`: shift ±10% of the size,
        zoom 0.9-1.1, rotation ±15°, shear ±10°, each range times ``augment_strength``), drawn from the
        generator the sampler is called with. What moves in from outside is paper (0) for ink-high
        benchmarks (``invert``), else the image's edge.
        ``within_group``: this fraction of the training episodes (a coin per episode) draws all its classes
        from one group (one alphabet, rotations of its characters included), the rest from every class;
        needs class groups and a group with as many classes as the training episodes' ways.
        """
        if reflections and not rotations:
            raise DataError("reflections are made of the rotated classes: give rotations too")
        if not 0.0 <= within_group <= 1.0:
            raise DataError(f"the fraction of within-group training episodes must be in [0, 1], got {within_group}")
        if within_group and (not self.splits or self.splits.get("train") is None
                             or self.splits["train"].groups is None):
            raise DataError(f"within-group training episodes need classes in groups; benchmark '{self.name}' has "
                            "none (a folder gives them as PATH/<group>/<class>/<image>)")
        if not (rotations or augment or within_group):
            return self
        if self.regression_tasks is not None or "train" not in self.splits:
            raise DataError(f"rotations and augmentation need image classes; benchmark '{self.name}' has none")
        splits = dict(self.splits)
        if rotations:
            if splits["train"].is_rotated:
                raise DataError(f"benchmark '{self.name}' already makes each rotation of its training classes a "
                                "class of its own; drop --rotations")
            splits["train"] = splits["train"].rotated(reflect=reflections)
        train_augment = self.train_augment
        if augment:
            if not 0.0 < augment_strength <= MAX_STRENGTH:
                raise DataError(f"augmentation strength must be in (0, {MAX_STRENGTH:g}], got {augment_strength}")
            train_augment = RandomAffine(augment_strength, padding="zeros" if self.invert else "border",
                                         elastic=elastic)
        elif elastic:
            raise DataError("elastic distortion is part of the augmentation: give augment too")
        return dataclasses.replace(self, splits=splits, train_augment=train_augment,
                                   training={"rotations": bool(rotations), "reflections": bool(reflections),
                                             "augment": bool(augment), "augment_elastic": float(elastic),
                                             "within_group": float(within_group)})

    def rotates_by_default(self) -> bool:
        """Whether training classes are rotated where the run does not say (``--rotations``): character
        data whose training split is not rotated already."""
        return self.characters and "train" in self.splits and not self.splits["train"].is_rotated

    def with_backbone(self, pool: str | None = None, hidden: int | None = None) -> "Benchmark":
        """This benchmark with its models downsampling by ``pool`` ("stride", "max" or "max3") and
        ``hidden`` filters a layer (None: as it is)."""
        change = {k: v for k, v in (("pool", pool), ("hidden", hidden)) if v is not None and self.backbone.get(k) != v}
        if not change:
            return self
        if any(k not in self.backbone for k in change):
            what = " and ".join({"pool": "the pooling", "hidden": "the width"}[k] for k in change)
            raise DataError(f"benchmark '{self.name}' has no convolutional backbone to choose {what} of")
        return dataclasses.replace(self, backbone={**self.backbone, **change})

    def episodes(self, split: str, ways: int, shots: int, query: int):
        if self.regression_tasks is not None:
            return self.regression_tasks(shots, query)
        if split not in self.splits:
            raise DataError(f"benchmark '{self.name}' has no '{split}' split (it has {', '.join(self.splits)})")
        within = self.training.get("within_group", 0.0) if split == "train" else self.eval_within_group
        return EpisodeSampler(self.splits[split], ways, shots, query, within_group=within,
                              name=f"{self.name} {split} split",
                              augment=self.train_augment if split == "train" else None)

    def pooled(self, split: str, batch_size: int):
        if self.regression_tasks is not None:
            return self.regression_tasks(batch_size // 2, batch_size - batch_size // 2)
        return PooledSampler(self.splits[split], batch_size, augment=self.train_augment if split == "train" else None)

    def num_classes(self, split: str) -> int:
        return self.splits[split].num_classes if self.splits else 1

    def with_model(self, spec: dict) -> "Benchmark":
        """This benchmark with the backbone ``spec`` names (see :mod:`metaphi.models`) in place of its own."""
        from metaphi.models import build_model

        if not self.splits:
            raise DataError(f"benchmark '{self.name}' is not made of images; --model chooses an image backbone")
        shape = tuple(self.splits["train"].image_shape)
        return dataclasses.replace(self, backbone={},
                                   make_model=lambda out: build_model(spec, input_shape=shape, out_features=out))

    def model(self, out_features: int) -> nn.Module:
        return self.make_model(out_features, **self.backbone)

    def input_spec(self) -> dict:
        """What inputs the models of this benchmark take, for checkpoints and ``predict``."""
        if not self.splits:
            return {"kind": "vector", "features": 1}
        c, h, w = self.splits["train"].image_shape
        spec = {"kind": "image", "channels": c, "height": h, "width": w, "scale": "x/255", "invert": self.invert}
        if self.input_origin:
            spec["origin"] = dict(self.input_origin)
        return spec


def image_benchmark(name: str, splits: dict[str, ImageClasses], defaults: dict, hidden: int = 64,
                    pool: str = "stride", invert: bool = False, characters: bool = False) -> Benchmark:
    c, h, _ = splits["train"].image_shape
    return Benchmark(name=name, problem=CLASSIFICATION, defaults=defaults, splits=splits, invert=invert,
                     characters=characters, backbone={"hidden": hidden, "pool": pool},
                     make_model=lambda out, hidden=hidden, pool=pool: Conv4(c, out, hidden=hidden, image_size=h,
                                                                            pool=pool))
