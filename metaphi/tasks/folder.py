"""Your own images: one subfolder per class, split into train/val/test classes; query folders.

``root/<class>/<image>`` holds any images PIL reads (png, jpg, ... in modes L, RGB, RGBA, P, ...);
each is converted to 1 or 3 channels (transparency composited on white) and resized. Classes may
also sit one level down, in groups: ``root/<group>/<class>/<image>`` (Omniglot's own layout,
alphabet/character): a top folder holding folders and no files is a group; its classes are named
``group/class`` and keep their group (``ImageClasses.groups``), for within-group episodes. Classes are
split at random by a seed (:func:`folder_splits` with ``fractions``) or by a split file:

- a text or CSV file mapping class -> split, one ``class,split`` (or ``class<TAB>split`` or
  ``class split``) a line, an optional header, ``#`` comments; splits are train, val, test;
- a folder with ``train.txt``, ``val.txt``, ``test.txt`` listing class names one a line, or a
  mapping ``{"train": path, "val": path, "test": path}`` of three such files.

Classes the split file does not name are left out. :func:`load_query_images` reads a flat folder of
images to classify (for ``metaphi predict``).

How to read a folder, when the user leaves it open, is decided by :func:`folder_input` from a bounded,
fixed sample of its images (:func:`metaphi.tasks.imageio.survey`), each rule stated once here:

- channels: 1 when every sampled image is grey (a greyscale mode, a grey palette, or colour channels
  that are equal), else 3;
- invert: when the images are grey and their background is light (the median over the sampled
  images of each one's median grey level is above the mid-level, 127.5), so that dark ink on white
  paper becomes high ink on a low background, as the built-in glyphs and the Omniglot readers have
  it; colour images are never inverted;
- image size: 32 for grey images on a light background (characters; the field's 28 gave 11.7% error
  against 8.3% at 32 on one-shot problems of an alphabet held out of training,
  benchmarks/omniglot_alphabet_choice.py: Conv4's four poolings then leave 2 x 2 positions, not 1),
  else 84 (photos; the size of miniImageNet).

Images are decoded one at a time straight into one preallocated uint8 tensor at the chosen size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch

from metaphi.tasks.base import DataError, ImageClasses
from metaphi.tasks.imageio import CacheDir, Size, Survey, as_size, cached, decode_many, list_images, mode_of, survey

SPLITS = ("train", "val", "test")
ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "dev": "val", "test": "test", "testing": "test"}
SplitSpec = Union[str, os.PathLike, Mapping[str, Union[str, os.PathLike]], None]


#: the image size of each kind of folder when none is given (see the module's docstring)
CHARACTER_SIZE, PHOTO_SIZE = 32, 84
#: a median grey level above this is a light background
MID_LEVEL = 127.5


def _folder(root: str | os.PathLike) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a folder with one subfolder of images per class")
    return root


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_group(folder: Path) -> bool:
    """A folder of class folders: it holds folders and no (visible) file. Stops at the first file, so a
    class folder of many images costs one directory entry or so, not a listing."""
    has_folder = False
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file():
                return False
            has_folder = has_folder or entry.is_dir()
    return has_folder


def class_folders(root: Path) -> list[Path]:
    """The class folders of ``root``, sorted by name: its subfolders, or, where every subfolder is a
    group (holds folders and no file), the subfolders of each group. DataError when there is none,
    or when groups and classes are mixed at the top."""
    folders = _subfolders(root)
    if not folders:
        raise DataError(f"{root}: no class folders; put the images of each class in a subfolder named after it")
    grouped = [_is_group(p) for p in folders]
    if not any(grouped):
        return folders
    if not all(grouped):
        classes = [p.name for p, g in zip(folders, grouped) if not g]
        groups = [p.name for p, g in zip(folders, grouped) if g]
        raise DataError(f"{root}: '{groups[0]}' holds class folders (a group) but '{classes[0]}' holds images "
                        "(a class); lay out either PATH/<class>/<image> or PATH/<group>/<class>/<image>")
    return [c for g in folders for c in _subfolders(g)]


def class_name(root: Path, folder: Path) -> str:
    """A class folder's name: ``class``, or ``group/class`` in a grouped folder."""
    return folder.relative_to(root).as_posix()


def class_groups(names: Sequence[str]) -> list[str] | None:
    """The group of each class name (``group/class``), None when the classes are not grouped."""
    return [n.split("/")[0] for n in names] if names and "/" in names[0] else None


def class_files(root: Path, classes: Sequence[str] | None = None) -> tuple[list[Path], list[Path], list[int]]:
    """``(class folders, image files, class index of each file)`` of ``root``: every class folder
    sorted by name, or those named in ``classes`` in that order; files sorted by name. DataError when
    there is no class folder, one is empty, or a class named is not a folder."""
    folders = class_folders(root)
    if classes is not None:
        by_name = {class_name(root, p): p for p in folders}
        for name in classes:
            if name not in by_name:
                raise DataError(f"{root}: class '{name}' is not a folder of it ({len(by_name)} classes found)")
        folders = [by_name[name] for name in classes]
    files, targets = [], []
    for c, folder in enumerate(folders):
        images = list_images(folder)
        if not images:
            raise DataError(f"{folder}: empty class folder; add images or remove the folder")
        files += images
        targets += [c] * len(images)
    return folders, files, targets


