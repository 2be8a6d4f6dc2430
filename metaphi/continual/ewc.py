"""Elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks", PNAS).

After learning experience t the weights θ*_t are kept as an anchor, with the diagonal of the Fisher
information of the model's predictive distribution on that experience's training inputs,

    F_t,i = (1/N_t) Σ_n Σ_c p_θ*(c | x_n) (∂ log p_θ(c | x_n) / ∂θ_i)²  at θ = θ*_t,

the expectation over the model's own labels c computed exactly (a sum over every output class)
and the squares taken per example, not of a mini-batch's gradient: the true Fisher, which is what
the Laplace approximation in the paper needs (the "empirical Fisher", with the observed labels in
place of the expectation, is a different matrix; Kunstner et al. 2019). Later experiences are
learned with SGD on

    ℓ(θ; B) + (λ/2) Σ_{t' < t} Σ_i F_t',i (θ_i − θ*_t',i)²,

one penalty per earlier experience with its own anchor and Fisher (the paper's multi-task form, not
the running-average "online EWC" of Schwarz et al. 2018).

How the penalty is stepped (``step``): a plain gradient step on loss + penalty (``"gradient"``)
diverges once η λ Σ_t F_t,i > 2 for some weight — the penalty is a stiff quadratic, and a Fisher
entry of a bias can be near 1 — so large λ, where EWC protects most, are out of reach at a useful
η. The default ``"proximal"`` takes the gradient step on the loss alone and then the exact proximal
step of the penalty (backward Euler on the quadratic), in closed form per weight:

    θ_i ← (θ'_i + η λ Σ_t F_t,i θ*_t,i) / (1 + η λ Σ_t F_t,i),   θ' = θ − η ∇ℓ(θ; B),

the minimiser of ||θ − θ'||² / (2η) + penalty(θ). It minimises the same objective, agrees with the
gradient step to first order in η, and is stable for every λ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dataclasses import dataclass

from metaphi.config import option
from metaphi.continual.finetune import FinetuneOptions
from metaphi.continual.net import as_input, grad, minibatches, sgd
from metaphi.functional import Params, call, detach


def fisher_diagonal(net, params: Params, x: Tensor, chunk: int = 16) -> Params:
    """The diagonal of the Fisher information (above) of ``net`` at ``params`` on inputs ``x``."""
    params = detach(params)

    def log_probs(p, one):
        return F.log_softmax(call(net, p, one.unsqueeze(0)), dim=-1)[0]

    def per_example(one):
        jac = torch.func.jacrev(log_probs)(params, one)          # ∂ log p(c|x)/∂θ: [C, *shape] per entry
        prob = log_probs(params, one).exp()
        return {k: torch.einsum("c,c...->...", prob, j.square()) for k, j in jac.items()}

    x = as_input(x)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for s in range(0, len(x), chunk):
        part = torch.func.vmap(per_example)(x[s:s + chunk])
        for k in total:
            total[k] += part[k].sum(0)
    return {k: v / max(len(x), 1) for k, v in total.items()}


def penalty(params: Params, anchors: list[Params], fishers: list[Params], lam: float) -> Tensor:
    """(λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)²; zero with no anchors."""
    total = sum(((f[k] * (params[k] - a[k]).square()).sum() for a, f in zip(anchors, fishers) for k in f),
                start=torch.zeros(()))
    return 0.5 * lam * total


def proximal(params: Params, anchors: list[Params], fishers: list[Params], lam: float, lr: float) -> Params:
    """argmin_θ ||θ − params||² / (2 lr) + penalty(θ), in closed form (see the module docstring)."""
    out = {}
    for k, v in params.items():
        weight = sum((f[k] for f in fishers), start=torch.zeros_like(v)) * (lr * lam)
        pull = sum((f[k] * a[k] for a, f in zip(anchors, fishers)), start=torch.zeros_like(v)) * (lr * lam)
        out[k] = (v + pull) / (1 + weight)
    return out


@dataclass
class EWCOptions(FinetuneOptions):
    lam: float = option(1.0, "penalty weight λ (1 is the choice on glyphs-val)", check="nonneg",
                        flag="--ewc-lambda")
    step: str = option("proximal", "how the penalty is stepped (see metaphi.continual.ewc)",
                       choices=("proximal", "gradient"), flag="--ewc-step")


class EWC:
    name = "ewc"
    Options = EWCOptions

    def __init__(self, lr: float = 0.01, batch: int = 10, epochs: int = 1, lam: float = 1.0,
                 step: str = "proximal"):
        if lr <= 0 or batch < 1 or epochs < 1 or lam < 0:
            raise ValueError("lr must be positive, batch and epochs at least 1, lambda >= 0")
        if step not in ("proximal", "gradient"):
            raise ValueError(f"step must be 'proximal' or 'gradient', got {step!r}")
        self.lr, self.batch, self.epochs, self.lam, self.step = float(lr), int(batch), int(epochs), float(lam), step

    def spec(self) -> dict:
        return {"name": self.name, "lr": self.lr, "batch": self.batch, "epochs": self.epochs, "lambda": self.lam,
                "step": self.step}

    def start(self, net, params, stream, generator, seed=0, workdir=None, progress=False) -> dict:
        return {"params": params, "anchors": [], "fishers": []}

    def learn(self, net, state: dict, experience, generator) -> dict:
        params, anchors, fishers = state["params"], state["anchors"], state["fishers"]
        extra = (lambda p: penalty(p, anchors, fishers, self.lam)) if anchors and self.step == "gradient" else None
        for _ in range(self.epochs):
            for x, y in minibatches(experience.train_x, experience.train_y, self.batch):
                g, _ = grad(net, params, x, y, extra=extra)
                params = sgd(params, g, self.lr)
                if anchors and self.step == "proximal":
                    params = proximal(params, anchors, fishers, self.lam, self.lr)
        fisher = fisher_diagonal(net, params, experience.train_x)
        return {**state, "params": params, "anchors": anchors + [detach(params)], "fishers": fishers + [fisher]}

    def weights(self, state: dict):
        return state["params"]
