"""How φ is optimized: estimators of its update from a meta-batch of tasks.

An estimator is a callable ``(algorithm, phi, tasks) -> (grads, metrics)``. ``ESTIMATORS`` maps its
command-line name to ``"module:factory"`` and ``ESTIMATOR_OPTIONS`` to its options dataclass
(``"module:Class"``), whose fields are its ``metaphi run`` flags; ``factory(options)`` builds it.
``build_estimator(name, options)`` checks the options first: a key the estimator does not take is
refused, never ignored. Modules are imported only when used.
"""
from __future__ import annotations

import importlib

from metaphi.config import UsageError, check, from_dict
from metaphi.outer.estimators import Reptile, Unrolled

ESTIMATORS = {
    "second-order": "metaphi.outer.estimators:second_order",
    "first-order": "metaphi.outer.estimators:first_order",
    "reptile": "metaphi.outer.estimators:reptile",
    "implicit": "metaphi.outer.implicit:implicit",
    "es": "metaphi.outer.es:es",
    "reinforce": "metaphi.outer.reinforce:reinforce",
}
ESTIMATOR_OPTIONS = {
    "second-order": "metaphi.outer.estimators:UnrolledOptions",
    "first-order": "metaphi.outer.estimators:UnrolledOptions",
    "reptile": "metaphi.outer.estimators:ReptileOptions",
    "implicit": "metaphi.outer.implicit:ImplicitOptions",
    "es": "metaphi.outer.es:ESOptions",
    "reinforce": "metaphi.outer.reinforce:ReinforceOptions",
}
#: estimators that take ``compile`` (``metaphi run --compile``): the meta-gradient is one compiled graph
COMPILABLE = ("second-order", "first-order")
#: estimators that need only the values of ``task_loss``, so they fit every algorithm that trains
BLACK_BOX = ("es",)


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _known(name: str) -> None:
    if name not in ESTIMATORS:
        raise UsageError(f"unknown estimator '{name}' (valid: {', '.join(ESTIMATORS)})")


def estimator_options_class(name: str) -> type:
    """The options dataclass of estimator ``name``."""
    _known(name)
    return _resolve(ESTIMATOR_OPTIONS[name])


def estimator_options(name: str, options=None):
    """``options`` (None, an instance of ``estimator_options_class(name)`` or a dict of its fields) as
    that class, checked. A key the estimator does not take is a UsageError naming it and the estimator."""
    cls = estimator_options_class(name)
    if options is None:
        options = cls()
    elif isinstance(options, dict):
        options = from_dict(cls, options, where=f"estimator {name}")
    elif type(options) is not cls:
        raise UsageError(f"estimator {name} takes {cls.__name__}, not {type(options).__name__}")
    check(options)
    return options


def build_estimator(name: str, options=None):
    """The estimator called ``name`` with ``options`` (its options dataclass or a dict of its fields;
    defaults where not given). Options that do not apply, or do not go together, are a UsageError."""
    return _resolve(ESTIMATORS[name])(estimator_options(name, options))


__all__ = ["Unrolled", "Reptile", "ESTIMATORS", "ESTIMATOR_OPTIONS", "BLACK_BOX", "COMPILABLE",
           "estimator_options_class", "estimator_options", "build_estimator"]