@dataclass(frozen=True)
class FolderInput:
    """How a folder's images are read: ``channels``, ``image_size``, ``invert``, and for each of the
    three whether it was ``"given"`` or ``"inferred"`` (``origin``) from ``survey`` (None when all
    three were given and no image was looked at)."""

    channels: int
    image_size: Size
    invert: bool
    origin: dict = field(default_factory=dict)
    survey: Survey | None = None

    def describe(self) -> str:
        """The choices and why, as part of one line."""
        s, origin = self.survey, self.origin
        h, w = as_size(self.image_size)
        kind = "grey" if self.channels == 1 else "RGB"
        parts = [f"channels {self.channels} ({origin['channels']}"
                 + (f": {s.sampled} of {s.total} images sampled, {'all grey' if s.greyscale else 'in colour'})"
                    if origin["channels"] == "inferred" else ")"),
                 f"{'inverted' if self.invert else 'not inverted'} ({origin['invert']}"
                 + (f": median grey {s.median:.0f} of 255, {'light' if s.median > MID_LEVEL else 'dark'} background"
                    f"{'' if s.greyscale else ' but in colour'})" if origin["invert"] == "inferred" else ")"),
                 f"size {h}x{w} ({origin['image_size']}"
                 + (f": {'grey on light: characters' if _characters(s) else 'photos'})"
                    if origin["image_size"] == "inferred" else ")")]
        hint = "; give channels, image_size or invert to override" if "inferred" in origin.values() else ""
        return f"read as {kind} {h}x{w}{', ink high' if self.invert else ''}; " + ", ".join(parts) + hint


def _characters(s: Survey) -> bool:
    return s.greyscale and s.median > MID_LEVEL


def folder_input(root: str | os.PathLike, *, channels: int | None = None, image_size: Size | None = None,
                 invert: bool | None = None, sample: int = 256, seed: int = 0) -> FolderInput:
    """How to read the class folders of ``root``: each of ``channels``, ``image_size`` and ``invert``
    left ``None`` is inferred by the rules of this module's docstring from up to ``sample`` images
    drawn with ``seed``; a value given is kept. Looks at no image when all three are given."""
    origin = {k: "inferred" if v is None else "given"
              for k, v in (("channels", channels), ("image_size", image_size), ("invert", invert))}
    found = None
    if None in (channels, image_size, invert):
        _, files, _ = class_files(_folder(root))
        found = survey(files, sample=sample, seed=seed)
        if channels is None:
            channels = 1 if found.greyscale else 3
        if invert is None:
            invert = _characters(found)
        if image_size is None:
            image_size = CHARACTER_SIZE if _characters(found) else PHOTO_SIZE
    return FolderInput(channels=channels, image_size=image_size, invert=bool(invert), origin=origin, survey=found)


def load_folder(root: str | os.PathLike, *, channels: int = 3, image_size: Size = 84, invert: bool = False,
                min_images: int = 1, cache_dir: CacheDir = None, classes: Sequence[str] | None = None) -> ImageClasses:
    """Every class folder of ``root`` (sorted by name; or the ``classes`` named, in that order) as
    uint8 [N, channels, H, W], each class's images consecutive and sorted by file name. ``invert``
    maps v to 255 - v (dark strokes on white become high, as the Omniglot store has them). A class
    with fewer than ``min_images`` images raises DataError. Decoded once, image by image into one
    preallocated tensor, and cached, keyed by the size and modification time of every file under
    ``root``."""
    root = _folder(root)
    mode, hw = mode_of(channels), as_size(image_size)

    def build() -> ImageClasses:
        folders, files, targets = class_files(root, classes)
        pixels = decode_many(files, [str(p) for p in files], mode, hw, invert)
        names = [class_name(root, p) for p in folders]
        return ImageClasses(pixels, torch.tensor(targets, dtype=torch.int64), names, class_groups(names))

    params = {"channels": channels, "image_size": list(hw), "invert": invert}
    if classes is not None:
        params["classes"] = list(classes)
    data = cached(f"folder-{root.name}-{mode}-{hw[0]}x{hw[1]}", [root], params, build, cache_dir)
    counts = data.counts
    short = (counts < min_images).nonzero().flatten()
    if len(short):
        c = int(short[0])
        raise DataError(f"{root / data.classes[c]}: {int(counts[c])} images but {min_images} are needed "
                        "(shots + query); add images or lower --shots/--query")
    return data


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((number, line))
    return out


