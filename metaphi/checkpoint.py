"""Checkpoint files: the one writer and the one reader every loop and study uses.

A checkpoint is plain data: dicts, lists, strings, numbers, booleans, None and tensors (parameters,
optimizer states, generator states). It is written atomically (a temporary file in the same folder,
then a rename: a reader never sees half a file, a kill never leaves a corrupt one) and read with
``torch.load(weights_only=True)``, which builds tensors and containers and never runs code from the
file. Configs are stored as dicts (:func:`metaphi.config.to_dict`), never as pickled objects.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from metaphi.tasks.base import atomic_save


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint (truncated, foreign, or holding more than plain data)."""


def save(obj: Any, path: str | os.PathLike) -> None:
    """``obj`` (plain data and tensors) to ``path``, atomically."""
    atomic_save(obj, path)


def load(path: str | os.PathLike) -> Any:
    """The plain data saved at ``path``; a CheckpointError for anything else. No code in the file runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, random bytes, or a pickle that asks for more than plain data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{os.fspath(path)} is not a readable metaphi checkpoint ({first[:200]})") from None
