"""CIFAR-FS and FC100: few-shot splits of CIFAR-100's classes, 32x32 RGB, 600 images a class.

Both are read from the CIFAR-100 python archive ``cifar-100-python.tar.gz`` (or its unpacked folder
``cifar-100-python/`` with the ``train``, ``test`` and ``meta`` pickles); the 500 training and 100
test images of each class are pooled, since the few-shot splits are over classes.

- CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers"):
  64 / 16 / 20 fine classes drawn at random across superclasses — :data:`CIFAR_FS`.
- FC100 (Oreshkin et al. 2018, "TADAM"): split by superclass, 12 / 4 / 4 superclasses (60 / 20 / 20
  classes), so test classes are semantically far from training ones — :data:`FC100`.

Classes are the fine labels; each class's group is its superclass.
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from metaphi.tasks.base import DataError, ImageClasses
from metaphi.tasks.download import download as fetch
from metaphi.tasks.download import verify
from metaphi.tasks.imageio import CacheDir, cached, pickle_entry, read_pickle, text

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
SHA256 = "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

# CIFAR-100's 20 superclasses and their fine classes, for reference (the archive's labels are used).
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

# Bertinetto et al.'s class split (the split files of their R2-D2 code).
CIFAR_FS: dict[str, tuple[str, ...]] = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can", "castle",
        "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup", "dinosaur", "dolphin", "elephant",
        "forest", "girl", "hamster", "house", "kangaroo", "keyboard", "lawn_mower", "lion", "lizard", "lobster",
        "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate",
        "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper", "snake",
        "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train", "trout", "tulip", "turtle",
        "willow_tree", "wolf",
    ),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish", "lamp", "maple_tree",
        "motorcycle", "otter", "sea", "shark", "television", "tractor",
    ),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain", "poppy", "rocket",
        "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe", "whale", "woman", "worm",
    ),
}

# Oreshkin et al.'s superclass split.
FC100: dict[str, tuple[str, ...]] = {
    "train": (
        "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
        "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles", "trees",
        "vehicles_1", "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}


def find(data_root: str | os.PathLike, download_missing: bool = False, progress: bool = True) -> Path:
    """``cifar-100-python.tar.gz`` or the unpacked ``cifar-100-python/`` folder in ``data_root`` or its
    ``cifar100/`` / ``cifar/`` folder; downloaded into ``data_root`` when missing and ``download_missing``."""
    root = Path(data_root).expanduser()
    for folder in (root, root / "cifar100", root / "cifar-100", root / "cifar"):
        for candidate in (folder / ARCHIVE, folder / "cifar-100-python"):
            if candidate.exists():  # the archive is checked against its published hash before each use
                return candidate if candidate.is_dir() else verify(candidate, SHA256, MD5)
    if download_missing:
        return fetch(URL, root / ARCHIVE, SHA256, progress, md5=MD5)
    raise DataError(
        f"CIFAR-100 {ARCHIVE} not found in {root} or {root / 'cifar100'}; download it from {URL} into that folder "
        f"(or pass download=True / --download), or point --data-root DIR at the folder that has it"
    )


def _read_parts(source: Path) -> dict[str, object]:
    """The ``train``, ``test`` and ``meta`` pickles of the archive or folder, unpickled."""
    names = ("train", "test", "meta")
    parts: dict[str, object] = {}
    if source.is_dir():
        for n in names:
            parts[n] = read_pickle(source / n, str(source / n))
        return parts
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                head, _, base = member.name.rpartition("/")
                if member.isfile() and base in names and head.endswith("cifar-100-python"):
                    parts[base] = read_pickle(tar.extractfile(member).read(), f"{source}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{source}: not a readable tar archive ({e}); delete it and download it again") from None
    missing = [n for n in names if n not in parts]
    if missing:
        raise DataError(f"{source}: no cifar-100-python/{missing[0]} in the archive; is this the CIFAR-100 python version?")
    return parts


def load(source: str | os.PathLike, cache_dir: CacheDir = None) -> ImageClasses:
    """All 60,000 CIFAR-100 images (train and test pooled) as uint8 [N, 3, 32, 32]; classes are the
    fine labels in label order, groups their superclasses. Cached in ``cache_dir``."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source}: not found; give the path of {ARCHIVE} or its unpacked cifar-100-python folder")

    def build() -> ImageClasses:
        parts = _read_parts(source)
        meta = parts["meta"]
        fine_names = [text(s) for s in pickle_entry(meta, "fine_label_names", f"{source}:meta")]
        coarse_names = [text(s) for s in pickle_entry(meta, "coarse_label_names", f"{source}:meta")]
        images, fine, coarse = [], [], []
        for split in ("train", "test"):
            part, name = parts[split], f"{source}:{split}"
            data = np.asarray(pickle_entry(part, "data", name), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"{name}: data must be uint8 [N, 3072], got {data.shape}")
            images.append(data.reshape(-1, 3, 32, 32))
            fine.append(np.asarray(pickle_entry(part, "fine_labels", name), dtype=np.int64))
            coarse.append(np.asarray(pickle_entry(part, "coarse_labels", name), dtype=np.int64))
        fine_all, coarse_all = np.concatenate(fine), np.concatenate(coarse)
        group_of = np.full(len(fine_names), -1, dtype=np.int64)
        group_of[fine_all] = coarse_all
        if (group_of[fine_all] != coarse_all).any() or (group_of < 0).any():
            raise DataError(f"{source}: fine and coarse labels disagree; is the archive intact?")
        return ImageClasses(torch.from_numpy(np.concatenate(images)), torch.from_numpy(fine_all), fine_names,
                            [coarse_names[g] for g in group_of.tolist()])

    return cached("cifar100", [source], {}, build, cache_dir)


def _take(data: ImageClasses, names: tuple[str, ...], what: str) -> ImageClasses:
    index = {c: i for i, c in enumerate(data.classes)}
    missing = [n for n in names if n not in index]
    if missing:
        raise DataError(f"{what} class '{missing[0]}' is not a CIFAR-100 class; is the archive CIFAR-100?")
    return data.subset([index[n] for n in names])


def cifar_fs_splits(data_root: str | os.PathLike, *, cache_dir: CacheDir = None,
                    download: bool = False) -> dict[str, ImageClasses]:
    """``{"train", "val", "test"}`` stores of CIFAR-FS: 64 / 16 / 20 classes of 600 images, 32x32 RGB."""
    data = load(find(data_root, download), cache_dir)
    return {s: _take(data, names, "CIFAR-FS") for s, names in CIFAR_FS.items()}


def fc100_splits(data_root: str | os.PathLike, *, cache_dir: CacheDir = None,
                 download: bool = False) -> dict[str, ImageClasses]:
    """``{"train", "val", "test"}`` stores of FC100: the classes of 12 / 4 / 4 superclasses (60 / 20 / 20),
    by the superclass labels of the archive."""
    data = load(find(data_root, download), cache_dir)
    splits = {}
    for split, superclasses in FC100.items():
        missing = sorted(set(superclasses) - set(data.groups))
        if missing:
            raise DataError(f"FC100 superclass '{missing[0]}' is not a CIFAR-100 superclass; is the archive CIFAR-100?")
        splits[split] = data.subset([c for c, g in enumerate(data.groups) if g in superclasses])
    return splits
