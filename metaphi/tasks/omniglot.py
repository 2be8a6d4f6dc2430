"""Omniglot (Lake et al. 2015): 1623 handwritten characters of 50 alphabets, 20 drawings each.

The official archives hold 105x105 1-bit PNGs, black ink on white, laid out as
``images_background/<Alphabet>/character01/0709_01.png``. They are read as they are, zipped or
unpacked, into an :class:`ImageClasses` store with ink high (255) on a 0 background, resized to
28x28 by default with Lanczos antialiasing. Classes are named ``"Alphabet/characterNN"`` and
grouped by alphabet, so ``EpisodeSampler(..., within_group=True)`` draws within-alphabet episodes.

Protocols (each returns ``{"train", "val", "test"}`` stores):

- :func:`maml_splits` — MAML / Matching Networks: all 1623 characters shuffled by a seed, 1100 train,
  100 val, 423 test, each rotation by 0/90/180/270 degrees a class of its own.
- :func:`lake_splits` — Lake's split: background alphabets to train (a few held out for val),
  evaluation alphabets to test.
- :func:`minimal_splits` — the minimal background sets ``small1`` / ``small2`` (5 alphabets each)
  to train; test on the evaluation set or on the alphabets of the other minimal set that the
  training set lacks (:func:`unseen_alphabets`).

Decoded stores are cached (see :mod:`metaphi.tasks.imageio`), so decoding happens once per archive
and image size.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

import torch

from metaphi.tasks.base import DataError, ImageClasses
from metaphi.tasks.download import download as fetch
from metaphi.tasks.download import verify
from metaphi.tasks.imageio import CacheDir, Size, as_size, cached, concat, decode_many, split_by_counts, split_by_groups

URL = "https://github.com/brendenlake/omniglot/raw/master/python/{}.zip"

# The hash of each archive, checked when it is downloaded and whenever it is found on disk (None: not
# checked). small1/small2 are the hashes of the archives as published; for background/evaluation only
# an md5 is published (torchvision's), so those two are checked by md5.
ARCHIVES: dict[str, dict[str, str | None]] = {
    "images_background": {"sha256": None, "md5": "68d2efa1b9178cc56df9314c21c6e718"},
    "images_evaluation": {"sha256": None, "md5": "6b91aef0f799c5bb55b94e3f2daec811"},
    "images_background_small1": {
        "sha256": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
        "md5": "e704a628b5459e08445c13499850abc4",
    },
    "images_background_small2": {
        "sha256": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
        "md5": "b75a71a51d3b13f821f212756fe481fd",
    },
}
# Short names of the archives.
SETS = {
    "background": "images_background",
    "evaluation": "images_evaluation",
    "small1": "images_background_small1",
    "small2": "images_background_small2",
}


def archive_name(which: str) -> str:
    """``"background"`` or ``"images_background"`` -> ``"images_background"``."""
    name = SETS.get(which, which)
    if name not in ARCHIVES:
        raise DataError(f"unknown Omniglot set {which!r}; use one of {', '.join(SETS)}")
    return name


def find(data_root: str | os.PathLike, which: str, download_missing: bool = False, progress: bool = True) -> Path:
    """The archive ``<name>.zip`` or unpacked folder ``<name>/`` of an Omniglot set, looked for in
    ``data_root`` and ``data_root/omniglot``; downloaded into ``data_root`` when missing and
    ``download_missing`` is set."""
    name = archive_name(which)
    root = Path(data_root).expanduser()
    for folder in (root, root / "omniglot"):
        for candidate in (folder / f"{name}.zip", folder / name):
            if candidate.exists():  # an archive is checked against its published hash before each use
                return candidate if candidate.is_dir() else verify(candidate, **ARCHIVES[name])
    url = URL.format(name)
    if download_missing:
        return fetch(url, root / f"{name}.zip", ARCHIVES[name]["sha256"], progress, md5=ARCHIVES[name]["md5"])
    raise DataError(
        f"Omniglot {name}.zip not found in {root} or {root / 'omniglot'}; download it from {url} into that "
        f"folder (or pass download=True / --download), or point --data-root DIR at the folder that has it"
    )


def listing(source: str | os.PathLike) -> list[tuple[tuple[str, str, str], str]]:
    """The drawings of an Omniglot archive or folder, from their names alone (nothing decoded):
    ``((alphabet, character, file), where)`` sorted by key, in the order :func:`load` stores the
    images; ``where`` is the zip member's name or the file's path."""
    source = Path(source).expanduser()
    entries: list[tuple[tuple[str, str, str], str]] = []
    if source.is_dir():
        for folder, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__MACOSX")))
            for f in files:
                if f.lower().endswith(".png") and not f.startswith("."):
                    p = Path(folder) / f
                    rel = p.relative_to(source).parts
                    if len(rel) >= 3:
                        entries.append(((rel[-3], rel[-2], rel[-1]), str(p)))
    else:
        try:
            with zipfile.ZipFile(source) as z:
                for info in z.infolist():
                    parts = info.filename.split("/")
                    if info.is_dir() or not parts[-1].lower().endswith(".png") or len(parts) < 3:
                        continue
                    if parts[0].startswith("__MACOSX") or parts[-1].startswith("."):
                        continue
                    entries.append(((parts[-3], parts[-2], parts[-1]), info.filename))
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{source}: not a readable zip archive ({e}); delete it and download it again") from None
    if not entries:
        raise DataError(f"{source}: no Omniglot images (<Alphabet>/<character>/<drawing>.png) in it; "
                        "is this an Omniglot archive or folder?")
    entries.sort(key=lambda e: e[0])
    return entries


def _members(source: Path) -> tuple[list[tuple[str, str, str]], list, list[str]]:
    """``(alphabet, character, file)`` keys, sources to decode (bytes or paths) and display names."""
    entries = listing(source)
    if source.is_dir():
        return [k for k, _ in entries], [Path(w) for _, w in entries], [w for _, w in entries]
    with zipfile.ZipFile(source) as z:
        items = [z.read(w) for _, w in entries]
    return [k for k, _ in entries], items, [f"{source}:{w}" for _, w in entries]


def drawer_of(file: str) -> int:
    """The drawer of an Omniglot drawing from its file name: ``0709_05.png`` (character 709 drawn by
    the alphabet's drawer 05) -> 5. Omniglot's 20 drawers of an alphabet are numbered 01-20."""
    stem = file.rsplit(".", 1)[0]
    _, sep, drawer = stem.rpartition("_")
    if not sep or not drawer.isdigit():
        raise DataError(f"{file}: not an Omniglot drawing name (<character id>_<drawer>.png, e.g. 0709_05.png); "
                        "the drawer cannot be read from it")
    return int(drawer)


def drawers(source: str | os.PathLike) -> torch.Tensor:
    """int64 [N]: the drawer of each image of :func:`load`'s store of ``source``, in the same order
    (read from the file names, nothing decoded)."""
    return torch.tensor([drawer_of(key[2]) for key, _ in listing(source)], dtype=torch.int64)


def alphabets(source: str | os.PathLike) -> list[str]:
    """The alphabets of an Omniglot archive or folder, sorted, from the file names alone."""
    return sorted({key[0] for key, _ in listing(source)})


def load(source: str | os.PathLike, image_size: Size = 28, cache_dir: CacheDir = None) -> ImageClasses:
    """Read one Omniglot archive (``.zip``) or unpacked folder into a store of uint8 [N, 1, H, W]
    images, ink 255 on 0, classes ``"Alphabet/characterNN"`` sorted by name, groups = alphabets.

    The decoded store is cached in ``cache_dir`` keyed by the source's size and modification time and
    by ``image_size``.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source}: not found; give the path of an Omniglot .zip archive or its unpacked folder")
    hw = as_size(image_size)

    def build() -> ImageClasses:
        keys, items, names = _members(source)
        classes: list[str] = []
        groups: list[str] = []
        targets = []
        for alphabet, character, _ in keys:
            name = f"{alphabet}/{character}"
            if not classes or classes[-1] != name:
                classes.append(name)
                groups.append(alphabet)
            targets.append(len(classes) - 1)
        images = decode_many(items, names, "L", hw, invert=True)
        return ImageClasses(images, torch.tensor(targets, dtype=torch.int64), classes, groups)

    stem = f"omniglot-{source.name.removesuffix('.zip')}-{hw[0]}x{hw[1]}"
    return cached(stem, [source], {"image_size": list(hw)}, build, cache_dir)


