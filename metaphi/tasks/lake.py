"""One-shot problems in the format of the Omniglot challenge (Lake et al. 2015, Science).

Lake et al. test 20-way within-alphabet one-shot classification: a problem ("run") takes 20
characters of one alphabet; one person drew the support set, one drawing of each character, and
another person drew the 20 query drawings, one of each character (here in a random order), which
are to be labelled among the 20. :func:`lake_problems` builds such problems from any store of characters grouped by alphabet
whose drawings carry the id of their drawer (:class:`DrawnCharacters`; :func:`read` makes one from
an Omniglot archive, where ``0709_05.png`` is character 709 by drawer 05). An alphabet with fewer
than 20 characters gives problems over all of its characters (Tagalog's 17: 17-way).

The minimal background sets ``small1`` and ``small2`` share two alphabets (Greek, Latin);
:func:`unseen_alphabets` names the three of small2 that small1 lacks, Japanese_(katakana) (47
characters), Sanskrit (42) and Tagalog (17): the test alphabets of a model trained on small1 alone.

Every random choice (the characters of a problem, its two drawers, a drawing where a drawer made
several) comes from the ``torch.Generator`` passed in, so a seeded generator gives the same problems
on every machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from metaphi.tasks.base import DataError, ImageClasses, Task
from metaphi.tasks.imageio import CacheDir, Size

#: classes per problem in Lake et al.'s runs
WAYS = 20


class DrawnCharacters(NamedTuple):
    """A store of characters grouped by alphabet, and the drawer (int64 [N]) of each of its images."""

    store: ImageClasses
    drawers: Tensor


@dataclass
class LakeProblem:
    """One problem: ``task`` is a metaphi Task, support ``(x [n, C, H, W] float in [0, 1], y [n])``
    with one drawing of each of the n classes by ``support_drawer``, query the same by
    ``query_drawer``; class ``i`` is ``classes[i]``. ``support_indices`` / ``query_indices`` index the
    images in the store the problem was drawn from (e.g. to write the drawings out as files)."""

    alphabet: str
    classes: list[str]
    support_drawer: int
    query_drawer: int
    support_indices: Tensor
    query_indices: Tensor
    task: Task

    @property
    def ways(self) -> int:
        return len(self.classes)


def read(data_root: str | os.PathLike, which: str, image_size: Size = 28, cache_dir: CacheDir = None,
         download: bool = False) -> DrawnCharacters:
    """An Omniglot set (``"small1"``, ``"small2"``, ``"background"``, ``"evaluation"``) with the drawer
    of each image, read from its file names."""
    from metaphi.tasks import omniglot

    source = omniglot.find(data_root, which, download)
    return from_source(source, image_size, cache_dir)


def from_source(source: str | os.PathLike, image_size: Size = 28, cache_dir: CacheDir = None) -> DrawnCharacters:
    """:func:`metaphi.tasks.omniglot.load` of an archive or folder, with the drawer of each image."""
    from metaphi.tasks import omniglot

    store = omniglot.load(source, image_size, cache_dir)
    drawer_ids = omniglot.drawers(source)
    if drawer_ids.shape[0] != store.images.shape[0]:  # a stale cache of an archive changed in place
        raise DataError(f"{source}: {store.images.shape[0]} images decoded but {drawer_ids.shape[0]} named; "
                        "clear the metaphi cache and read it again")
    return DrawnCharacters(store, drawer_ids)


def unseen_alphabets(seen: Sequence[str], data: Sequence[str]) -> list[str]:
    """The alphabets of ``data`` that ``seen`` lacks, sorted: for Omniglot's small2 against small1,
    the three ``["Japanese_(katakana)", "Sanskrit", "Tagalog"]``. Takes alphabet names (store groups or
    :func:`metaphi.tasks.omniglot.alphabets` of an archive, which decodes nothing)."""
    known = set(seen)
    unseen = sorted(set(data) - known)
    if not unseen:
        raise DataError("every alphabet of the test set is also in the training set; nothing unseen to test on")
    return unseen


def _pick(values: Tensor, generator: torch.Generator) -> Tensor:
    return values[torch.randint(len(values), (1,), generator=generator)]


def lake_problems(data: DrawnCharacters, alphabets: Sequence[str] | None, per_alphabet: int,
                  generator: torch.Generator, ways: int = WAYS) -> list[LakeProblem]:
    """``per_alphabet`` one-shot problems for each alphabet in ``alphabets`` (None: every alphabet of
    the store), alphabet by alphabet in the order given.

    A problem takes ``ways`` characters of the alphabet drawn without replacement (all of them when
    the alphabet has fewer; classes in the store's order), two different drawers drawn among those who
    drew every one of those characters, and one drawing of each character by each: the first drawer's
    make the support (labels 0..n-1 in order), the second's the query (the same n labels, shuffled).
    A DataError when an alphabet is unknown, has fewer than two characters, or its characters lack
    two common drawers.
    """
    store, drawer_ids = data
    if store.groups is None:
        raise DataError("Lake-format problems need characters grouped by alphabet (as omniglot.load makes them)")
    if drawer_ids.shape != (store.images.shape[0],):
        raise DataError(f"one drawer per image is needed: {store.images.shape[0]} images, "
                        f"{tuple(drawer_ids.shape)} drawers")
    if per_alphabet < 1:
        raise DataError(f"per_alphabet must be at least 1, got {per_alphabet}")
    if ways < 2:
        raise DataError(f"a problem needs at least 2 classes, got ways={ways}")
    names = list(dict.fromkeys(store.groups)) if alphabets is None else list(alphabets)
    missing = [a for a in names if a not in store.groups]
    if missing:
        raise DataError(f"alphabet {missing[0]!r} is not in the data (it has {', '.join(sorted(set(store.groups)))})")
    problems = []
    for alphabet in names:
        characters = [c for c, g in enumerate(store.groups) if g == alphabet]
        if len(characters) < 2:
            raise DataError(f"alphabet {alphabet!r} has {len(characters)} character; a problem needs at least 2")
        # the drawers of each character, and who drew which image
        drawn = {c: drawer_ids[store.indices_of(c)] for c in characters}
        for _ in range(per_alphabet):
            if len(characters) > ways:
                chosen = torch.randperm(len(characters), generator=generator)[:ways].sort().values
                chosen = [characters[int(i)] for i in chosen]
            else:
                chosen = list(characters)
            common = set(drawn[chosen[0]].tolist())
            for c in chosen[1:]:
                common &= set(drawn[c].tolist())
            if len(common) < 2:
                raise DataError(f"alphabet {alphabet!r}: its characters {', '.join(store.classes[c] for c in chosen)} "
                                f"have {len(common)} drawer(s) in common; a problem needs two (support and query "
                                "drawn by different people)")
            pool = torch.tensor(sorted(common))
            order = torch.randperm(len(pool), generator=generator)[:2]
            support_drawer, query_drawer = int(pool[order[0]]), int(pool[order[1]])
            support_idx, query_idx = [], []
            for c in chosen:
                images = store.indices_of(c)
                support_idx.append(_pick(images[drawn[c] == support_drawer], generator))
                query_idx.append(_pick(images[drawn[c] == query_drawer], generator))
            # the queries in a random order, so that no learner can score by position
            shuffle = torch.randperm(len(chosen), generator=generator)
            support_idx, query_idx = torch.cat(support_idx), torch.cat(query_idx)[shuffle]
            labels = torch.arange(len(chosen))
            task = Task((store.images[support_idx].float().div_(255.0), labels),
                        (store.images[query_idx].float().div_(255.0), shuffle))
            problems.append(LakeProblem(alphabet, [store.classes[c] for c in chosen], support_drawer, query_drawer,
                                        support_idx, query_idx, task))
    return problems