def read_split(split: SplitSpec) -> dict[str, list[str]]:
    """Class names of each split from a mapping file, a folder of three lists, or three list files."""
    if isinstance(split, Mapping):
        files = {ALIASES.get(k, k): Path(v) for k, v in split.items()}
    elif Path(split).is_dir():
        files = {s: Path(split) / f"{s}.txt" for s in SPLITS}
    else:
        path = Path(split)
        out: dict[str, list[str]] = {s: [] for s in SPLITS}
        for i, (number, line) in enumerate(_lines(path)):
            sep = "," if "," in line else "\t" if "\t" in line else None
            parts = line.rsplit(sep, 1)
            if len(parts) != 2:
                raise DataError(f"{path}:{number}: expected 'class,split', got {line!r}")
            name, which = parts[0].strip(), parts[1].strip().lower()
            if which not in ALIASES:
                if i == 0 and which in ("split", "subset", "set", "partition"):  # a header
                    continue
                raise DataError(f"{path}:{number}: split {parts[1].strip()!r} is not train, val or test")
            out[ALIASES[which]].append(name)
        return out
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise DataError(f"unknown split {unknown[0]!r} in the split files; use train, val and test")
    return {s: [line for _, line in _lines(files[s])] if s in files else [] for s in SPLITS}


def folder_splits(root: str | os.PathLike, *, fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
                  split: SplitSpec = None, channels: int = 3, image_size: Size = 84, invert: bool = False,
                  min_images: int = 1, cache_dir: CacheDir = None) -> dict[str, ImageClasses]:
    """``{"train", "val", "test"}`` stores of the class folders of ``root``: split by the ``split``
    file(s) when given, else shuffled with ``torch.Generator().manual_seed(seed)`` and cut by
    ``fractions`` of the classes. Every split must get at least one class, except that a test fraction
    of exactly 0 means no test split: ``{"train", "val"}`` only (a model trained for ``predict`` on all
    classes but the validation ones: ``metaphi run --deploy``).

    The classes are chosen before any image is decoded: only the classes of the three splits are
    read, in split order, so each split is a slice of one store (no copy)."""
    root = _folder(root)
    found = [class_name(root, p) for p in class_folders(root)]
    if split is not None:
        names = read_split(split)
        index = {c: i for i, c in enumerate(found)}
        seen: dict[str, str] = {}
        for s in SPLITS:
            for name in names[s]:
                if name not in index:
                    raise DataError(f"split file {split}: class '{name}' is not a folder of {root}; "
                                    f"fix the name or add the folder ({len(index)} classes found)")
                if name in seen and seen[name] != s:
                    raise DataError(f"split file {split}: class '{name}' is in both {seen[name]} and {s}")
                seen[name] = s
            if not names[s]:
                raise DataError(f"split file {split}: no class in {s}; every split needs at least one class")
        parts = [list(dict.fromkeys(names[s])) for s in SPLITS]
    else:
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise DataError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, "
                            f"got {list(fractions)}")
        n = len(found)
        n_train, n_val = round(fractions[0] * n), round(fractions[1] * n)
        if fractions[2] == 0:  # no test split: what rounding leaves goes to training
            n_train = n - n_val
        counts = [n_train, n_val, n - n_train - n_val]
        if min(counts[:2] if fractions[2] == 0 else counts) < 1:
            raise DataError(f"{root}: {n} classes split by {list(fractions)} leave a split empty ({counts}); "
                            "add classes or change the fractions")
        # the order metaphi.tasks.imageio.split_by_counts gives the classes
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        bounds = [0, counts[0], counts[0] + counts[1], n]
        parts = [[found[i] for i in order[a:b]] for a, b in zip(bounds, bounds[1:])]
        if fractions[2] == 0:
            parts = parts[:2]
    data = load_folder(root, channels=channels, image_size=image_size, invert=invert, min_images=min_images,
                       cache_dir=cache_dir, classes=[c for part in parts for c in part])
    return dict(zip(SPLITS, consecutive(data, [len(part) for part in parts])))


def consecutive(data: ImageClasses, sizes: Sequence[int]) -> list[ImageClasses]:
    """``data`` cut into parts of ``sizes`` consecutive classes, each a slice of its images (a view,
    not a copy); the images of each class must be consecutive and in class order, as
    :func:`load_folder` stores them."""
    counts = data.counts.tolist()
    if not bool((data.targets[1:] >= data.targets[:-1]).all()):
        raise ValueError("the images are not stored in class order")
    parts, first_class, first_image = [], 0, 0
    for size in sizes:
        images = sum(counts[first_class:first_class + size])
        end = first_image + images
        parts.append(ImageClasses(data.images[first_image:end], data.targets[first_image:end] - first_class,
                                  data.classes[first_class:first_class + size],
                                  data.groups[first_class:first_class + size] if data.groups is not None else None))
        first_class, first_image = first_class + size, end
    return parts


def load_query_images(path: str | os.PathLike, channels: int, height: int, width: int,
                      invert: bool = False) -> tuple[list[str], torch.Tensor]:
    """The images of a flat folder (or one image file), sorted by name, as ``(file names, uint8
    [N, channels, height, width])``; any mode and size is converted. Subfolders and hidden files are
    skipped; any other file that is not an image raises DataError naming it."""
    path = Path(path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = list_images(path)
        if not files:
            raise DataError(f"{path}: no images to classify in this folder")
    else:
        raise DataError(f"{path}: not found; give an image file or a folder of images")
    images = decode_many(files, [str(p) for p in files], mode_of(channels), (height, width), invert)
    return [p.name for p in files], images
