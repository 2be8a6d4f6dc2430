"""Whole labelled data sets by name, for problems where the task is one data set (architecture search,
augmentation, sample reweighting, distillation): ``digits`` (shipped in the package), ``glyphs``
(built in) and ``omniglot`` (the small1 minimal split, read from ``data_root``)."""
from __future__ import annotations

import torch

from .base import ImageClasses

NAMED = ("digits", "glyphs", "omniglot")


def load_named(name: str, data_root: str | None = None, classes: int | None = None, seed: int = 0) -> ImageClasses:
    """The data set ``name``; ``classes`` keeps that many of its classes, drawn with ``seed`` and kept in
    their original order."""
    if name == "digits":
        from .digits import load_digits
        data = load_digits()
    elif name == "glyphs":
        from .glyphs import load_glyphs
        data = load_glyphs()
    elif name == "omniglot":
        from ..benchmarks import default_data_root
        from . import omniglot
        data = omniglot.read(data_root or default_data_root(), "small1")
    else:
        raise ValueError(f"unknown data set {name!r} (valid: {', '.join(NAMED)})")
    if classes is not None:
        if not 2 <= classes <= data.num_classes:
            raise ValueError(f"--classes must be between 2 and {data.num_classes} for {name}, got {classes}")
        pick = torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(seed))[:classes]
        data = data.subset(sorted(pick.tolist()))
    return data