def read(data_root: str | os.PathLike, which: str, image_size: Size = 28, cache_dir: CacheDir = None,
         download: bool = False) -> ImageClasses:
    """:func:`find` then :func:`load` one set: ``"background"``, ``"evaluation"``, ``"small1"``, ``"small2"``."""
    return load(find(data_root, which, download), image_size, cache_dir)


def unseen_alphabets(seen: ImageClasses, data: ImageClasses) -> ImageClasses:
    """The classes of ``data`` whose alphabet ``seen`` does not have — e.g. the alphabets of small2
    that small1 lacks (Japanese (katakana), Sanskrit, Tagalog), a test set for a model trained on
    small1. Use with ``EpisodeSampler(..., within_group=True)`` for within-alphabet episodes."""
    if seen.groups is None or data.groups is None:
        raise DataError("unseen_alphabets needs stores grouped by alphabet (as omniglot.load makes them)")
    known = set(seen.groups)
    keep = [c for c, g in enumerate(data.groups) if g not in known]
    if not keep:
        raise DataError("every alphabet of the test set is also in the training set; nothing unseen to test on")
    return data.subset(keep)


def _rotate(data: ImageClasses, rotations: Sequence[int]) -> ImageClasses:
    return data if tuple(rotations) == (0,) else data.rotated(rotations)


