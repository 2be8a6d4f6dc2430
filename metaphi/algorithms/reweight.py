"""Sample reweighting: learn how much each training example counts, from a small clean meta set.

The "task" is one data set: a training split (noisy labels, or long-tailed classes) and a small,
clean, balanced meta split. φ decides the weight w_i of every training example in a batch; it is
judged by the meta loss after one step of training with those weights (a one-step lookahead):

    θ'(φ) = θ − α ∇_θ Σ_i w_i(φ) ℓ_i(θ)          ℓ_i = CE(f_θ(x_i), y_i), a virtual step
    L_meta(φ) = mean_j CE(f_θ'(φ)(x_j), y_j)        over the clean meta batch

This is exactly an ``Algorithm.task_loss`` with Task(support = training batch, query = meta batch):
``WeightedLookahead`` below learns the support by one SGD step of ``metaphi.inner.adapt`` on the
weighted loss, and any estimator of ``metaphi.outer`` turns L_meta into ∇_φ (the unrolled
second-order one by default; θ enters as a constant, so the first-order estimator gives the same
number: both differentiate through the weighted gradient; ES needs only values of L_meta).

**Learning to Reweight Examples** (L2RW; Ren, Zeng, Yang & Urtasun 2018). φ = ε ∈ R^n, the weights
themselves, perturbed around zero; the weights are the clipped, normalised negative meta-gradient:

    u_i = −∂L_meta/∂ε_i |_{ε=0} = α ∇_θ ℓ_i(θ) · ∇_θ L_meta(θ)
    w̃_i = max(u_i, 0),     w_i = w̃_i / Σ_j w̃_j   (all zero when every u_i ≤ 0)

An example counts when its gradient points the way the clean set's gradient does; a mislabelled one
usually points against it and gets weight 0. The weights are recomputed from scratch at every step
(nothing is carried over). Two ways to compute u, equal up to rounding:

- ``"lookahead"``: ∂/∂ε through the virtual step by the ``Unrolled`` estimator (one double backward);
- ``"jvp"``: u = α J g with J the per-example Jacobian of the losses and g = ∇_θ L_meta(θ), which is
  one forward-mode derivative of the loss vector along g (``torch.func.jvp``): no per-example
  gradients are stored and no second derivatives are formed. The default, the cheapest.

**Meta-Weight-Net** (MW-Net; Shu, Xie, Yi, Zhao, Zhou, Xu & Meng 2019). φ = a one-hidden-layer MLP
V(ℓ; φ) = sigmoid(W₂ relu(W₁ ℓ + b₁) + b₂), 1 → 100 → 1, mapping an example's loss to its weight;
it is trained alongside the classifier, one meta step per training step:

    1. virtual step: w_i = V(ℓ_i(θ); φ) / Σ_j V(ℓ_j(θ); φ), θ'(φ) as above (α = the current lr)
    2. φ ← Adam(φ, ∇_φ L_meta(φ))               (lr 1e-3, weight decay 1e-4, as the authors' code)
    3. θ ← SGD(θ, ∇_θ Σ_i w_i ℓ_i(θ)) with w_i = V(ℓ_i(θ); φ_new) / Σ_j V(ℓ_j(θ); φ_new), held constant

The loss fed to V is a constant (the authors' code feeds ``loss.data``), and the weights are
normalised to sum to one over the batch as in the authors' code (the paper's equations write a
1/n mean instead; ``normalize=False`` gives that). With the sum normalisation the virtual step's
size α matters only through the curvature seen by the lookahead.

Plain training is the same loop with w_i = 1/n. The loop that trains θ while φ steps, the data
splits and the study over seeds are in ``metaphi.experiments.reweight``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.algorithms.base import Algorithm
from metaphi.functional import Params, call, detach
from metaphi.inner import SGD, Unroll, adapt
from metaphi.tasks import Task

L2RW_MODES = ("jvp", "lookahead")


def per_example_losses(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """ℓ_i = CE(f_θ(x_i), y_i) for every example, shape [n]."""
    return F.cross_entropy(call(model, params, x), y, reduction="none")


class MetaWeightNet(nn.Module):
    """V(ℓ; φ): an example's loss → its weight in (0, 1) (Shu et al. 2019: 1 → 100 → 1, ReLU, sigmoid)."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.spec = {"name": "mwnet", "hidden": hidden}
        self.hidden = nn.Linear(1, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, losses: Tensor) -> Tensor:
        return torch.sigmoid(self.out(torch.relu(self.hidden(losses.unsqueeze(-1))))).squeeze(-1)


