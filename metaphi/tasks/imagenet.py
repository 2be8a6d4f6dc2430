"""mini-ImageNet and tiered-ImageNet, read from the files people have on disk.

mini-ImageNet (Vinyals et al. 2016, with the class split of Ravi & Larochelle 2017: 64 train / 16 val
/ 20 test classes, 600 images each) comes in two formats, both read by :func:`mini_imagenet_splits`:

- the pickled cache ``mini-imagenet-cache-{train,val,test}.pkl``: a dict with ``image_data``
  (uint8 [N, 84, 84, 3]) and ``class_dict`` (class name -> list of image indices);
- Ravi's split files ``{train,val,test}.csv`` (header ``filename,label``) with an ``images/`` folder;
  the images are resized to 84x84 with Lanczos, as Ravi's script does, and the decoded store cached.

tiered-ImageNet (Ren et al. 2018: 351 / 97 / 160 classes from 20 / 6 / 8 ImageNet categories) comes as
``{split}_images_png.pkl`` (a list of PNG-encoded images) and ``{split}_labels.pkl`` (a dict with
``label_specific``, ``label_general``, ``label_specific_str``, ``label_general_str``); the general
category is each class's group. Read by :func:`tiered_imagenet_splits`, decoded once and cached.

All stores hold RGB uint8 [N, 3, 84, 84]. Pickles run code when loaded: read only files you trust.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from metaphi.tasks.base import DataError, ImageClasses
from metaphi.tasks.imageio import CacheDir, Size, as_size, cached, decode_many, pickle_entry, read_pickle, text

SPLITS = ("train", "val", "test")
MINI_FOLDERS = ("", "mini-imagenet", "miniImageNet", "mini_imagenet", "miniimagenet")
TIERED_FOLDERS = ("", "tiered-imagenet", "tieredImageNet", "tiered_imagenet", "tieredimagenet")


def _resize_rgb(images: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [N, 3, h, w], resized with Lanczos only when the size differs."""
    if images.shape[1:3] == hw:
        return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    from PIL import Image

    out = np.empty((len(images), 3, *hw), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.LANCZOS)).transpose(2, 0, 1)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------- mini-ImageNet
