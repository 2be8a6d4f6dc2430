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
    rules = {"sgd": SGD, "meta-sgd": MetaSGD, "adam": Adam, "momentum-sgd": MomentumSGD, "torch-adam": TorchAdam,
             "torch-sgd": TorchSGD}
    if name not in rules:
        from metaphi.inner.learned import RULES as learned
        rules.update(learned)
    if name not in rules:
        raise ValueError(f"unknown update rule '{name}' (known: {', '.join(rules)})")
    return rules[name](**spec)


class Adam:
    """Adam (Kingma & Ba 2015, "Adam: a method for stochastic optimization"), step t = 1, 2, ...:

        m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
        θ ← θ − α (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)

    The state {"m", "v", "t"} is plain data (tensors and an int), so it goes into a checkpoint as is.
    Used as the outer optimizer of online bilevel problems (distillation's student and teacher)."""

    def __init__(self, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps = float(lr), float(b1), float(b2), float(eps)

    def meta_params(self, params: Params) -> Params:
        return {}

    def init(self, params: Params) -> dict:
        return {"m": {k: torch.zeros_like(v) for k, v in params.items()},
                "v": {k: torch.zeros_like(v) for k, v in params.items()}, "t": 0}

    def update(self, params: Params, grads: Params, state: dict, meta: Params) -> tuple[Params, dict]:
        b1, b2 = self.b1, self.b2
        t = state["t"] + 1
        m = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grads.items()}
        v = {k: b2 * state["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new = {k: p - self.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + self.eps) for k, p in params.items()}
        return new, {"m": m, "v": v, "t": t}

    def spec(self) -> dict:
        return {"name": "adam", "lr": self.lr, "b1": self.b1, "b2": self.b2, "eps": self.eps}


class MomentumSGD:
    """Heavy-ball SGD with L2 weight decay and optional clipping of the gradient's global norm, the
    weight update of DARTS (Liu et al. 2019) and of the online augmentation search:

        g ← g · min(1, c / (‖g‖ + 10⁻⁶))   (when ``clip`` = c is set),
        v ← μ v + g + λ θ,      θ ← θ − η v.

    The state is the velocity v (a dict like the params). A step-size schedule is a new rule per step
    (``MomentumSGD(lr_at(t), ...)``): the rule is a constant, the schedule lives in the loop."""

    def __init__(self, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, clip: float | None = None):
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.clip = float(clip) if clip else None

    def meta_params(self, params: Params) -> Params:
        return {}

    def init(self, params: Params) -> Params:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def update(self, params: Params, grads: Params, state: Params, meta: Params) -> tuple[Params, Params]:
        if self.clip:
            total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
            factor = min(1.0, self.clip / (float(total) + 1e-6))
            grads = {k: g * factor for k, g in grads.items()}
        velocity = {k: self.momentum * state[k] + grads[k] + self.weight_decay * params[k] for k in params}
        return {k: params[k] - self.lr * velocity[k] for k in params}, velocity

    def spec(self) -> dict:
        return {"name": "momentum-sgd", "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "clip": self.clip}


class TorchAdam:
    """Adam exactly as ``torch.optim.Adam`` computes it (L2 weight decay λ added to the gradient, bias
    corrections folded into the step size), bit for bit, as a pure rule: it runs torch's own
    functional ``torch.optim.adam.adam`` on copies, so the params and state passed in are untouched.

        g ← g + λ θ,  m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²,
        θ ← θ − (η / (1 − β₁ᵗ)) m / (√v / √(1 − β₂ᵗ) + ε)

    The outer optimizer of the online bilevel problems that used ``torch.optim.Adam`` (DARTS's α, the
    augmentation policy); the state {"step": int, "exp_avg", "exp_avg_sq"} is plain data."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(map(float, betas)), float(eps), \
            float(weight_decay)

    def meta_params(self, params: Params) -> Params:
        return {}

    def init(self, params: Params) -> dict:
        return {"step": 0, "exp_avg": {k: torch.zeros_like(v) for k, v in params.items()},
                "exp_avg_sq": {k: torch.zeros_like(v) for k, v in params.items()}}

    def update(self, params: Params, grads: Params, state: dict, meta: Params) -> tuple[Params, dict]:
        from torch.optim.adam import adam

        keys = list(params)
        with torch.no_grad():
            new = [params[k].detach().clone() for k in keys]
            m = [state["exp_avg"][k].clone() for k in keys]
            v = [state["exp_avg_sq"][k].clone() for k in keys]
            steps = [torch.tensor(float(state["step"])) for _ in keys]
            adam(new, [grads[k].to(p.dtype) for k, p in zip(keys, new)], m, v, [], steps, amsgrad=False,
                 beta1=self.betas[0], beta2=self.betas[1], lr=self.lr, weight_decay=self.weight_decay, eps=self.eps,
                 maximize=False)
        return dict(zip(keys, new)), {"step": state["step"] + 1, "exp_avg": dict(zip(keys, m)),
                                      "exp_avg_sq": dict(zip(keys, v))}

    def spec(self) -> dict:
        return {"name": "torch-adam", "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}


class TorchSGD:
    """SGD with momentum exactly as ``torch.optim.SGD`` computes it, bit for bit, as a pure rule: it runs
    torch's own functional ``torch.optim.sgd.sgd`` on copies, so the params and state passed in are
    untouched. With weight decay λ, momentum μ, dampening τ:

        g ← g + λ θ,   b ← g at the first step, else μ b + (1 − τ) g,   θ ← θ − η b
        (nesterov: θ ← θ − η (g + μ b))

    The classifier's optimizer of sample reweighting (``metaphi.experiments.reweight``), which used
    ``torch.optim.SGD``; ``MomentumSGD`` adds the terms in another order, so its numbers differ in the
    last bits. The state {"momentum_buffer": None before the first step, else a dict like the params}
    is plain data. A step-size schedule is a new rule per step, as for ``MomentumSGD``."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False):
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.dampening, self.nesterov = float(dampening), bool(nesterov)

    def meta_params(self, params: Params) -> Params:
        return {}

    def init(self, params: Params) -> dict:
        return {"momentum_buffer": None}

    def update(self, params: Params, grads: Params, state: dict, meta: Params) -> tuple[Params, dict]:
        from torch.optim.sgd import sgd

        keys = list(params)
        with torch.no_grad():
            new = [params[k].detach().clone() for k in keys]
            held = state["momentum_buffer"]
            buffers = [None if held is None else held[k].clone() for k in keys]
            sgd(new, [grads[k].to(p.dtype) for k, p in zip(keys, new)], buffers, weight_decay=self.weight_decay,
                momentum=self.momentum, lr=self.lr, dampening=self.dampening, nesterov=self.nesterov, maximize=False)
        return dict(zip(keys, new)), {"momentum_buffer": dict(zip(keys, buffers)) if self.momentum else None}

    def spec(self) -> dict:
        return {"name": "torch-sgd", "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "dampening": self.dampening, "nesterov": self.nesterov}
