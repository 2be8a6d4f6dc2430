"""Multi-domain classification data for domain generalization: one set of classes seen in several domains.

A domain is a way the same classes look: a rotation of the images, a drawing style, or a folder of
images from another source. Every domain holds the same classes in the same order, and each class's
images are split once, by a seed, into three parts by *instance*:

* ``train`` — what a domain contributes when it is a source (training) domain;
* ``adapt`` — the labelled pool a few-shot adaptation to the held-out domain draws from;
* ``test``  — what the held-out domain is scored on.

For domains made by transforming one set of images (rotations, styles) the split is shared by all
domains, so a drawing whose rotation is a test image of the held-out domain is never, at any angle,
a training image: nothing of the held-out domain, neither its transformation nor its instances,
reaches training. :meth:`DomainSet.leave_one_out` gives the sources' ``train`` parts and the
held-out domain's ``adapt`` and ``test`` parts, and nothing else.

Built offline:

* :func:`rotated_domains` — each angle is a domain (the Rotated-MNIST protocol of Ghifary et al. 2015,
  angles 0°, 15°, ..., 75°); rotation by any angle with ``affine_grid``/``grid_sample``.
* :func:`style_domains` — drawing styles of the same glyphs: plain, bold (a wider pen), slant,
  noise, inverted, texture (a striped background behind the ink).
* :func:`folder_domains` — your own data, ``root/<domain>/<class>/<image>``.

Sampling: :class:`SourceBatches` draws the meta-train / meta-test split of the source domains for
MLDG; :class:`TargetTasks` gives held-out-domain tasks whose support is K labelled examples per class
(possibly none) and whose query is the whole held-out test set.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metaphi.tasks.base import DataError, ImageClasses, Task

ANGLES = (0, 15, 30, 45, 60, 75)
STYLES = ("plain", "bold", "slant", "noise", "inverted", "texture")


# ------------------------------------------------------------------------------------- transforms
def _resample(images: Tensor, matrices: Tensor, fill: float = 0.0) -> Tensor:
    """uint8 [N, C, H, W] resampled through affine maps [N, 2, 3] of output to input coordinates
    (normalised to [-1, 1], x right, y down), bilinear, outside filled with ``fill``."""
    x = images.float()
    if fill:
        x = x - fill
    grid = F.affine_grid(matrices, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if fill:
        out = out + fill
    return out.round_().clamp_(0, 255).to(torch.uint8)


def rotate(images: Tensor, degrees: float) -> Tensor:
    """uint8 images [N, C, H, W] turned counter-clockwise by ``degrees`` about their centre.

    For square images a multiple of 90° gives exactly ``torch.rot90``; other angles interpolate
    bilinearly and fill the corners that come from outside the image with 0 (paper).
    """
    if degrees % 360 == 0:
        return images.clone()
    a = math.radians(degrees)
    n, _, h, w = images.shape
    # An output pixel looks up the input at the point turned back by -a. In normalised coordinates
    # x and y have different pixel scales when h != w, hence the aspect factors.
    c, s = math.cos(a), math.sin(a)
    m = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]])
    return _resample(images, m.expand(n, 2, 3))


def shear(images: Tensor, amount: float) -> Tensor:
    """Slant uint8 images to the right by ``amount`` (x shifts by ``amount`` times the height above centre)."""
    n = images.shape[0]
    m = torch.tensor([[1.0, amount, 0.0], [0.0, 1.0, 0.0]])
    return _resample(images, m.expand(n, 2, 3))


def stylize(images: Tensor, style: str, seed: int = 0) -> Tensor:
    """The glyphs of uint8 ``images`` (ink high on 0) in drawing ``style`` (one of :data:`STYLES`).

    Random styles (noise, texture) draw from a generator seeded with ``seed`` alone, so a style is a
    fixed property of the data, the same in every run.
    """
    g = torch.Generator().manual_seed(seed)
    x = images.float()
    n, c, h, w = x.shape
    if style == "plain":
        return images.clone()
    if style == "bold":
        # A wider pen: grey-scale dilation spreads every stroke by a pixel on each side.
        return F.max_pool2d(x, 3, stride=1, padding=1).to(torch.uint8)
    if style == "slant":
        return shear(images, 0.45)
    if style == "inverted":
        return 255 - images
    if style == "noise":
        noisy = x + torch.randn(x.shape, generator=g) * 60.0
        salt = torch.rand(x.shape, generator=g) < 0.04
        noisy[salt] = 255.0
        return noisy.round_().clamp_(0, 255).to(torch.uint8)
    if style == "texture":
        # Stripes of random direction, period and phase behind the ink; the ink stays on top.
        angle = torch.rand(n, 1, 1, 1, generator=g) * math.pi
        period = 3.0 + torch.rand(n, 1, 1, 1, generator=g) * 4.0
        phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float), torch.arange(w, dtype=torch.float), indexing="ij")
        along = xx * torch.cos(angle) + yy * torch.sin(angle)
        stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * along / period + phase)
        return torch.maximum(x, 110.0 * stripes).round_().to(torch.uint8)
    raise DataError(f"unknown style '{style}' (known: {', '.join(STYLES)})")


# ------------------------------------------------------------------------------------- the data set
def _select(data: ImageClasses, idx: Tensor) -> ImageClasses:
    return ImageClasses(data.images[idx], data.targets[idx], list(data.classes), data.groups)


def instance_split(data: ImageClasses, adapt: int, test: int, seed: int = 0) -> dict[str, Tensor]:
    """Image indices of each part: per class, ``test`` images to test on, ``adapt`` for few-shot
    adaptation and the rest to train on, chosen by a generator seeded with ``seed``."""
    if adapt < 0 or test < 1:
        raise DataError(f"each class needs at least one test image and adapt >= 0, got {adapt=}, {test=}")
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[Tensor]] = {"train": [], "adapt": [], "test": []}
    for cl in range(data.num_classes):
        idx = data.indices_of(cl)
        if len(idx) < adapt + test + 1:
            raise DataError(f"class '{data.classes[cl]}' has {len(idx)} images but {test} test + {adapt} adapt + "
                            f"at least 1 training image are needed; lower --test-per-class/--adapt-per-class")
        idx = idx[torch.randperm(len(idx), generator=g)]
        parts["test"].append(idx[:test])
        parts["adapt"].append(idx[test:test + adapt])
        parts["train"].append(idx[test + adapt:])
    return {k: torch.cat(v).sort().values for k, v in parts.items()}


@dataclass
class DomainSet:
    """The same classes in several domains; ``parts[d]`` holds domain d's train / adapt / test stores."""

    name: str
    domains: list[str]
    parts: list[dict[str, ImageClasses]]
    #: image files were inverted when read (dark ink on light paper -> ink high)
    invert: bool = False

    def __post_init__(self) -> None:
        if len(self.domains) != len(self.parts) or len(self.domains) < 2:
            raise DataError(f"{self.name}: domain generalization needs at least 2 domains, got {len(self.domains)}")
        if len(set(self.domains)) != len(self.domains):
            raise DataError(f"{self.name}: domain names must be distinct, got {self.domains}")
        classes = self.parts[0]["train"].classes
        for name, part in zip(self.domains, self.parts):
            for role in ("train", "adapt", "test"):
                if part[role].classes != classes:
                    raise DataError(f"{self.name}: domain '{name}' ({role}) does not have the classes of "
                                    f"domain '{self.domains[0]}' in the same order")

    @property
    def classes(self) -> list[str]:
        return self.parts[0]["train"].classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.parts[0]["train"].image_shape

    def index(self, domain: int | str) -> int:
        """The position of a domain given by name (``"30°"`` or ``"30"``) or by position."""
        for i, name in enumerate(self.domains):
            if str(domain) in (name, name.rstrip("°")):
                return i
        if isinstance(domain, int) or str(domain).isdigit():
            if 0 <= int(domain) < len(self.domains):
                return int(domain)
        raise DataError(f"{self.name}: unknown domain '{domain}' (domains: {', '.join(self.domains)})")

    def leave_one_out(self, held_out: int | str) -> "DomainSplit":
        """Sources = every other domain's ``train`` part; target = this domain's ``adapt`` and ``test``."""
        t = self.index(held_out)
        sources = [d for d in range(len(self.domains)) if d != t]
        return DomainSplit(name=self.name, source_names=[self.domains[d] for d in sources],
                           sources=[self.parts[d]["train"] for d in sources], target_name=self.domains[t],
                           target_adapt=self.parts[t]["adapt"], target_test=self.parts[t]["test"])


