"""Seeded corruptions of a labelled data set: label noise, class imbalance, stratified splits.

Used to build the settings of the sample-reweighting papers on any ``ImageClasses`` store:

* **uniform noise** at rate p (Ren et al. 2018; Shu et al. 2019): each label, independently with
  probability p, is replaced by a class drawn uniformly from *all* classes (so it may stay correct;
  the expected fraction of wrong labels is p (C-1)/C).
* **flip noise** at rate p: each label, with probability p, becomes the next class, (y + 1) mod C
  (the pair-flip of Han et al. 2018 — a structured noise that uniform reweighting cannot average away).
* **long-tailed imbalance** with factor rho (Cui et al. 2019, used by Meta-Weight-Net): class c keeps
  n_c = round(n_max * rho ** (-c / (C - 1))) images, so the largest class has rho times as many as the
  smallest; which images are kept is drawn with the generator.

Every function takes an explicit ``torch.Generator`` and returns new tensors; nothing is changed in place.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"a noise rate must be in [0, 1], got {rate}")


def uniform_noise(labels: Tensor, num_classes: int, rate: float, generator: torch.Generator) -> Tensor:
    """Labels where each one, with probability ``rate``, is redrawn uniformly from all classes."""
    _check_rate(rate)
    hit = torch.rand(labels.shape, generator=generator) < rate
    drawn = torch.randint(num_classes, labels.shape, generator=generator)
    return torch.where(hit, drawn, labels)


def flip_noise(labels: Tensor, num_classes: int, rate: float, generator: torch.Generator) -> Tensor:
    """Labels where each one, with probability ``rate``, becomes (label + 1) mod num_classes."""
    _check_rate(rate)
    hit = torch.rand(labels.shape, generator=generator) < rate
    return torch.where(hit, (labels + 1) % num_classes, labels)


def long_tail_counts(n_max: int, num_classes: int, factor: float) -> list[int]:
    """Images kept per class for imbalance ``factor`` (= largest / smallest), exponential profile."""
    if factor < 1:
        raise ValueError(f"an imbalance factor is largest/smallest class size and must be >= 1, got {factor}")
    if num_classes == 1:
        return [n_max]
    return [max(1, round(n_max * factor ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def long_tail(labels: Tensor, num_classes: int, factor: float, generator: torch.Generator) -> Tensor:
    """Indices of a long-tailed subset: class c keeps ``long_tail_counts(min class size, ...)[c]`` images."""
    counts = torch.bincount(labels, minlength=num_classes)
    keep = long_tail_counts(int(counts.min()), num_classes, factor)
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        chosen.append(idx[torch.randperm(idx.numel(), generator=generator)[: keep[c]]])
    return torch.sort(torch.cat(chosen)).values


def stratified_split(labels: Tensor, parts: Sequence[float | int], generator: torch.Generator) -> list[Tensor]:
    """Split indices into len(parts) disjoint sets with the same class proportions.

    ``parts`` are fractions (summing to at most 1) or, if all are ints, images per class. Within each
    class the order is a seeded permutation; the indices of each part come back sorted.
    """
    by_count = all(isinstance(p, int) for p in parts)
    if not by_count and sum(parts) > 1 + 1e-9:
        raise ValueError(f"split fractions must sum to at most 1, got {list(parts)}")
    out: list[list[Tensor]] = [[] for _ in parts]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n = idx.numel()
        if by_count:
            sizes = [int(p) for p in parts]
        else:  # round the running total, so that fractions summing to 1 use every image exactly once
            ends = [int(round(sum(parts[: i + 1]) * n)) for i in range(len(parts))]
            sizes = [e - b for b, e in zip([0] + ends[:-1], ends)]
        if sum(sizes) > n:
            raise ValueError(f"class {c} has {n} images, fewer than the {sum(sizes)} the split asks for")
        start = 0
        for i, size in enumerate(sizes):
            out[i].append(idx[start:start + size])
            start += size
    return [torch.sort(torch.cat(o)).values for o in out]
