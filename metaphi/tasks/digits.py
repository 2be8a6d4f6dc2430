"""digits: the UCI handwritten digits, shipped inside the package (no download).

1797 images of 8x8 pixels, 10 classes (the digits 0-9), about 180 per class: the test set of
"Optical Recognition of Handwritten Digits" (Alpaydin & Kaynak 1998), as distributed with
scikit-learn. Each pixel counts the ink in a 4x4 block of a 32x32 bitmap (0..16); here it is scaled
to 0..255 so that the images are an ``ImageClasses`` store like every other data set (ink high).
Licence and source: metaphi/data/DIGITS-LICENSE.txt.

It is the small real data set for problems where the "task" is one data set split into training and
validation parts (architecture search, augmentation, sample reweighting): a network trains on it in
seconds on a CPU.
"""
from __future__ import annotations

import gzip
from importlib import resources

import torch

from metaphi.tasks.base import DataError, ImageClasses

ROWS = 1797


def load_digits() -> ImageClasses:
    """All 1797 images as uint8 [1797, 1, 8, 8] with targets 0..9, in the file's order."""
    try:
        raw = resources.files("metaphi.data").joinpath("digits.csv.gz").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise DataError("metaphi/data/digits.csv.gz is missing from the installed package; reinstall metaphi") from e
    rows = [line.split(",") for line in gzip.decompress(raw).decode("ascii").split()]
    if len(rows) != ROWS or any(len(r) != 65 for r in rows):
        raise DataError(f"metaphi/data/digits.csv.gz is damaged: expected {ROWS} rows of 65 numbers")
    values = torch.tensor([[int(v) for v in r] for r in rows], dtype=torch.int64)
    pixels, targets = values[:, :64], values[:, 64]
    images = torch.round(pixels.float() * (255.0 / 16.0)).to(torch.uint8).reshape(ROWS, 1, 8, 8)
    return ImageClasses(images, targets, classes=[str(d) for d in range(10)])
