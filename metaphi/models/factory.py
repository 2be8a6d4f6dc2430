"""Your own module, rebuilt from its checkpoint: ``module:callable`` with plain-data arguments.

A checkpoint of a built-in backbone rebuilds it by name (its ``spec``). A module of your own is built
by your code; :func:`from_factory` builds it by an importable ``"package.module:callable"`` and keyword
arguments, and remembers both, so the checkpoint records them::

    model = metaphi.models.from_factory("mynets:make_net", width=64, classes=5)

``metaphi eval`` and ``metaphi predict`` then rebuild it when you name the same callable on their
command line (``--model-factory mynets:make_net``). They never import what a checkpoint names on
their own: a file (one downloaded, one edited) could name any callable, and calling it would run its
code. The arguments come from the checkpoint and must be plain data (numbers, strings, booleans, None,
and lists and dicts of them), which is all a checkpoint may hold.
"""
from __future__ import annotations

import contextlib
import importlib
import json
from contextvars import ContextVar
from typing import Any, Iterator

from torch import nn

#: the attribute of a module built by from_factory that holds {"factory": ..., "kwargs": ...}
ATTRIBUTE = "_metaphi_factory"
_allowed: ContextVar[frozenset] = ContextVar("metaphi_allowed_factories", default=frozenset())


def _resolve(factory: str):
    if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
        raise ValueError(f"a model factory is named 'package.module:callable', got {factory!r}")
    module_name, attribute = factory.split(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model factory {factory}: cannot import {module_name} ({e})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model factory {factory}: {module_name} has no {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model factory {factory} is not callable")
    return target


def _plain(kwargs: dict, factory: str) -> dict:
    try:
        text = json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(f"model factory {factory}: its arguments must be plain data (numbers, strings, booleans, "
                         "None, lists and dicts of them) for a checkpoint to hold them") from None
    return json.loads(text)


def build(factory: str, kwargs: dict) -> nn.Module:
    module = _resolve(factory)(**kwargs)
    if not isinstance(module, nn.Module):
        raise ValueError(f"model factory {factory} returned {type(module).__name__}, not a torch.nn.Module")
    setattr(module, ATTRIBUTE, {"factory": factory, "kwargs": kwargs})
    return module


def from_factory(factory: str, **kwargs) -> nn.Module:
    """``callable(**kwargs)`` of ``factory`` ("package.module:callable"), remembering how it was built
    so that eval and predict can rebuild it (``--model-factory``). A ValueError for a name that does not
    import, arguments that are not plain data, or a result that is not an ``nn.Module``."""
    return build(factory, _plain(kwargs, factory))


def recorded(model: nn.Module) -> dict | None:
    """``{"factory": ..., "kwargs": ...}`` of a module built by :func:`from_factory`, else None."""
    return getattr(model, ATTRIBUTE, None)


@contextlib.contextmanager
def allowed(*factories: str | None) -> Iterator[None]:
    """Within: checkpoints whose model is built by one of ``factories`` are rebuilt (their callable
    imported and called); others are refused by :func:`rebuild`."""
    token = _allowed.set(_allowed.get() | {f for f in factories if f})
    try:
        yield
    finally:
        _allowed.reset(token)


def rebuild(spec: dict) -> nn.Module:
    """The module a checkpoint's model spec ``{"factory", "kwargs", "class"}`` describes, where its
    factory is :func:`allowed`; a ValueError saying what to pass otherwise."""
    factory = spec["factory"]
    if factory not in _allowed.get():
        raise ValueError(f"its model is your own {spec.get('class', 'module')}, built by {factory}; pass "
                         f"--model-factory {factory} to rebuild it (metaphi imports nothing a checkpoint names "
                         "unless you name it too)")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"model factory {factory}: its arguments in the checkpoint are not a mapping")
    module = build(factory, kwargs)
    made = f"{type(module).__module__}.{type(module).__qualname__}"
    if spec.get("class") and made != spec["class"]:
        raise ValueError(f"model factory {factory} now builds {made}, but the checkpoint's model was {spec['class']}")
    return module
