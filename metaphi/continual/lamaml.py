"""La-MAML: look-ahead MAML for online continual learning (Gupta, Yadav & Paull 2020, NeurIPS).

The weights θ and a learning rate α_i for every weight are learned online, with a replay memory M
(reservoir sampling, as in :mod:`metaphi.continual.replay`). For each incoming mini-batch
B = (b_1, ..., b_k) of the stream, with R drawn from M:

    θ_0 = θ;  θ_j = θ_{j-1} − max(α, 0) ⊙ clip(∇ℓ(θ_{j-1}; b_j)),  j = 1..k   (look-ahead, one example a step)
    L_meta(θ, α) = (1/k) Σ_j ℓ(θ_j; B ∪ R)                                    (new and old examples)
    α ← α − η clip_norm(∇_α L_meta)
    θ ← θ − max(α, 0) ⊙ clip_norm(∇_θ L_meta)                                (the learned rates, clipped)

then B is offered to the memory. ∇_θ L_meta differentiates through the inner steps (second order;
``first_order=True`` treats the inner gradients as constants), so an update of θ is judged by how
it serves old examples after a look-ahead on new ones: as in MER (Riemer et al. 2019), the
gradients of new and old data are pushed to align, and α shrinks along directions where they
conflict. As in the authors' implementation (github.com/montrealrobotics/La-MAML), the meta-loss is
averaged over the look-ahead steps and the meta-gradients of θ and of α are each rescaled to a norm
of at most ``clip``; without this the first updates of α (whose gradient is a sum of products of
gradients) throw it far past zero and the weights diverge. The authors clamp each coordinate of an
inner gradient to ±``clip`` (``inner_clip="value"``); the default here rescales each inner gradient
to a norm of at most ``clip`` (``inner_clip="norm"``), which bounds the look-ahead's step whatever
the scale of the features: with elementwise clamping a step size tuned on one data set blew the
look-ahead up on another whose (unnormalized) features were four times larger, and nothing was
learned. The inner loop is :func:`metaphi.inner.adapt.adapt` with the Meta-SGD rule (a learned step
size per coordinate, :class:`metaphi.inner.rules.MetaSGD`) given max(α, 0): φ = (θ, α) of
Meta-SGD, learned here online instead of over a task distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from metaphi.config import option
from metaphi.inner import MetaSGD, Unroll, adapt
from metaphi.continual.net import loss, minibatches
from metaphi.continual.replay import empty_memory, memory_sample, reservoir_add


@dataclass
class LaMAMLOptions:
    alpha: float = option(0.3, "initial per-weight step size", check="rate")
    alpha_lr: float = option(0.3, "step size of the step sizes", check="rate")
    batch: int = option(10, "mini-batch of the stream", check="positive")
    epochs: int = option(1, "passes over each experience", check="positive")
    memory: int = option(100, "examples in memory", check="positive")
    replay_batch: int | None = option(None, "memory examples per step (none: --batch)",
                                      check="positive")
    first_order: bool = option(False, "first-order meta-gradient (the inner gradients held constant)")
    clip: float = option(2.0, "the norm the meta-gradients (and the inner gradients) are clipped to",
                         check="rate")
    inner_clip: str = option("norm", "clip each inner gradient by its norm or each coordinate by value",
                             choices=("norm", "value"))


class LaMAML:
    name = "lamaml"
    Options = LaMAMLOptions

    def __init__(self, alpha: float = 0.3, alpha_lr: float = 0.3, batch: int = 10, epochs: int = 1,
                 memory: int = 100, replay_batch: int | None = None, first_order: bool = False, clip: float = 2.0,
                 inner_clip: str = "norm"):
        if inner_clip not in ("value", "norm"):
            raise ValueError(f"inner_clip must be 'value' or 'norm', got {inner_clip!r}")
        self.inner_clip = inner_clip
        if alpha <= 0 or alpha_lr <= 0 or batch < 1 or epochs < 1 or memory < 1 or clip <= 0:
            raise ValueError("alpha, alpha_lr and clip must be positive, batch, epochs and memory at least 1")
        self.clip = float(clip)
        self.alpha, self.alpha_lr, self.batch, self.epochs = float(alpha), float(alpha_lr), int(batch), int(epochs)
        self.memory, self.replay_batch, self.first_order = int(memory), int(replay_batch or batch), bool(first_order)
        self.rule = MetaSGD(self.alpha)

    def spec(self) -> dict:
        return {"name": self.name, "alpha": self.alpha, "alpha_lr": self.alpha_lr, "batch": self.batch,
                "epochs": self.epochs, "memory": self.memory, "replay_batch": self.replay_batch,
                "first_order": self.first_order, "clip": self.clip, "inner_clip": self.inner_clip}

    def start(self, net, params, stream, generator, seed=0, workdir=None, progress=False) -> dict:
        return {"params": params, "alpha": self.rule.meta_params(params),
                "memory": empty_memory(stream.image_shape, self.memory)}

    def step(self, net, params, alpha, x, y, rx, ry):
        """One La-MAML update on the incoming batch ``x, y`` with replayed ``rx, ry``; new (θ, α)."""
        theta = {k: v.detach().requires_grad_() for k, v in params.items()}
        lr = {k: v.detach().requires_grad_() for k, v in alpha.items()}
        rates = {k: v.clamp_min(0) for k, v in lr.items()}
        both_x, both_y = torch.cat([x, rx]), torch.cat([y, ry])
        rule = _Clamped(self.rule, self.clip, by_norm=self.inner_clip == "norm")
        fast, meta_loss = theta, 0.0
        for j in range(len(y)):
            fast = adapt(lambda p, j=j: loss(net, p, x[j:j + 1], y[j:j + 1]), fast, rule, rates, 1,
                         Unroll(first_order=self.first_order))
            meta_loss = meta_loss + loss(net, fast, both_x, both_y) / len(y)
        keys = list(theta)
        grads = torch.autograd.grad(meta_loss, [theta[k] for k in keys] + [lr[k] for k in keys])
        g_theta = _clip_norm(dict(zip(keys, grads[:len(keys)])), self.clip)
        g_alpha = _clip_norm(dict(zip(keys, grads[len(keys):])), self.clip)
        new_alpha = {k: (alpha[k] - self.alpha_lr * g_alpha[k]).detach() for k in keys}
        new_params = {k: (params[k] - new_alpha[k].clamp_min(0) * g_theta[k]).detach() for k in keys}
        return new_params, new_alpha, float(meta_loss.detach())

    def learn(self, net, state: dict, experience, generator) -> dict:
        params, alpha, memory = state["params"], state["alpha"], state["memory"]
        for epoch in range(self.epochs):
            for x, y in minibatches(experience.train_x, experience.train_y, self.batch):
                rx, ry = memory_sample(memory, self.replay_batch, generator)
                params, alpha, _ = self.step(net, params, alpha, x, y, rx, ry)
                if epoch == 0:
                    memory = reservoir_add(memory, x, y, generator)
        return {**state, "params": params, "alpha": alpha, "memory": memory}

    def weights(self, state: dict):
        return state["params"]


class _Clamped:
    """An update rule whose gradients are clamped elementwise to ±``clip`` before ``rule`` sees them."""

    def __init__(self, rule, clip: float, by_norm: bool = False):
        self.rule, self.clip, self.by_norm = rule, clip, by_norm

    def meta_params(self, params):
        return self.rule.meta_params(params)

    def init(self, params):
        return self.rule.init(params)

    def update(self, params, grads, state, meta):
        if self.by_norm:
            return self.rule.update(params, _clip_norm(grads, self.clip), state, meta)
        return self.rule.update(params, {k: g.clamp(-self.clip, self.clip) for k, g in grads.items()}, state, meta)

    def spec(self):
        return {"clamped": self.clip, **self.rule.spec()}


def _clip_norm(grads: dict, max_norm: float) -> dict:
    """``grads`` rescaled to a global norm of at most ``max_norm`` (torch's clip_grad_norm_, out of place)."""
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {k: g * scale for k, g in grads.items()}
