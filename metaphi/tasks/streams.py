"""Continual-learning streams: a sequence of experiences, each a training set seen once and a test set.

A stream is what a lifelong learner meets: experience 0, then 1, ..., then T-1, each a small
training set shown in a fixed order (the same for every method, so methods are compared on the same
stream), and a held-out test set of the same classes and domain. After each experience the learner
is scored on every experience's test set, which fills the accuracy matrix of
:mod:`metaphi.continual.metrics`. There is one output head for all classes of the stream and no
task label at test: the learner must tell every class seen so far apart (class-incremental), or
the same classes under a new distortion (domain-incremental).

Streams (all seeded with an explicit ``torch.Generator``; nothing draws from the global RNG):

* :func:`class_incremental` — classes of an :class:`ImageClasses` store arrive a few at a time
  (Rebuffi et al. 2017's class-incremental setting; the Omniglot stream of OML, Javed & White 2019,
  which shows 15 images of each class once and tests on 5 others). Experience ``i`` trains
  exactly the labels ``i*k .. i*k+k-1``; no image of a later class is shown before its turn.
* :func:`rotated` and :func:`permuted` — domain-incremental: the same classes in every experience,
  rotated by a new angle (Lopez-Paz & Ranzato 2017's rotated MNIST) or with a new fixed pixel
  permutation (Goodfellow et al. 2013; Kirkpatrick et al. 2017's permuted MNIST).
* :func:`folder_sequence` — your own sequence: ``ROOT/<experience>/<class>/<image>``, experiences
  in the order of their folder names; classes are matched by folder name across experiences.

Streams by name (``glyphs``, ``omniglot``, ``rotated-glyphs``, ..., ``folder:PATH``) are built by
:func:`metaphi.tasks.registry.build_stream`.

A stream may carry ``meta_train``: a store of classes disjoint from the stream's, for methods that
meta-learn before the stream starts (OML). Disjointness is checked by class name when it is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from metaphi.tasks.base import DataError, ImageClasses

KINDS = ("class-incremental", "domain-incremental")


@dataclass
class Experience:
    """One step of a stream: its training images (uint8, in the order they are shown) and test images."""

    index: int
    classes: list[int]     # the labels this experience trains
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    name: str = ""

    def __post_init__(self) -> None:
        for part, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.dim() != 4 or y.shape != (x.shape[0],):
                raise DataError(f"experience {self.index}: {part} images must be uint8 [N, C, H, W] with N labels")
            if len(y) and not set(y.unique().tolist()) <= set(self.classes):
                raise DataError(f"experience {self.index}: {part} labels outside its classes {self.classes}")


@dataclass
class Stream:
    name: str
    kind: str
    experiences: list[Experience]
    class_names: list[str]
    meta_train: ImageClasses | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.experiences:
            raise DataError(f"stream {self.name}: no experiences")
        shapes = {tuple(e.train_x.shape[1:]) for e in self.experiences} | {tuple(e.test_x.shape[1:]) for e in self.experiences}
        if len(shapes) != 1:
            raise DataError(f"stream {self.name}: experiences have images of different shapes {sorted(shapes)}")
        if self.meta_train is not None:
            if self.meta_train.image_shape != self.image_shape:
                raise DataError(f"stream {self.name}: meta-training images are {self.meta_train.image_shape}, the "
                                f"stream's {self.image_shape}")
            shared = set(self.meta_train.classes) & set(self.class_names)
            if shared:
                raise DataError(f"stream {self.name}: class '{sorted(shared)[0]}' is both in the stream and in the "
                                "meta-training classes; evaluation classes must be held out from meta-training")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.experiences[0].train_x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.experiences)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "experiences": len(self), "classes": self.num_classes,
                "image_shape": list(self.image_shape),
                "train_images": sum(len(e.train_y) for e in self.experiences),
                "test_images": sum(len(e.test_y) for e in self.experiences),
                "meta_train_classes": self.meta_train.num_classes if self.meta_train is not None else 0, **self.info}


def _instance_split(data: ImageClasses, classes: Sequence[int], train: int, test: int, g: torch.Generator
                    ) -> tuple[list[Tensor], list[Tensor]]:
    """For each class, ``train`` and ``test`` disjoint image indices drawn with ``g``."""
    train_idx, test_idx = [], []
    for c in classes:
        idx = data.indices_of(int(c))
        if len(idx) < train + test:
            raise DataError(f"class '{data.classes[int(c)]}' has {len(idx)} images, fewer than train + test = "
                            f"{train + test} per class; lower --train-per-class / --test-per-class")
        idx = idx[torch.randperm(len(idx), generator=g)]
        train_idx.append(idx[:train])
        test_idx.append(idx[train:train + test])
    return train_idx, test_idx


def class_incremental(data: ImageClasses, *, experiences: int = 10, classes_per_experience: int = 5,
                      train_per_class: int = 15, test_per_class: int = 5, seed: int = 0, name: str = "stream",
                      meta_train: ImageClasses | None = None) -> Stream:
    """``experiences`` experiences of ``classes_per_experience`` new classes each, drawn from ``data``.

    A generator seeded with ``seed`` picks the classes and their order, splits each class's images
    into ``train_per_class`` shown once and ``test_per_class`` held out, and shuffles each
    experience's training images. Label ``l`` is the ``l``-th class of the order, so experience
    ``i`` holds labels ``i*k .. (i+1)*k - 1``.
    """
    k = classes_per_experience
    if min(experiences, k, train_per_class, test_per_class) < 1:
        raise DataError("experiences, classes per experience, train and test images per class must be positive")
    need = experiences * k
    if need > data.num_classes:
        raise DataError(f"{name}: {experiences} experiences x {k} classes need {need} classes, the data has "
                        f"{data.num_classes}; lower --experiences or --classes-per-experience")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(data.num_classes, generator=g)[:need].tolist()
    train_idx, test_idx = _instance_split(data, order, train_per_class, test_per_class, g)
    exps = []
    for i in range(experiences):
        labels = list(range(i * k, (i + 1) * k))
        tr = torch.cat([train_idx[l] for l in labels])
        tr_y = torch.cat([torch.full((len(train_idx[l]),), l) for l in labels])
        shown = torch.randperm(len(tr), generator=g)
        te = torch.cat([test_idx[l] for l in labels])
        te_y = torch.cat([torch.full((len(test_idx[l]),), l) for l in labels])
        exps.append(Experience(i, labels, data.images[tr[shown]], tr_y[shown], data.images[te], te_y,
                               name=f"classes {labels[0]}-{labels[-1]}"))
    info = {"seed": seed, "classes_per_experience": k, "train_per_class": train_per_class,
            "test_per_class": test_per_class}
    return Stream(name, "class-incremental", exps, [data.classes[c] for c in order], meta_train, info)


def _domain_stream(data: ImageClasses, transforms: list[tuple[str, object]], classes: int, train_per_class: int,
                   test_per_class: int, g: torch.Generator, name: str, meta_train, info) -> Stream:
    if classes > data.num_classes or classes < 2:
        raise DataError(f"{name}: needs 2..{data.num_classes} classes, got {classes}")
    picked = torch.randperm(data.num_classes, generator=g)[:classes].tolist()
    train_idx, test_idx = _instance_split(data, picked, train_per_class, test_per_class, g)
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    tr_y = torch.arange(classes).repeat_interleave(train_per_class)
    te_y = torch.arange(classes).repeat_interleave(test_per_class)
    exps = []
    for i, (label, transform) in enumerate(transforms):
        shown = torch.randperm(len(tr), generator=g)
        exps.append(Experience(i, list(range(classes)), transform(data.images[tr[shown]]), tr_y[shown],
                               transform(data.images[te]), te_y, name=label))
    return Stream(name, "domain-incremental", exps, [data.classes[c] for c in picked], meta_train,
                  {"seed": info.pop("seed"), "train_per_class": train_per_class, "test_per_class": test_per_class,
                   **info})


def rotated(data: ImageClasses, angles: Sequence[float] = (0, 30, 60, 90, 120), *, classes: int = 10,
            train_per_class: int = 15, test_per_class: int = 5, seed: int = 0, name: str = "rotated",
            meta_train: ImageClasses | None = None) -> Stream:
    """The same ``classes`` classes in every experience, experience ``i`` rotated by ``angles[i]`` degrees
    (counter-clockwise, bilinear; :func:`metaphi.tasks.domains.rotate`)."""
    from metaphi.tasks.domains import rotate

    g = torch.Generator().manual_seed(seed)
    transforms = [(f"{a:g} deg", (lambda x, a=a: rotate(x, a))) for a in angles]
    return _domain_stream(data, transforms, classes, train_per_class, test_per_class, g, name, meta_train,
                          {"seed": seed, "angles": [float(a) for a in angles]})


def permuted(data: ImageClasses, experiences: int = 5, *, classes: int = 10, train_per_class: int = 15,
             test_per_class: int = 5, seed: int = 0, name: str = "permuted",
             meta_train: ImageClasses | None = None) -> Stream:
    """The same ``classes`` classes in every experience, each experience with its own fixed permutation
    of the pixels (drawn with the seed); experience 0 sees the images as they are."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = data.image_shape
    perms = [torch.arange(c * h * w)] + [torch.randperm(c * h * w, generator=g) for _ in range(experiences - 1)]
    transforms = [(("identity" if i == 0 else f"permutation {i}"),
                   (lambda x, p=p: x.flatten(1)[:, p].reshape(x.shape))) for i, p in enumerate(perms)]
    return _domain_stream(data, transforms, classes, train_per_class, test_per_class, g, name, meta_train,
                          {"seed": seed})