def maml_splits(data_root: str | os.PathLike, *, seed: int = 0, num_train: int = 1100, num_val: int = 100,
                rotations: Sequence[int] = (0, 90, 180, 270), rotate_eval: bool = True, image_size: Size = 28,
                cache_dir: CacheDir = None, download: bool = False) -> dict[str, ImageClasses]:
    """The MAML / Matching Networks protocol: the 1623 characters of background + evaluation,
    shuffled with ``torch.Generator().manual_seed(seed)``; the first ``num_train`` (1100) train, the
    next ``num_val`` (100) validate, the rest (423) test. Each rotation in ``rotations`` makes a
    class of its own (4 x 1100 training classes); ``rotate_eval=False`` keeps val/test unrotated.

    The published papers shuffled with their own seeds, so the characters in each split differ from
    theirs; the sizes are the same.
    """
    data = concat([read(data_root, "background", image_size, cache_dir, download),
                   read(data_root, "evaluation", image_size, cache_dir, download)])
    num_test = data.num_classes - num_train - num_val
    if num_test < 1:
        raise DataError(f"{data.num_classes} Omniglot characters cannot give {num_train} train + {num_val} val "
                        "classes and a test set; lower num_train/num_val")
    train, val, test = split_by_counts(data, [num_train, num_val, num_test], torch.Generator().manual_seed(seed))
    eval_rotations = rotations if rotate_eval else (0,)
    return {"train": _rotate(train, rotations), "val": _rotate(val, eval_rotations), "test": _rotate(test, eval_rotations)}


def lake_splits(data_root: str | os.PathLike, *, val_alphabets: int | Sequence[str] = 5, seed: int = 0,
                rotations: Sequence[int] = (0,), image_size: Size = 28, cache_dir: CacheDir = None,
                download: bool = False) -> dict[str, ImageClasses]:
    """Lake et al.'s split: train on the 30 background alphabets less ``val_alphabets`` held out for
    validation (a number drawn with ``seed``, or a list of names), test on the 20 evaluation
    alphabets. ``rotations`` augments the training classes only."""
    background = read(data_root, "background", image_size, cache_dir, download)
    train, val = split_by_groups(background, val_alphabets, torch.Generator().manual_seed(seed), "alphabet")
    test = read(data_root, "evaluation", image_size, cache_dir, download)
    return {"train": _rotate(train, rotations), "val": val, "test": test}


def minimal_splits(data_root: str | os.PathLike, which: str = "small1", *, test: str = "unseen",
                   val_alphabets: int | Sequence[str] = 1, seed: int = 0, rotations: Sequence[int] = (0,),
                   image_size: Size = 28, cache_dir: CacheDir = None, download: bool = False) -> dict[str, ImageClasses]:
    """Train on a minimal background set, ``which`` = ``"small1"`` or ``"small2"`` (5 alphabets; the
    setting of Lake et al.'s "minimal" results), less ``val_alphabets`` held out for validation.

    ``test="evaluation"`` tests on the 20 evaluation alphabets, as Lake et al. did.
    ``test="unseen"`` (needs only the two small archives) tests on the alphabets of the other minimal
    set that the training set lacks; see :func:`unseen_alphabets`.
    """
    if which not in ("small1", "small2"):
        raise DataError(f"minimal splits are 'small1' or 'small2', got {which!r}")
    full = read(data_root, which, image_size, cache_dir, download)
    train, val = split_by_groups(full, val_alphabets, torch.Generator().manual_seed(seed), "alphabet")
    if test == "evaluation":
        test_set = read(data_root, "evaluation", image_size, cache_dir, download)
    elif test == "unseen":
        other = read(data_root, "small2" if which == "small1" else "small1", image_size, cache_dir, download)
        test_set = unseen_alphabets(full, other)
    else:
        raise DataError(f"test must be 'unseen' or 'evaluation', got {test!r}")
    return {"train": _rotate(train, rotations), "val": val, "test": test_set}
