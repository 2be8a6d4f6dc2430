"""How φ is optimized: estimators of its update from a meta-batch of tasks.

An estimator is a callable ``(algorithm, phi, tasks) -> (grads, metrics)``; ``ESTIMATORS`` maps
its command-line name to ``"module:factory"``, where ``factory(**options)`` builds it. Modules are
imported only when used.
"""
from __future__ import annotations

import importlib

from metaphi.outer.estimators import Reptile, Unrolled

ESTIMATORS = {
    "second-order": "metaphi.outer.estimators:second_order",
    "first-order": "metaphi.outer.estimators:first_order",
    "reptile": "metaphi.outer.estimators:reptile",
    "implicit": "metaphi.outer.implicit:implicit",
    "es": "metaphi.outer.es:es",
    "reinforce": "metaphi.outer.reinforce:reinforce",
}
#: estimators that take ``compile=True`` (``metaphi run --compile``): the meta-gradient is one compiled graph
COMPILABLE = ("second-order", "first-order")
#: estimators that need only the values of ``task_loss``, so they fit every algorithm that trains
BLACK_BOX = ("es",)


def build_estimator(name: str, **options):
    """The estimator called ``name``; ``options`` (e.g. ``vectorize``) go to its factory."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator '{name}' (valid: {', '.join(ESTIMATORS)})")
    module, factory = ESTIMATORS[name].split(":")
    return getattr(importlib.import_module(module), factory)(**options)


__all__ = ["Unrolled", "Reptile", "ESTIMATORS", "BLACK_BOX", "COMPILABLE", "build_estimator"]
