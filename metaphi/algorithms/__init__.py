"""Algorithms: what φ is and how one task is learned with it. One family per file.

``ALGORITHMS`` maps a name to ``"module:factory"``; a factory takes
``(benchmark, ways, inner_lr, inner_steps, eval_steps, options)`` and returns an Algorithm.
``OPTIONS`` maps a name to its family's options dataclass (``"module:Class"``; fields declared with
``metaphi.config.option``, so they are flags, YAML keys and checks at once); a name not listed has
none (``NoOptions``). ``SPEC_CLASSES`` maps the ``"class"`` of a saved ``spec()`` to the Algorithm
class whose generic ``from_spec`` rebuilds it (or to a ``"module:function"`` that does).
``FAMILY_DEFAULTS`` names the functions that give the run settings a family takes where the user
gave none. Modules are imported only when their algorithm is used.
"""
from __future__ import annotations

import dataclasses
import importlib

from metaphi.algorithms.base import CLASSIFICATION, REGRESSION, Algorithm, NoOptions, Problem, problem_named
from metaphi.config import UsageError, check, from_dict

ALGORITHMS = {
    "maml": "metaphi.algorithms.maml:maml",
    "fomaml": "metaphi.algorithms.maml:fomaml",
    "reptile": "metaphi.algorithms.reptile:reptile",
    "anil": "metaphi.algorithms.maml:anil",
    "metasgd": "metaphi.algorithms.maml:metasgd",
    "scratch": "metaphi.algorithms.baselines:scratch",
    "pretrain": "metaphi.algorithms.baselines:pretrain",
    "pixel-nn": "metaphi.algorithms.nearest:pixel_nn",
    "imaml": "metaphi.algorithms.imaml:imaml",
    "protonet": "metaphi.algorithms.protonet:protonet",
    "protonet-cosine": "metaphi.algorithms.protonet:protonet_cosine",
    "matching": "metaphi.algorithms.matching:matching",
    "matching-fce": "metaphi.algorithms.matching:matching_fce",
    "relation": "metaphi.algorithms.relation:relation",
    "ssl-rotation": "metaphi.algorithms.ssl:ssl_rotation",
    "ssl-simclr": "metaphi.algorithms.ssl:ssl_simclr",
}
_MAML_OPTIONS = "metaphi.algorithms.maml:MAMLOptions"
OPTIONS = {
    "maml": _MAML_OPTIONS,
    "fomaml": _MAML_OPTIONS,
    "reptile": _MAML_OPTIONS,
    "anil": _MAML_OPTIONS,
    "metasgd": _MAML_OPTIONS,
    "scratch": _MAML_OPTIONS,
    "pretrain": "metaphi.algorithms.baselines:PretrainOptions",
    "imaml": "metaphi.algorithms.imaml:IMAMLOptions",
    "protonet": "metaphi.algorithms.protonet:ProtoNetOptions",
    "protonet-cosine": "metaphi.algorithms.protonet:ProtoNetCosineOptions",
    "matching": "metaphi.algorithms.matching:MatchingOptions",
    "matching-fce": "metaphi.algorithms.matching:MatchingFCEOptions",
    "relation": "metaphi.algorithms.relation:RelationOptions",
    "ssl-rotation": "metaphi.algorithms.ssl:RotationOptions",
    "ssl-simclr": "metaphi.algorithms.ssl:SimCLROptions",
}
SPEC_CLASSES = {
    "maml": "metaphi.algorithms.maml:MAML",
    "pretrain": "metaphi.algorithms.baselines:Pretrain",
    "pixel-nn": "metaphi.algorithms.nearest:PixelNN",
    "imaml": "metaphi.algorithms.imaml:IMAML",
    "protonet": "metaphi.algorithms.protonet:ProtoNet",
    "matching": "metaphi.algorithms.matching:MatchingNet",
    "relation": "metaphi.algorithms.relation:RelationNet",
    "ssl": "metaphi.algorithms.ssl:SSL",
    "mldg": "metaphi.algorithms.mldg:mldg_from_spec",
}
FAMILY_DEFAULTS = {
    "reptile": "metaphi.algorithms.reptile:defaults",
    "protonet": "metaphi.algorithms.protonet:defaults",
    "protonet-cosine": "metaphi.algorithms.protonet:defaults",
    "ssl-rotation": "metaphi.algorithms.ssl:defaults",
    "ssl-simclr": "metaphi.algorithms.ssl:defaults",
}
BASELINES = ("scratch", "pretrain")


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _known(name: str) -> None:
    if name not in ALGORITHMS:
        raise UsageError(f"unknown algorithm '{name}' (valid: {', '.join(ALGORITHMS)})")


def options_class(name: str) -> type:
    """The options dataclass of algorithm ``name`` (an empty one for a family without options)."""
    _known(name)
    return _resolve(OPTIONS[name]) if name in OPTIONS else NoOptions


def algorithm_options(name: str, options=None):
    """``options`` (None, an instance of ``options_class(name)`` or a dict of its fields) as that
    class, checked; an unknown key or a value that fails its check is a UsageError naming it."""
    cls = options_class(name)
    if options is None:
        options = cls()
    elif isinstance(options, dict):
        options = from_dict(cls, options, where=f"algorithm {name}")
    elif not isinstance(options, cls):
        raise UsageError(f"algorithm {name} takes {cls.__name__} options, not {type(options).__name__}")
    check(options)
    return options


def family_defaults(name: str, settings: dict | None = None) -> dict:
    """The run settings algorithm ``name`` takes where the user gave none (its recipe), given the
    benchmark's default ``settings`` and what the benchmark is (``images``, ``characters``, ``folder``,
    ``train_classes``): e.g. Reptile at least 5 inner steps, ProtoNet 60-way training episodes on
    characters; empty for most families."""
    _known(name)
    if name not in FAMILY_DEFAULTS:
        return {}
    return _resolve(FAMILY_DEFAULTS[name])(dict(settings or {}))


def create_algorithm(name: str, benchmark, ways: int, inner_lr: float, inner_steps: int, eval_steps: int,
                     options=None) -> Algorithm:
    """A fresh algorithm called ``name`` for ``benchmark``, sized for ``ways`` classes. ``options``:
    an instance of ``options_class(name)`` or a dict of its fields (unknown keys: UsageError)."""
    options = algorithm_options(name, options)
    return _resolve(ALGORITHMS[name])(benchmark, ways, inner_lr, inner_steps, eval_steps, options)


def build_algorithm(spec: dict) -> Algorithm:
    """Rebuild an algorithm from the ``spec()`` a checkpoint stores."""
    if spec.get("class") not in SPEC_CLASSES:
        raise ValueError(f"unknown algorithm class '{spec.get('class')}'")
    target = _resolve(SPEC_CLASSES[spec["class"]])
    if not isinstance(target, type):
        return target(spec)
    # an algorithm made by create_algorithm keeps the options class of its table name (protonet-cosine's)
    named = _resolve(OPTIONS[spec["name"]]) if spec.get("name") in OPTIONS else None
    if named is not None and {f.name for f in dataclasses.fields(named)} != set(spec["options"]):
        named = None
    return target.from_spec(spec, named)


__all__ = ["Algorithm", "Problem", "NoOptions", "CLASSIFICATION", "REGRESSION", "problem_named", "ALGORITHMS",
           "OPTIONS", "SPEC_CLASSES", "BASELINES", "options_class", "algorithm_options", "family_defaults",
           "create_algorithm", "build_algorithm"]
