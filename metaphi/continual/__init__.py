"""Continual (lifelong) learning: learn experiences one after another without forgetting the old ones.

A stream (:mod:`metaphi.tasks.streams`) is a sequence of experiences, each a training set shown
once and a test set; after each experience the learner is tested on all of them, which fills the
accuracy matrix R[i, j] of :mod:`.metrics` (average accuracy, backward transfer, forgetting,
accuracy over time).

A method is an object with pure-ish functions over an explicit state dict (params as
``dict[str, Tensor]`` plus whatever the method keeps, all saved in checkpoints), and its options
dataclass ``Method.Options`` (the constructor's keyword arguments, each a flag of ``metaphi continual``):

    state = method.start(net, params, stream, generator, seed=, workdir=, progress=)
    state = method.learn(net, state, experience, generator)     # one pass over the experience
    method.weights(state)                                        # the params to test
    method.spec()                                                # its settings, for checkpoints

Methods (one family per file, the math in each docstring):

* ``finetune`` — sequential fine-tuning, the lower bound (:mod:`.finetune`);
* ``ewc`` — elastic weight consolidation with a per-experience Fisher (:mod:`.ewc`);
* ``replay`` — experience replay from a fixed reservoir memory (:mod:`.replay`);
* ``oml`` — a meta-learned representation (:mod:`metaphi.algorithms.oml`), the head learned online
  (:mod:`.oml`);
* ``pretrain`` — the same with a supervised pre-trained representation, OML's control (:mod:`.oml`);
* ``lamaml`` — La-MAML, look-ahead meta-learning with learned per-weight rates (:mod:`.lamaml`).

:func:`.runner.run_stream` runs one method on one stream with checkpoints after every experience.
"""
from __future__ import annotations

import importlib

METHODS = {
    "finetune": "metaphi.continual.finetune:Finetune",
    "ewc": "metaphi.continual.ewc:EWC",
    "replay": "metaphi.continual.replay:Replay",
    "oml": "metaphi.continual.oml:OML",
    "pretrain": "metaphi.continual.oml:Pretrain",
    "lamaml": "metaphi.continual.lamaml:LaMAML",
}


def method_class(name: str) -> type:
    """The class of method ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown continual method '{name}' (valid: {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def options_class(name: str) -> type:
    """The options dataclass of method ``name``, declared beside it (``Method.Options``): its fields are
    the constructor's keyword arguments, and each is a flag of ``metaphi continual``."""
    return method_class(name).Options


def build_method(name: str, **options):
    """The method called ``name`` with ``options`` for its constructor (unknown options are an error)."""
    return method_class(name)(**options)


__all__ = ["METHODS", "build_method", "method_class", "options_class"]