def load_mini_imagenet_pickle(path: str | os.PathLike, image_size: Size = 84) -> ImageClasses:
    """One split from ``mini-imagenet-cache-<split>.pkl``: classes sorted by name (synset ids)."""
    path = Path(path).expanduser()
    hw = as_size(image_size)
    state = read_pickle(path)
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a dict with 'image_data' and 'class_dict', got {type(state).__name__}")
    images = np.asarray(pickle_entry(state, "image_data", path))
    class_dict = pickle_entry(state, "class_dict", path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: image_data must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    classes = sorted(text(c) for c in class_dict)
    by_name = {text(c): v for c, v in class_dict.items()}
    targets = np.full(len(images), -1, dtype=np.int64)
    for t, name in enumerate(classes):
        idx = np.asarray(by_name[name], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
            raise DataError(f"{path}: class '{name}' lists image indices outside 0..{len(images) - 1}")
        if (targets[idx] >= 0).any():
            raise DataError(f"{path}: class '{name}' shares images with another class")
        targets[idx] = t
    if (targets < 0).any():
        raise DataError(f"{path}: {int((targets < 0).sum())} images belong to no class of class_dict")
    return ImageClasses(_resize_rgb(images, hw), torch.from_numpy(targets), classes)


def load_mini_imagenet_csv(root: str | os.PathLike, split: str, image_size: Size = 84,
                           cache_dir: CacheDir = None) -> ImageClasses:
    """One split from Ravi's ``<root>/<split>.csv`` (``filename,label``) and ``<root>/images/``;
    classes sorted by label. Decoded once and cached, keyed by the CSV and the images folder."""
    root = Path(root).expanduser()
    table, folder = root / f"{split}.csv", root / "images"
    if not table.exists():
        raise DataError(f"{table}: not found; mini-ImageNet's split files are train.csv, val.csv and test.csv")
    if not folder.is_dir():
        raise DataError(f"{folder}: not found; the images named in {table.name} go in an images/ folder beside it")
    hw = as_size(image_size)

    def build() -> ImageClasses:
        with open(table, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
            raise DataError(f"{table}: expected the header 'filename,label'")
        short = next((n for n, r in enumerate(rows[1:], 2) if r and len(r) < 2), None)
        if short is not None:
            raise DataError(f"{table}:{short}: expected 'filename,label', got {','.join(rows[short - 1])!r}")
        pairs = [(r[0].strip(), r[1].strip()) for r in rows[1:] if r]
        if not pairs:
            raise DataError(f"{table}: lists no images")
        classes = sorted({label for _, label in pairs})
        index = {c: i for i, c in enumerate(classes)}
        files = [folder / name for name, _ in pairs]
        missing = next((p for p in files if not p.exists()), None)
        if missing is not None:
            raise DataError(f"{missing}: listed in {table} but not found; put the mini-ImageNet images in {folder}")
        images = decode_many(files, [str(p) for p in files], "RGB", hw)
        return ImageClasses(images, torch.tensor([index[label] for _, label in pairs]), classes)

    return cached(f"mini-imagenet-{split}-{hw[0]}x{hw[1]}", [table, folder], {"image_size": list(hw)}, build, cache_dir)


def _find(data_root: Path, folders: tuple[str, ...], probe: str) -> Path | None:
    for sub in folders:
        if (data_root / sub / probe).exists():
            return data_root / sub
    return None


def mini_imagenet_splits(data_root: str | os.PathLike, *, image_size: Size = 84,
                         cache_dir: CacheDir = None) -> dict[str, ImageClasses]:
    """``{"train", "val", "test"}`` stores of mini-ImageNet from ``data_root`` or one of its folders
    ``mini-imagenet``, ``miniImageNet``, ``mini_imagenet``: the pickled cache if present, else the
    CSV split files with ``images/``."""
    data_root = Path(data_root).expanduser()
    found = _find(data_root, MINI_FOLDERS, "mini-imagenet-cache-train.pkl")
    if found is not None:
        return {s: load_mini_imagenet_pickle(found / f"mini-imagenet-cache-{s}.pkl", image_size) for s in SPLITS}
    found = _find(data_root, MINI_FOLDERS, "train.csv")
    if found is not None:
        return {s: load_mini_imagenet_csv(found, s, image_size, cache_dir) for s in SPLITS}
    raise DataError(
        f"mini-ImageNet not found in {data_root} or its mini-imagenet/ folder: put there either "
        "mini-imagenet-cache-{train,val,test}.pkl or Ravi's train.csv, val.csv, test.csv with an images/ folder, "
        "or point --data-root DIR at the folder that has them"
    )


# ----------------------------------------------------------------------------------- tiered-ImageNet
def load_tiered_imagenet(root: str | os.PathLike, split: str, image_size: Size = 84,
                         cache_dir: CacheDir = None) -> ImageClasses:
    """One split from ``<root>/<split>_images_png.pkl`` and ``<root>/<split>_labels.pkl``: classes are
    ``label_specific_str`` in label order, grouped by their ``label_general_str`` category."""
    root = Path(root).expanduser()
    images_file, labels_file = root / f"{split}_images_png.pkl", root / f"{split}_labels.pkl"
    for p in (images_file, labels_file):
        if not p.exists():
            raise DataError(f"{p}: not found; tiered-ImageNet needs {split}_images_png.pkl and {split}_labels.pkl")
    hw = as_size(image_size)

    def build() -> ImageClasses:
        labels = read_pickle(labels_file)
        if not isinstance(labels, dict):
            raise DataError(f"{labels_file}: expected a dict of labels, got {type(labels).__name__}")
        specific = np.asarray(pickle_entry(labels, "label_specific", labels_file), dtype=np.int64).reshape(-1)
        general = np.asarray(pickle_entry(labels, "label_general", labels_file), dtype=np.int64).reshape(-1)
        classes = [text(s) for s in pickle_entry(labels, "label_specific_str", labels_file)]
        categories = [text(s) for s in pickle_entry(labels, "label_general_str", labels_file)]
        encoded = read_pickle(images_file)
        if len(encoded) != len(specific) or len(general) != len(specific):
            raise DataError(f"{images_file}: {len(encoded)} images but {len(specific)} labels in {labels_file.name}")
        if specific.size and (specific.min() < 0 or specific.max() >= len(classes)):
            raise DataError(f"{labels_file}: label_specific outside 0..{len(classes) - 1}")
        if general.size and (general.min() < 0 or general.max() >= len(categories)):
            raise DataError(f"{labels_file}: label_general outside 0..{len(categories) - 1}")
        group_of = np.full(len(classes), -1, dtype=np.int64)
        group_of[specific] = general
        if (group_of[specific] != general).any():
            raise DataError(f"{labels_file}: a class appears under two general categories")
        if (group_of < 0).any():
            c = int(np.flatnonzero(group_of < 0)[0])
            raise DataError(f"{labels_file}: class '{classes[c]}' has no images")
        names = [f"{images_file}[{i}]" for i in range(len(encoded))]
        images = decode_many(encoded, names, "RGB", hw)  # bytes, or uint8 arrays of them as cv2.imencode makes
        groups = [categories[g] for g in group_of.tolist()]
        return ImageClasses(images, torch.from_numpy(specific), classes, groups)

    return cached(f"tiered-imagenet-{split}-{hw[0]}x{hw[1]}", [images_file, labels_file], {"image_size": list(hw)},
                  build, cache_dir)


def tiered_imagenet_splits(data_root: str | os.PathLike, *, image_size: Size = 84,
                           cache_dir: CacheDir = None) -> dict[str, ImageClasses]:
    """``{"train", "val", "test"}`` stores of tiered-ImageNet from ``data_root`` or one of its folders
    ``tiered-imagenet``, ``tieredImageNet``, ``tiered_imagenet``."""
    data_root = Path(data_root).expanduser()
    found = _find(data_root, TIERED_FOLDERS, "train_images_png.pkl")
    if found is None:
        raise DataError(
            f"tiered-ImageNet not found in {data_root} or its tiered-imagenet/ folder: put "
            "{train,val,test}_images_png.pkl and {train,val,test}_labels.pkl there, or point --data-root DIR at them"
        )
    return {s: load_tiered_imagenet(found, s, image_size, cache_dir) for s in SPLITS}
