"""N-way K-shot episodes drawn from an ImageClasses store with an explicit torch.Generator."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metaphi.tasks.base import DataError, ImageClasses, Task
from metaphi.tasks.transforms import transform_images

#: ``transform(x, generator)``: images ``[..., C, H, W]`` in, the same shape out (e.g. a RandomAffine)
Transform = Callable[[Tensor, torch.Generator], Tensor]


class EpisodeSampler:
    """Draws N-way K-shot classification tasks.

    Each task picks ``ways`` classes, then ``shots + query`` distinct images of each; the classes are
    relabelled 0..ways-1 in the order drawn. Support is ``(x [ways*shots, C, H, W] float in [0, 1],
    y [ways*shots])``, query likewise with ``query`` images per class. With ``within_group`` all classes
    of a task come from one group (one alphabet), the harder Omniglot-challenge setting; a number in
    (0, 1) draws that fraction of the tasks so (a coin per task from the generator), the rest from all
    classes. Groups with fewer than ``ways`` classes are never chosen.

    ``augment`` (a :data:`Transform`, e.g. :class:`metaphi.tasks.transforms.RandomAffine`) transforms
    every support and query image of the episodes drawn, with draws from the same generator after the
    episodes' own; a benchmark gives one to its training split's sampler only.
    """

    def __init__(self, data: ImageClasses, ways: int, shots: int, query: int, within_group: bool | float = False,
                 name: str = "data", augment: Transform | None = None):
        for label, value in (("ways", ways), ("shots", shots), ("query", query)):
            if value < 1:
                raise DataError(f"{label} must be a positive integer, got {value}")
        if ways > data.num_classes:
            raise DataError(f"{name}: {ways}-way tasks need {ways} classes but it has {data.num_classes}")
        need = shots + query
        counts = data.counts
        short = (counts < need).nonzero().flatten()
        if len(short):
            c = int(short[0])
            raise DataError(
                f"{name}: class '{data.classes[c]}' has {int(counts[c])} images but shots + query = "
                f"{shots} + {query} = {need}; lower --shots/--query (at most {int(counts.min())} in all)"
            )
        if not 0.0 <= float(within_group) <= 1.0:
            raise DataError(f"{name}: the fraction of within-group episodes must be in [0, 1], got {within_group}")
        self.data, self.ways, self.shots, self.query = data, ways, shots, query
        self.within_group, self.augment = float(within_group), augment
        self._group_classes: list[Tensor] = []
        if self.within_group:
            if data.groups is None:
                raise DataError(f"{name}: within-group episodes need class groups (alphabets)")
            by_group: dict[str, list[int]] = {}
            for c, g in enumerate(data.groups):
                by_group.setdefault(g, []).append(c)
            self._group_classes = [torch.tensor(v) for v in by_group.values() if len(v) >= ways]
            if not self._group_classes:
                raise DataError(f"{name}: no group has {ways} classes for within-group {ways}-way tasks")
        # A padded class x image index table lets one random draw pick the images of every class of a
        # task; padding sorts last, and every class has at least shots + query real entries.
        width = int(counts.max())
        self._table = torch.zeros(data.num_classes, width, dtype=torch.int64)
        for c in range(data.num_classes):
            self._table[c, : int(counts[c])] = data.indices_of(c)
        self._padding = torch.arange(width) >= counts[:, None]
        self._ragged = bool(self._padding.any())
        labels = torch.arange(ways)
        self._ys, self._yq = labels.repeat_interleave(shots), labels.repeat_interleave(query)

    def _classes(self, generator: torch.Generator) -> Tensor:
        within = self.within_group == 1.0 or (
            self.within_group > 0.0 and bool(torch.rand((), generator=generator) < self.within_group))
        if within:
            # Groups are chosen in proportion to how many classes they have, as characters would be.
            sizes = torch.tensor([len(g) for g in self._group_classes], dtype=torch.float)
            g = int(torch.multinomial(sizes, 1, generator=generator))
            members = self._group_classes[g]
            return members[torch.randperm(len(members), generator=generator)[: self.ways]]
        return torch.randperm(self.data.num_classes, generator=generator)[: self.ways]

    def sample(self, generator: torch.Generator) -> Task:
        return self._augmented(self._draw(generator), generator)

    def sample_batch(self, n: int, generator: torch.Generator) -> Task:
        return self._augmented(Task.stack([self._draw(generator) for _ in range(n)]), generator)

    def _augmented(self, task: Task, generator: torch.Generator) -> Task:
        if self.augment is None:
            return task
        (xs, ys), (xq, yq) = task
        xs, xq = transform_images(self.augment, generator, xs, xq)
        return Task((xs, ys), (xq, yq))

    def _draw(self, generator: torch.Generator) -> Task:
        need = self.shots + self.query
        classes = self._classes(generator)
        keys = torch.rand(self.ways, self._table.shape[1], generator=generator)
        if self._ragged:
            keys.masked_fill_(self._padding[classes], 2.0)
        chosen = self._table[classes].gather(1, keys.argsort(1)[:, :need])  # [ways, shots + query]
        # index_select is far cheaper than advanced indexing for a gather of whole images
        images = self.data.images.index_select(0, chosen.flatten()).float().div_(255.0)
        images = images.view(self.ways, need, *images.shape[1:])
        xs = images[:, : self.shots].reshape(-1, *images.shape[2:])
        xq = images[:, self.shots :].reshape(-1, *images.shape[2:])
        return Task((xs, self._ys.clone()), (xq, self._yq.clone()))
