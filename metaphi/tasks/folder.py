"""Your own images: one subfolder per class, split into train/val/test classes; query folders.

``root/<class>/<image>`` holds any images PIL reads (png, jpg, ... in modes L, RGB, RGBA, P, ...);
each is converted to 1 or 3 channels (transparency composited on white) and resized. Classes are
split at random by a seed (:func:`folder_splits` with ``fractions``) or by a split file:

- a text or CSV file mapping class -> split, one ``class,split`` (or ``class<TAB>split`` or
  ``class split``) a line, an optional header, ``#`` comments; splits are train, val, test;
- a folder with ``train.txt``, ``val.txt``, ``test.txt`` listing class names one a line, or a
  mapping ``{"train": path, "val": path, "test": path}`` of three such files.

Classes the split file does not name are left out. :func:`load_query_images` reads a flat folder of
images to classify (for ``metaphi predict``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch

from metaphi.tasks.base import DataError, ImageClasses
from metaphi.tasks.imageio import CacheDir, Size, as_size, cached, decode_many, list_images, mode_of, split_by_counts

SPLITS = ("train", "val", "test")
ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "dev": "val", "test": "test", "testing": "test"}
SplitSpec = Union[str, os.PathLike, Mapping[str, Union[str, os.PathLike]], None]


def load_folder(root: str | os.PathLike, *, channels: int = 3, image_size: Size = 84, invert: bool = False,
                min_images: int = 1, cache_dir: CacheDir = None) -> ImageClasses:
    """Every class folder of ``root`` (sorted by name) as uint8 [N, channels, H, W]; images sorted by
    file name. ``invert`` maps v to 255 - v (dark strokes on white become high, as the Omniglot store
    has them). A class with fewer than ``min_images`` images raises DataError. Decoded once and
    cached, keyed by the size and modification time of every file under ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a folder with one subfolder of images per class")
    mode, hw = mode_of(channels), as_size(image_size)

    def build() -> ImageClasses:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataError(f"{root}: no class folders; put the images of each class in a subfolder named after it")
        files, targets = [], []
        for c, folder in enumerate(folders):
            images = list_images(folder)
            if not images:
                raise DataError(f"{folder}: empty class folder; add images or remove the folder")
            files += images
            targets += [c] * len(images)
        pixels = decode_many(files, [str(p) for p in files], mode, hw, invert)
        return ImageClasses(pixels, torch.tensor(targets, dtype=torch.int64), [p.name for p in folders])

    params = {"channels": channels, "image_size": list(hw), "invert": invert}
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
    ``fractions`` of the classes. Every split must get at least one class."""
    data = load_folder(root, channels=channels, image_size=image_size, invert=invert, min_images=min_images,
                       cache_dir=cache_dir)
    if split is not None:
        names = read_split(split)
        index = {c: i for i, c in enumerate(data.classes)}
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
        return {s: data.subset([index[n] for n in dict.fromkeys(names[s])]) for s in SPLITS}
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {list(fractions)}")
    n = data.num_classes
    n_train, n_val = round(fractions[0] * n), round(fractions[1] * n)
    counts = [n_train, n_val, n - n_train - n_val]
    if min(counts) < 1:
        raise DataError(f"{root}: {n} classes split by {list(fractions)} leave a split empty ({counts}); "
                        "add classes or change the fractions")
    return dict(zip(SPLITS, split_by_counts(data, counts, torch.Generator().manual_seed(seed))))


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
