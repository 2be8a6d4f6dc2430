"""Tasks and the class-indexed image store every few-shot data set is read into.

A task is any pair (support, query): the data a learner learns from and the data its result is
judged on. For few-shot classification both are ``(x, y)`` tuples of an N-way K-shot episode; other
problems put a training batch and a validation batch there, or meta-train and meta-test domains.
A batch of tasks is the same structure with a leading task dimension, so it can be vmapped.
"""

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor


class DataError(ValueError):
    """Bad or unusable data: a message that says which file or class and what to do."""


class Task(NamedTuple):
    support: Any
    query: Any

    @staticmethod
    def stack(tasks: Sequence["Task"]) -> "Task":
        """Stack tasks whose tensors have equal shapes into one batched task (leading dim = task)."""
        return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *tasks)

    def unstack(self) -> list["Task"]:
        leaves, spec = torch.utils._pytree.tree_flatten(self)
        n = leaves[0].shape[0]
        return [torch.utils._pytree.tree_unflatten([leaf[i] for leaf in leaves], spec) for i in range(n)]

    def to(self, device) -> "Task":
        return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, self)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class ImageClasses:
    """Images grouped by class, decoded once and kept as uint8.

    images:  uint8 [N, C, H, W]; for handwriting, ink is high (255) and paper low (0)
    targets: int64 [N], the class index of each image, in [0, len(classes))
    classes: class names (a character, a folder name, a synset id)
    groups:  optional group of each class (the alphabet of an Omniglot character), used for
             within-group episodes
    """

    images: Tensor
    targets: Tensor
    classes: list[str]
    groups: list[str] | None = None
    _order: Tensor = field(init=False, repr=False)
    _offsets: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        self.targets = self.targets.to(torch.int64)
        if self.targets.shape != (self.images.shape[0],):
            raise DataError(f"targets must have shape ({self.images.shape[0]},), got {tuple(self.targets.shape)}")
        if self.groups is not None and len(self.groups) != len(self.classes):
            raise DataError(f"{len(self.groups)} groups given for {len(self.classes)} classes")
        if self.targets.numel() and (self.targets.min() < 0 or self.targets.max() >= len(self.classes)):
            raise DataError("targets must index into classes")
        self._order = torch.argsort(self.targets, stable=True)
        counts = torch.bincount(self.targets, minlength=len(self.classes))
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def counts(self) -> Tensor:
        return self._offsets[1:] - self._offsets[:-1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def indices_of(self, c: int) -> Tensor:
        return self._order[self._offsets[c] : self._offsets[c + 1]]

    def subset(self, class_ids: Sequence[int] | Tensor) -> "ImageClasses":
        """The classes listed, renumbered 0..len-1 in the order given."""
        class_ids = [int(c) for c in class_ids]
        idx = torch.cat([self.indices_of(c) for c in class_ids]) if class_ids else torch.zeros(0, dtype=torch.int64)
        new_targets = torch.cat(
            [torch.full((int(self.counts[c]),), i, dtype=torch.int64) for i, c in enumerate(class_ids)]
        ) if class_ids else torch.zeros(0, dtype=torch.int64)
        return ImageClasses(
            images=self.images[idx],
            targets=new_targets,
            classes=[self.classes[c] for c in class_ids],
            groups=[self.groups[c] for c in class_ids] if self.groups is not None else None,
        )

    def rotated(self, degrees: Sequence[int] = (0, 90, 180, 270), reflect: bool = False) -> "ImageClasses":
        """Each rotation of each class becomes a class of its own (Santoro et al. 2016; the Omniglot
        protocol of MAML and Prototypical Networks): class ``c`` at ``degrees[i]`` is class
        ``c * len(degrees) + i``, named ``NAME@rotDEG``, in the group of ``c``. With ``reflect`` each
        rotation's mirror image (left-right) is a class too: the 8 symmetries of the square for the 4
        default angles, class ``c`` at ``degrees[i]`` mirrored being ``c * 2 * len(degrees) + len(degrees) + i``,
        named ``NAME@rotDEG@mirror``. The images are ``torch.rot90`` (and ``flip``) of the uint8 originals,
        stored once per view: len(degrees) (x 2 with ``reflect``) times the memory (4 x 1.5 MB for
        Omniglot's background set at 28 x 28; mind it for large colour folders)."""
        n, ch, h, w = self.images.shape
        for deg in degrees:
            if deg % 90:
                raise DataError(f"rotations must be multiples of 90 degrees, got {deg}")
            if deg % 180 and h != w:
                raise DataError(f"rotating by {deg} degrees needs square images, these are {h} x {w}")
        views = [(deg, False) for deg in degrees] + ([(deg, True) for deg in degrees] if reflect else [])
        # written into one tensor, view by view: no second full copy while concatenating
        images = torch.empty((len(views) * n, ch, h, w), dtype=self.images.dtype)
        for i, (deg, mirror) in enumerate(views):
            turned = torch.rot90(self.images, k=deg // 90, dims=(2, 3))
            images[i * n:(i + 1) * n] = turned.flip(3) if mirror else turned
        targets = torch.cat([self.targets * len(views) + i for i in range(len(views))])
        classes = [f"{name}@rot{deg}{'@mirror' if mirror else ''}" for name in self.classes for deg, mirror in views]
        groups = [g for g in self.groups for _ in views] if self.groups is not None else None
        return ImageClasses(images, targets, classes, groups)

    @property
    def is_rotated(self) -> bool:
        """Whether the classes already are rotations of others (made by :meth:`rotated`)."""
        return any("@rot" in name for name in self.classes)

    def state(self) -> dict:
        return {"images": self.images, "targets": self.targets, "classes": list(self.classes), "groups": self.groups}

    def save(self, path: str | os.PathLike) -> None:
        atomic_save(self.state(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImageClasses":
        state = torch.load(path, weights_only=True)
        return cls(**state)
