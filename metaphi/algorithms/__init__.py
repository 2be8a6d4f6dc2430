"""Algorithms: what φ is and how one task is learned with it. One family per file.

``ALGORITHMS`` maps a name to ``"module:factory"``; a factory takes
``(benchmark, ways, inner_lr, inner_steps, eval_steps)`` and returns an Algorithm. ``SPEC_CLASSES``
maps the ``"class"`` of a saved ``spec()`` to ``"module:function"`` that rebuilds it. Modules are
imported only when their algorithm is used.
"""
from __future__ import annotations

import importlib

from metaphi.algorithms.base import CLASSIFICATION, REGRESSION, Algorithm, Problem, problem_named

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
SPEC_CLASSES = {
    "maml": "metaphi.algorithms.maml:maml_from_spec",
    "pretrain": "metaphi.algorithms.baselines:pretrain_from_spec",
    "pixel-nn": "metaphi.algorithms.nearest:pixel_nn_from_spec",
    "imaml": "metaphi.algorithms.imaml:imaml_from_spec",
    "protonet": "metaphi.algorithms.protonet:protonet_from_spec",
    "matching": "metaphi.algorithms.matching:matching_from_spec",
    "relation": "metaphi.algorithms.relation:relation_from_spec",
    "ssl": "metaphi.algorithms.ssl:ssl_from_spec",
    "mldg": "metaphi.algorithms.mldg:mldg_from_spec",
}
BASELINES = ("scratch", "pretrain")


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def create_algorithm(name: str, benchmark, ways: int, inner_lr: float, inner_steps: int, eval_steps: int
                     ) -> Algorithm:
    """A fresh algorithm called ``name`` for ``benchmark``, sized for ``ways`` classes."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm '{name}' (valid: {', '.join(ALGORITHMS)})")
    return _resolve(ALGORITHMS[name])(benchmark, ways, inner_lr, inner_steps, eval_steps)


def build_algorithm(spec: dict) -> Algorithm:
    """Rebuild an algorithm from the ``spec()`` a checkpoint stores."""
    if spec["class"] not in SPEC_CLASSES:
        raise ValueError(f"unknown algorithm class '{spec['class']}'")
    return _resolve(SPEC_CLASSES[spec["class"]])(spec)


__all__ = ["Algorithm", "Problem", "CLASSIFICATION", "REGRESSION", "problem_named", "ALGORITHMS", "SPEC_CLASSES",
           "BASELINES", "create_algorithm", "build_algorithm"]