@dataclass
class DomainSplit:
    """One leave-one-domain-out problem: source domains to train on, one held-out target domain."""

    name: str
    source_names: list[str]
    sources: list[ImageClasses]
    target_name: str
    target_adapt: ImageClasses
    target_test: ImageClasses

    @property
    def num_classes(self) -> int:
        return self.target_test.num_classes

    def source_batches(self, batch: int, meta_test: int = 1) -> "SourceBatches":
        return SourceBatches(self.sources, batch, meta_test, self.source_names)

    def target_tasks(self, shots: int) -> "TargetTasks":
        return TargetTasks(self.target_adapt, self.target_test, shots, self.target_name)


def _images(data: ImageClasses, idx: Tensor) -> tuple[Tensor, Tensor]:
    return data.images[idx].float().div_(255.0), data.targets[idx]


class SourceBatches:
    """Training tasks of MLDG: Task(support = meta-train domains' batch, query = meta-test domains' batch).

    Each task shuffles the source domains and takes the last ``meta_test`` of them as meta-test
    domains (Li et al. 2018 split the sources anew at every iteration); every domain gives ``batch``
    images drawn without replacement. Support is ``(x [D_train, batch, C, H, W], y [D_train, batch])``,
    query likewise with D_test domains. With a single source domain there is nothing to hold out:
    D_test = 0 and the query is empty. Labels are the global class indices.
    """

    def __init__(self, sources: Sequence[ImageClasses], batch: int, meta_test: int = 1,
                 names: Sequence[str] | None = None):
        if not sources:
            raise DataError("no source domain to train on")
        if batch < 1 or meta_test < 0:
            raise DataError(f"batch must be >= 1 and meta_test >= 0, got {batch=}, {meta_test=}")
        self.names = list(names) if names is not None else [str(i) for i in range(len(sources))]
        for name, d in zip(self.names, sources):
            if len(d.targets) < batch:
                raise DataError(f"source domain '{name}' has {len(d.targets)} training images, fewer than a "
                                f"batch of {batch}; lower --batch")
        if meta_test and meta_test >= len(sources) and len(sources) > 1:
            raise DataError(f"{meta_test} meta-test domains leave no meta-train domain among {len(sources)} sources")
        self.sources, self.batch = list(sources), batch
        self.meta_test = min(meta_test, len(sources) - 1)

    def split(self, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """(meta-train domains, meta-test domains), as indices into the sources."""
        order = torch.randperm(len(self.sources), generator=generator).tolist()
        cut = len(order) - self.meta_test
        return sorted(order[:cut]), sorted(order[cut:])

    def _batch(self, domains: list[int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if not domains:
            c, h, w = self.sources[0].image_shape
            return torch.zeros(0, self.batch, c, h, w), torch.zeros(0, self.batch, dtype=torch.int64)
        xs, ys = [], []
        for d in domains:
            data = self.sources[d]
            x, y = _images(data, torch.randperm(len(data.targets), generator=generator)[: self.batch])
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

    def sample(self, generator: torch.Generator) -> Task:
        train, test = self.split(generator)
        return Task(self._batch(train, generator), self._batch(test, generator))

    def sample_batch(self, n: int, generator: torch.Generator) -> Task:
        return Task.stack([self.sample(generator) for _ in range(n)])


class TargetTasks:
    """Held-out-domain tasks: support = ``shots`` labelled images per class from the adaptation pool
    (none for ``shots = 0``: pure domain generalization), query = every test image of the domain."""

    def __init__(self, adapt: ImageClasses, test: ImageClasses, shots: int, name: str = "target"):
        if shots < 0:
            raise DataError(f"shots must be >= 0, got {shots}")
        short = (adapt.counts < shots).nonzero().flatten()
        if shots and len(short):
            c = int(short[0])
            raise DataError(f"held-out domain '{name}': class '{adapt.classes[c]}' has {int(adapt.counts[c])} "
                            f"adaptation images, fewer than {shots} shots; lower the shots or raise --adapt-per-class")
        self.adapt, self.test, self.shots, self.name = adapt, test, shots, name
        self._query = _images(test, torch.arange(len(test.targets)))

    def sample(self, generator: torch.Generator) -> Task:
        picks = [self.adapt.indices_of(c)[torch.randperm(int(self.adapt.counts[c]), generator=generator)[: self.shots]]
                 for c in range(self.adapt.num_classes)] if self.shots else []
        idx = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.int64)
        return Task(_images(self.adapt, idx), self._query)


# -------------------------------------------------------------------------------------- builders
def transformed_domains(name: str, data: ImageClasses, transforms: dict[str, Callable[[Tensor], Tensor]],
                        adapt: int = 5, test: int = 5, split_seed: int = 0) -> DomainSet:
    """A domain per ``transforms`` entry (name -> uint8 images -> uint8 images) of the same images,
    all sharing one instance split (see the module's docstring)."""
    roles = instance_split(data, adapt, test, split_seed)
    parts = []
    for fn in transforms.values():
        moved = ImageClasses(fn(data.images), data.targets, list(data.classes), data.groups)
        parts.append({role: _select(moved, idx) for role, idx in roles.items()})
    return DomainSet(name, list(transforms), parts)


def rotated_domains(data: ImageClasses, angles: Sequence[float] = ANGLES, adapt: int = 5, test: int = 5,
                    split_seed: int = 0, name: str = "rotated") -> DomainSet:
    """Each angle a domain: the images of ``data`` turned by that many degrees (Rotated-MNIST protocol)."""
    if len(set(angles)) != len(angles):
        raise DataError(f"angles must be distinct, got {list(angles)}")
    return transformed_domains(name, data, {f"{a:g}°": (lambda x, a=a: rotate(x, a)) for a in angles},
                               adapt, test, split_seed)


def style_domains(data: ImageClasses, styles: Sequence[str] = STYLES, adapt: int = 5, test: int = 5,
                  split_seed: int = 0, name: str = "glyph-styles") -> DomainSet:
    """Each drawing style a domain (see :func:`stylize`)."""
    for s in styles:
        if s not in STYLES:
            raise DataError(f"unknown style '{s}' (known: {', '.join(STYLES)})")
    if len(set(styles)) != len(styles):
        raise DataError(f"styles must be distinct, got {list(styles)}")
    return transformed_domains(name, data, {s: (lambda x, s=s: stylize(x, s, seed=split_seed + 1)) for s in styles},
                               adapt, test, split_seed)


def choose_classes(data: ImageClasses, classes: int | None, seed: int = 0) -> ImageClasses:
    """``classes`` classes of ``data`` drawn with a seed (all of them for None), in their original order."""
    if classes is None or classes >= data.num_classes:
        return data
    if classes < 2:
        raise DataError(f"classification needs at least 2 classes, got {classes}")
    picks = torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(seed))[:classes]
    return data.subset(picks.sort().values)


def omniglot_classes(data_root: str | os.PathLike, alphabets: Sequence[str] | None = None,
                     which: str = "small1", image_size: int = 28, download: bool = False) -> ImageClasses:
    """The characters of the named alphabets of an Omniglot set (all its alphabets for None)."""
    from metaphi.tasks import omniglot

    data = omniglot.read(data_root, which, image_size, download=download)
    if not alphabets:
        return data
    known = sorted(set(data.groups))
    unknown = [a for a in alphabets if a not in known]
    if unknown:
        raise DataError(f"Omniglot {which} has no alphabet '{unknown[0]}' (it has: {', '.join(known)})")
    return data.subset([c for c, g in enumerate(data.groups) if g in set(alphabets)])


def glyph_classes(classes: int = 60, alphabets: int = 2, seed: int = 0) -> ImageClasses:
    """``classes`` glyph characters from a small generated glyphs set (``alphabets`` x 30 characters)."""
    from metaphi.tasks.glyphs import load_glyphs

    return choose_classes(load_glyphs(alphabets=alphabets, characters=30, drawers=20, seed=seed), classes, seed)


def folder_domains(root: str | os.PathLike, channels: int = 1, image_size: int = 28, invert: bool = False,
                   adapt: int = 5, test: int = 5, split_seed: int = 0) -> DomainSet:
    """``root/<domain>/<class>/<image>``: one folder per domain, each with the same class folders.

    Each domain's images are split by instance on their own (they are different images).
    """
    from metaphi.tasks.folder import load_folder

    root_path = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(root_path):
        raise DataError(f"{root}: not a folder; give a folder with one subfolder per domain, each holding one "
                        "subfolder of images per class")
    names = sorted(d for d in os.listdir(root_path)
                   if os.path.isdir(os.path.join(root_path, d)) and not d.startswith("."))
    if len(names) < 2:
        raise DataError(f"{root}: found {len(names)} domain folder(s); domain generalization needs at least 2")
    stores = [load_folder(os.path.join(root_path, d), channels=channels, image_size=image_size, invert=invert)
              for d in names]
    for d, s in zip(names[1:], stores[1:]):
        if s.classes != stores[0].classes:
            missing = sorted(set(stores[0].classes) ^ set(s.classes))
            raise DataError(f"{root}: domain '{d}' and domain '{names[0]}' have different class folders "
                            f"(e.g. '{missing[0]}'); every domain needs the same classes")
    parts = []
    for s in stores:
        roles = instance_split(s, adapt, test, split_seed)
        parts.append({role: _select(s, idx) for role, idx in roles.items()})
    return DomainSet(f"folder:{root}", names, parts, invert=invert)