def folder_sequence(root: str | os.PathLike, *, test_per_class: int = 5, channels: int = 1, image_size: int = 28,
                    invert: bool = False, seed: int = 0, meta_train: ImageClasses | None = None,
                    cache_dir=None) -> Stream:
    """``root/<experience>/<class>/<image>``: experiences in the order of their folder names (name them
    ``01-...``, ``02-...``). A class keeps its label wherever its folder name recurs, so a sequence of
    new classes is class-incremental and the same classes in every folder are domain-incremental.
    ``test_per_class`` images of each class in each experience are held out for testing (drawn with
    the seed); the rest are shown once, shuffled."""
    from metaphi.tasks.folder import load_folder

    path = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(path):
        raise DataError(f"{root}: not a folder; give a folder with one subfolder per experience, each holding one "
                        "subfolder of images per class")
    names = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not names:
        raise DataError(f"{root}: no experience folders; put each experience's class folders in a subfolder")
    g = torch.Generator().manual_seed(seed)
    labels: dict[str, int] = {}
    exps, per_exp_classes = [], []
    for i, exp_name in enumerate(names):
        data = load_folder(os.path.join(path, exp_name), channels=channels, image_size=image_size, invert=invert,
                           min_images=test_per_class + 1, cache_dir=cache_dir)
        for cname in data.classes:
            labels.setdefault(cname, len(labels))
        mine = [labels[cname] for cname in data.classes]
        per_exp_classes.append(mine)
        tr_parts, tr_y, te_parts, te_y = [], [], [], []
        for c in range(data.num_classes):
            idx = data.indices_of(c)
            idx = idx[torch.randperm(len(idx), generator=g)]
            te_parts.append(idx[:test_per_class])
            tr_parts.append(idx[test_per_class:])
            te_y.append(torch.full((test_per_class,), mine[c]))
            tr_y.append(torch.full((len(idx) - test_per_class,), mine[c]))
        tr, ytr = torch.cat(tr_parts), torch.cat(tr_y)
        shown = torch.randperm(len(tr), generator=g)
        exps.append(Experience(i, sorted(mine), data.images[tr[shown]], ytr[shown], data.images[torch.cat(te_parts)],
                               torch.cat(te_y), name=exp_name))
    repeats = any(set(a) & set(b) for i, a in enumerate(per_exp_classes) for b in per_exp_classes[:i])
    kind = "domain-incremental" if repeats else "class-incremental"
    return Stream(f"folder:{os.path.basename(os.path.normpath(path))}", kind, exps, list(labels), meta_train,
                  {"seed": seed, "test_per_class": test_per_class, "root": path})

