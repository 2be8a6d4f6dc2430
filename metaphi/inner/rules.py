"""Update rules: how one inner step turns (params, grads) into new params.

A rule is a small object with pure functions, in the manner of optax:
``meta_params(params)`` gives the rule's own learnable pieces (empty for plain SGD), ``init(params)``
its per-task state, and ``update(params, grads, state, meta)`` the next params and state. Nothing is
mutated; the rule's meta-parameters arrive as an argument so that gradients can flow into them.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from metaphi.functional import Params


class UpdateRule(Protocol):
    def meta_params(self, params: Params) -> Params: ...
    def init(self, params: Params) -> Any: ...
    def update(self, params: Params, grads: Params, state: Any, meta: Params) -> tuple[Params, Any]: ...
    def spec(self) -> dict: ...


class SGD:
    """θ ← θ − α ∇L(θ) with a fixed scalar step size α (MAML's inner loop)."""

    def __init__(self, lr: float):
        self.lr = float(lr)

    def meta_params(self, params: Params) -> Params:
        return {}

    def init(self, params: Params) -> None:
        return None

    def update(self, params: Params, grads: Params, state: None, meta: Params) -> tuple[Params, None]:
        return {k: p - self.lr * grads[k] for k, p in params.items()}, None

    def spec(self) -> dict:
        return {"name": "sgd", "lr": self.lr}


class MetaSGD:
    """θ ← θ − α ⊙ ∇L(θ) with a learned step size for every coordinate (Li et al. 2017, Meta-SGD).

    The step sizes α are meta-parameters, initialised to ``lr`` and learned with the initialization.
    """

    def __init__(self, lr: float):
        self.lr = float(lr)

    def meta_params(self, params: Params) -> Params:
        return {k: torch.full_like(p, self.lr) for k, p in params.items()}

    def init(self, params: Params) -> None:
        return None

    def update(self, params: Params, grads: Params, state: None, meta: Params) -> tuple[Params, None]:
        return {k: p - meta[k] * grads[k] for k, p in params.items()}, None

    def spec(self) -> dict:
        return {"name": "meta-sgd", "lr": self.lr}


def build_rule(spec: dict) -> UpdateRule:
    spec = dict(spec)
    name = spec.pop("name")
    rules = {"sgd": SGD, "meta-sgd": MetaSGD}
    if name not in rules:
        from metaphi.inner.learned import RULES as learned
        rules.update(learned)
    if name not in rules:
        raise ValueError(f"unknown update rule '{name}' (known: {', '.join(rules)})")
    return rules[name](**spec)