def normalized(weights: Tensor) -> Tensor:
    """w / Σ w, or zeros when Σ w = 0 (L2RW: a batch where no example helps takes no step)."""
    total = weights.sum()
    return weights / torch.where(total > 0, total, torch.ones_like(total))


class WeightedLookahead(Algorithm):
    """One virtual SGD step on a weighted training batch, judged on a clean meta batch.

    ``weigh(phi, losses)`` gives the weights [n] of the batch's examples from φ and their losses at θ
    (constants). The model's weights θ (``params``) are constants of φ: a new lookahead is built for
    every training step. Task = (support = (x, y) training batch, query = (x, y) meta batch).
    """

    name = "reweight-lookahead"
    estimators = ("second-order", "first-order")

    def __init__(self, model: nn.Module, params: Params, lr: float, weigh: Callable[[Params, Tensor], Tensor]):
        self.model, self.params, self.lr, self.weigh = model, detach(params), float(lr), weigh

    def weights(self, phi: Params, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            losses = per_example_losses(self.model, self.params, x, y)
        return self.weigh(phi, losses)

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        # ``unroll`` is not handed on: φ enters L_meta only through the virtual step's gradient, so a
        # first-order step (that gradient a constant) would leave ∇_φ = 0; θ is a constant of φ, so
        # there is no θ-Hessian term for first order to drop, and one step has nothing to checkpoint
        (x, y), (x_meta, y_meta) = task
        w = self.weights(phi, x, y)
        theta = adapt(lambda p: (w * per_example_losses(self.model, p, x, y)).sum(), self.params, SGD(self.lr), {}, 1)
        logits = call(self.model, theta, x_meta)
        return F.cross_entropy(logits, y_meta), {"accuracy": (logits.argmax(-1) == y_meta).float().mean()}


def one_task(batch: tuple[Tensor, Tensor], meta: tuple[Tensor, Tensor]) -> Task:
    """The estimators' input: a stack of one task, (support = ``batch``, query = ``meta``)."""
    return Task.stack([Task(batch, meta)])


def l2rw_scores(model: nn.Module, params: Params, batch: tuple[Tensor, Tensor], meta: tuple[Tensor, Tensor],
                lr: float, mode: str = "jvp") -> Tensor:
    """u_i = −∂L_meta/∂ε_i at ε = 0 (Ren et al. 2018), by ``mode`` "jvp" or "lookahead" (equal)."""
    if mode == "lookahead":
        from metaphi.outer import build_estimator
        x = batch[0]
        eps = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device, requires_grad=True)
        algo = WeightedLookahead(model, params, lr, lambda phi, losses: phi["eps"])
        grads, _ = build_estimator("second-order", {"loop": True})(algo, {"eps": eps}, one_task(batch, meta))
        return -grads["eps"]
    if mode != "jvp":
        raise ValueError(f"L2RW mode must be one of {', '.join(L2RW_MODES)}, got {mode!r}")
    theta = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    meta_loss = F.cross_entropy(call(model, theta, meta[0]), meta[1])
    g = dict(zip(theta, torch.autograd.grad(meta_loss, list(theta.values()))))
    _, directional = torch.func.jvp(lambda p: per_example_losses(model, p, *batch), (detach(theta),), (g,))
    return lr * directional.detach()


def l2rw_weights(scores: Tensor) -> Tensor:
    """w_i = max(u_i, 0) / Σ_j max(u_j, 0), zeros if no u_i is positive."""
    return normalized(scores.clamp(min=0))


def mwnet_weigh(net: MetaWeightNet, normalize: bool = True) -> Callable[[Params, Tensor], Tensor]:
    """φ, losses ↦ V(ℓ; φ), normalised to sum to one (the authors' code) or divided by n (the paper)."""
    def weigh(phi: Params, losses: Tensor) -> Tensor:
        v = call(net, phi, losses)
        return normalized(v) if normalize else v / v.shape[0]
    return weigh
