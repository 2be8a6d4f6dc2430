"""Searching an augmentation policy by the validation loss after a lookahead training step.

The "task" is one data set split into a training and a validation part. A model θ trains on the
training part with augmentation policy φ; φ is judged by the validation loss after the model has
taken one step on an augmented training batch (the one-step unrolled bilevel problem of DARTS, Liu,
Simonyan & Yang 2019, used for augmentation by Hataya et al. 2020 "Faster AutoAugment", Li et al.
2020 "DADA" and Lin et al. 2019 "Online hyper-parameter learning for auto-augmentation"):

    lookahead:  θ'(φ) = θ − α ∇_θ CE(f_θ(A_φ(x, ξ)), y)
    loss:       L(φ)  = CE(f_θ'(φ)(x_val), y_val)

with ξ the fixed randomness of the augmentation (``policy.draw_noise``). In metaphi's terms this is
an algorithm whose ``task_loss(φ, task)`` learns the task's support set — here (θ, x, y, ξ): the
current weights and a training batch — with one SGD step and returns the loss on its query set (a
validation batch), so the library's estimators serve it unchanged:

* ``second-order`` (``metaphi.outer.Unrolled``): ∇_φ L through the relaxed gates and the lookahead
  step, which needs the mixed second derivative ∂²CE/∂θ∂x; φ enters L only through the inner
  gradient, so the first-order approximation would give exactly zero and is refused.
* ``reinforce`` (``metaphi.outer.reinforce.Reinforce``) on the discrete parametrization: φ's
  Bernoulli and categorical logits are replaced by sampled choices, and the validation losses of the
  choices give the score-function estimate (AutoAugment's search with the lookahead loss as reward).
* ``es`` (``metaphi.outer.es``): values of L alone, on the relaxed parametrization.

The search alternates (DARTS' online scheme): one update of φ from the estimator, then one real
training step of θ on a batch augmented with the current policy's hard gates. Every step's
randomness comes from a generator seeded by (seed, step), so a resumed search replays exactly; the
loop is ``metaphi.train_online``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.functional import Params, call, detach
from metaphi.functional import accuracy as functional_accuracy
from metaphi.inner import SGD, Unroll, adapt
from metaphi.inner.rules import MomentumSGD, TorchAdam
from metaphi.tasks import Task
from metaphi.augment import policy as P

METHODS = ("gradient", "reinforce", "es")
ESTIMATOR_OF = {"gradient": "second-order", "reinforce": "reinforce", "es": "es"}


class LookaheadAugment:
    """The bilevel problem above as a metaphi algorithm (``task_loss``, ``init_meta_params``).

    ``parametrization``: ``"relaxed"`` (φ = logits and magnitudes, gates by the concrete relaxation
    with ``temperature``) or ``"discrete"`` (φ = Bernoulli and level logits; ``task_loss`` receives
    the sampled choice — 0/1 per operation and one-hot levels — in their place, as
    ``metaphi.outer.reinforce`` passes it).
    """

    name = "augment"

    def __init__(self, model: nn.Module, lookahead_lr: float, space: P.Space = P.Space(), temperature: float = 0.5,
                 straight_through: bool = False, parametrization: str = "relaxed"):
        if parametrization not in ("relaxed", "discrete"):
            raise ValueError(f"parametrization must be 'relaxed' or 'discrete', got {parametrization!r}")
        self.model, self.lookahead_lr, self.space = model, float(lookahead_lr), space
        self.temperature, self.straight_through = float(temperature), straight_through
        self.parametrization = parametrization
        self.estimators = ("second-order", "es") if parametrization == "relaxed" else ("reinforce",)
        self.discrete = {} if parametrization == "relaxed" else {"aug.apply": "bernoulli", "aug.level": "categorical"}

    def init_meta_params(self, prob: float = 0.2, magnitude: float = 0.3) -> Params:
        if self.parametrization == "relaxed":
            return P.init_relaxed(prob, magnitude)
        return P.init_discrete(prob, magnitude)

    def gates_and_magnitudes(self, phi: Params, noise: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.parametrization == "relaxed":
            gates = P.relaxed_gates(phi["aug.logit"], noise["gate"], self.temperature, self.straight_through)
            return gates, torch.sigmoid(phi["aug.magnitude"])
        # a sampled choice: on/off per operation for the whole batch, one level per operation
        level = phi["aug.level"] @ P.level_values(phi["aug.level"].dtype, phi["aug.level"].device)
        return phi["aug.apply"].expand(noise["gate"].shape[0], -1), level

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        if unroll.first_order and torch.is_grad_enabled() and any(v.requires_grad for v in phi.values()):
            # values alone (ES scores members under no_grad, first-order) are the same either way
            raise ValueError("the augmentation policy enters the validation loss only through the training "
                             "gradient, so its first-order meta-gradient is zero; use the second-order, "
                             "reinforce or es estimator")
        (theta, x, y, noise), (x_val, y_val) = task.support, task.query
        gates, magnitude = self.gates_and_magnitudes(phi, noise)
        x_aug = P.apply(x, gates, magnitude, noise, self.space)
        train_loss = lambda params: F.cross_entropy(call(self.model, params, x_aug), y)
        theta_new = adapt(train_loss, theta, SGD(self.lookahead_lr), {}, steps=1)
        out = call(self.model, theta_new, x_val)
        loss = F.cross_entropy(out, y_val)
        return loss, {"val_acc": (out.argmax(-1) == y_val).float().mean().detach()}

    def policy(self, phi: Params) -> P.Policy:
        return P.policy_of(phi)


def lookahead_task(theta: Params, x: Tensor, y: Tensor, noise: dict[str, Tensor], x_val: Tensor, y_val: Tensor) -> Task:
    """One task in the batched form the estimators take (a leading task dimension of 1)."""
    return Task.stack([Task((detach(theta), x, y, noise), (x_val, y_val))])


# --- training a model with a policy -----------------------------------------------------------------

def train_step(model: nn.Module, params: Params, velocity: Params, x: Tensor, y: Tensor, policy: P.Policy,
               generator: torch.Generator, lr: float, momentum: float, weight_decay: float,
               space: P.Space = P.Space()) -> tuple[Params, Params, float]:
    """One step of heavy-ball SGD (``MomentumSGD``: torch.optim.SGD's update, out of place) on a batch
    augmented by ``policy``; returns (params, velocity, loss)."""
    x_aug = P.augment(x, policy, generator, space)
    params_req = {k: v.detach().requires_grad_() for k, v in params.items()}
    loss = F.cross_entropy(call(model, params_req, x_aug), y)
    grads = dict(zip(params_req, torch.autograd.grad(loss, list(params_req.values()))))
    new, velocity = MomentumSGD(lr, momentum, weight_decay).update(detach(params), grads, velocity, {})
    return new, velocity, float(loss.detach())


def batch_indices(n: int, batch: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=generator)[:min(batch, n)]


def train_model(model: nn.Module, params: Params, data: tuple[Tensor, Tensor], policy: P.Policy, steps: int,
                batch: int, lr: float, generator: torch.Generator, momentum: float = 0.9, weight_decay: float = 5e-4,
                space: P.Space = P.Space()) -> Params:
    """``steps`` SGD steps on random batches of ``data`` augmented by ``policy``: the final training of
    a fresh model with a found policy (and of the baselines, with no policy or a random one)."""
    x, y = data
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    params = detach(params)
    for _ in range(steps):
        idx = batch_indices(len(y), batch, generator)
        params, velocity, loss = train_step(model, params, velocity, x[idx], y[idx], policy, generator, lr, momentum,
                                            weight_decay, space)
        if not math.isfinite(loss):
            from metaphi.train import NonFiniteLoss
            raise NonFiniteLoss(f"training loss became {loss}; lower --lr")
    return params


def accuracy(model: nn.Module, params: Params, x: Tensor, y: Tensor, chunk: int = 1000) -> float:
    """Accuracy in chunks of ``chunk`` images (the models' batch norm uses the chunk's statistics)."""
    return functional_accuracy(model, params, x, y, chunk)


# --- the search ---------------------------------------------------------------------------------------

@dataclass
class SearchConfig:
    method: str = "gradient"            # gradient | reinforce | es
    steps: int = 200
    batch: int = 32                     # training batch of the lookahead and of the model step
    val_batch: int = 100
    lr: float = 0.05                    # model SGD step size, also the lookahead step α
    momentum: float = 0.9
    weight_decay: float = 5e-4
    policy_lr: float = 0.05             # Adam step size of φ
    temperature: float = 0.5            # relaxed gates
    straight_through: bool = False
    init_prob: float = 0.2
    init_magnitude: float = 0.3
    samples: int = 4                    # REINFORCE choices per step
    population: int = 8                 # ES antithetic pairs per step
    sigma: float = 0.1                  # ES perturbation
    seed: int = 0
    space: dict = field(default_factory=lambda: P.Space().to_dict())

    def to_dict(self) -> dict:
        return asdict(self)


def build_search(model: nn.Module, config: SearchConfig):
    """(algorithm, estimator, φ) for ``config.method``."""
    from metaphi.outer import build_estimator
    if config.method not in METHODS:
        raise ValueError(f"unknown search method {config.method!r} (valid: {', '.join(METHODS)})")
    space = P.Space(**config.space)
    algo = LookaheadAugment(model, config.lr, space, config.temperature, config.straight_through,
                            "discrete" if config.method == "reinforce" else "relaxed")
    options = {"samples": config.samples} if config.method == "reinforce" else \
        {"population": 2 * config.population, "sigma": config.sigma, "loop": True} \
        if config.method == "es" else {"loop": True}
    estimator = build_estimator(ESTIMATOR_OF[config.method], options)
    if hasattr(estimator, "start"):
        estimator.start(config.seed)
    return algo, estimator, algo.init_meta_params(config.init_prob, config.init_magnitude)


def search(model: nn.Module, init: Params, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor],
           config: SearchConfig, checkpoint: str | None = None, checkpoint_every: int = 50,
           on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Search a policy; returns {"phi", "policy", "history", "wall_s", "config"}.

    One step of ``metaphi.train_online``: φ takes an Adam step (``TorchAdam``) on the estimator's
    gradient of the lookahead loss, then θ a momentum-SGD step on a batch augmented with the new
    policy. ``init``: the model's starting weights θ₀. With ``checkpoint`` the state is saved every
    ``checkpoint_every`` steps and at the end, and a search with the same configuration resumes from
    it. A non-finite loss stops with ``NonFiniteLoss`` (the last checkpoint is kept).
    ``on_step(step, record)`` after each step (``step`` from 1).
    """
    from metaphi import train_online

    algo, estimator, phi = build_search(model, config)
    policy_rule = TorchAdam(config.policy_lr)
    stateful = hasattr(estimator, "state_dict")
    (x, y), (xv, yv) = train, val

    def step(state: dict, t: int, g: torch.Generator) -> tuple[dict, dict]:
        idx, vidx = batch_indices(len(y), config.batch, g), batch_indices(len(yv), config.val_batch, g)
        noise = P.draw_noise(len(idx), x.shape[1:], g, x.dtype)
        task = lookahead_task(state["theta"], x[idx], y[idx], noise, xv[vidx], yv[vidx])
        if stateful:  # the estimator object is scratch: its state (seeded draws, baseline) lives in ours
            estimator.load_state_dict(state["estimator"])
        grads, metrics = estimator(algo, {k: v.detach().requires_grad_() for k, v in state["phi"].items()}, task)
        phi, phi_opt = policy_rule.update(state["phi"], grads, state["phi_opt"], {})
        idx = batch_indices(len(y), config.batch, g)
        theta, velocity, train_loss = train_step(model, state["theta"], state["velocity"], x[idx], y[idx],
                                                 algo.policy(phi), g, config.lr, config.momentum, config.weight_decay,
                                                 algo.space)
        new = {"theta": theta, "velocity": velocity, "phi": phi, "phi_opt": phi_opt,
               "estimator": estimator.state_dict() if stateful else None}
        return new, {"step": t + 1, "val_loss": metrics["loss"], "val_acc": metrics.get("val_acc"),
                     "train_loss": train_loss}

    theta = detach(init)
    start = {"theta": theta, "velocity": {k: torch.zeros_like(v) for k, v in theta.items()}, "phi": detach(phi),
             "phi_opt": policy_rule.init(phi), "estimator": estimator.state_dict() if stateful else None}
    cfg = config.to_dict()
    done = train_online.run(step, start, config.steps, seed=config.seed + 7919, checkpoint=checkpoint,
                            every=checkpoint_every, identity=cfg, on_step=on_step, hint="lower --lr or --policy-lr")
    phi = done["state"]["phi"]
    return {"phi": phi, "policy": algo.policy(phi), "history": done["history"], "wall_s": done["seconds"],
            "config": cfg}
