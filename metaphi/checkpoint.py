"""Checkpoint files: the one writer and the one reader every loop and study uses.

A checkpoint is plain data: dicts, lists, strings, numbers, booleans, None and tensors (parameters,
optimizer states, generator states). It is written atomically (a temporary file in the same folder,
then a rename: a reader never sees half a file, a kill never leaves a corrupt one) and read with
``torch.load(weights_only=True)``, which builds tensors and containers and never runs code from the
file. Configs are stored as dicts (:func:`metaphi.config.to_dict`), never as pickled objects.
"""
from __future__ import annotations

import os
import re
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
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # torch's weights-only reader met a callable it does not rebuild: the file asks to run code
            raise CheckpointError(f"{os.fspath(path)} asks to call {found.group(1)}, not plain data (a pickle that "
                                  "would run code); refused, nothing in it ran") from None
        raise CheckpointError(f"{os.fspath(path)} is not a readable metaphi checkpoint ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours parts of its messages
    reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # past torch's advice to load unsafely
    if reason:
        return reason.group(1)[:200]
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def module_state(source: str | os.PathLike | dict, prefix: str | None = None) -> dict:
    """The weights of a run checkpoint (a path, or the loaded dict) as the state dict of the module it
    trained: ``your_module.load_state_dict(module_state(PATH), strict=False)`` (strict=False: batch-norm
    buffers are not meta-learned, so they are not in it). ``prefix``: the part of φ that holds the
    network (``init`` for the MAML family, ``embed`` for metric learners; found when not given)."""
    ck = load(source) if not isinstance(source, dict) else source
    phi = ck.get("phi") if isinstance(ck, dict) else None
    if not isinstance(phi, dict):
        raise CheckpointError(f"{source if not isinstance(source, dict) else 'the checkpoint'} holds no weights (phi)")
    prefixes = [prefix] if prefix else [p for p in ("init", "embed", "body", "model") if any(
        k.startswith(p + ".") for k in phi)]
    if not prefixes:
        raise CheckpointError(f"no network weights found among {', '.join(list(phi)[:5])}; pass prefix=")
    return {k[len(prefixes[0]) + 1:]: v for k, v in phi.items() if k.startswith(prefixes[0] + ".")}
