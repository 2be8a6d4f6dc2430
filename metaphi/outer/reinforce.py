"""REINFORCE: an update of discrete meta-parameters from sampled choices and their losses.

When a part of φ is a choice (which update rule, how many inner steps, an operation per edge of an
architecture, an augmentation on or off), φ holds the logits of a distribution p_φ over it, and the
loss of the learning algorithm is the expected loss of a sampled choice z ~ p_φ. The score-function
identity (Williams 1992, "Simple Statistical Gradient-Following Algorithms for Connectionist
Reinforcement Learning") gives its gradient from losses alone:

    ∇_φ E_z[L(z)] = E_z[(L(z) − b) ∇_φ log p_φ(z)]

for any b that does not depend on z; b is a moving average of past losses, which keeps the
estimate unbiased while removing most of its variance. For logits,

    categorical:  ∇_logits log p(z) = onehot(z) − softmax(logits)
    Bernoulli:    ∇_logits log p(z) = z − sigmoid(logits)

Each piece is a small pure function (``sample``, ``score``); the baseline is a state passed in and
out (``baseline_init``, ``baseline_update``). ``Reinforce`` puts them together as an estimator for
algorithms that declare which entries of φ are logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from metaphi.config import UsageError, option
from metaphi.functional import Params, grads_or_zeros
from metaphi.tasks import Task
from metaphi.outer.es import SEED_HELP, SeededSteps

KINDS = ("categorical", "bernoulli")


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown distribution '{kind}' (valid: {', '.join(KINDS)})")


def sample(logits: Tensor, kind: str, generator: torch.Generator, n: int | None = None) -> Tensor:
    """Draws from p(logits): category indices [n, *batch] (categorical, last dim = categories) or 0/1
    values [n, *shape] (Bernoulli). Without ``n``, one draw without the leading dim."""
    _check(kind)
    count = 1 if n is None else n
    logits = logits.detach().cpu().double()
    if kind == "categorical":
        probs = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
        draws = torch.multinomial(probs, count, replacement=True, generator=generator)  # [batch, n]
        out = draws.T.reshape(count, *logits.shape[:-1])
    else:
        out = (torch.rand(count, *logits.shape, generator=generator, dtype=torch.float64)
               < torch.sigmoid(logits)).double()
    return out[0] if n is None else out


def as_value(logits: Tensor, z: Tensor, kind: str) -> Tensor:
    """The choice ``z`` in the shape of ``logits``: one-hot for a category, 0/1 for a Bernoulli."""
    _check(kind)
    if kind == "categorical":
        return torch.nn.functional.one_hot(z.long(), logits.shape[-1]).to(logits.dtype).to(logits.device)
    return z.to(logits.dtype).to(logits.device)


def score(logits: Tensor, z: Tensor, kind: str) -> Tensor:
    """∇_logits log p_logits(z), in the shape of ``logits`` (with z's leading sample dims)."""
    _check(kind)
    logits = logits.detach()
    if kind == "categorical":
        return as_value(logits, z, kind) - torch.softmax(logits, -1)
    return as_value(logits, z, kind) - torch.sigmoid(logits)


def log_prob(logits: Tensor, z: Tensor, kind: str) -> Tensor:
    _check(kind)
    if kind == "categorical":
        return (as_value(logits, z, kind) * torch.log_softmax(logits, -1)).sum(-1)
    return -torch.nn.functional.binary_cross_entropy_with_logits(logits.expand_as(z.to(logits.dtype)),
                                                                 z.to(logits.dtype), reduction="none")


def baseline_init() -> dict:
    return {"value": 0.0, "count": 0}


def baseline_update(state: Mapping, losses: Tensor, decay: float) -> dict:
    """b ← decay·b + (1 − decay)·mean(losses), started at the first mean so early steps are not biased to 0."""
    mean = float(losses.double().mean())
    if state["count"] == 0:
        return {"value": mean, "count": 1}
    return {"value": decay * state["value"] + (1 - decay) * mean, "count": state["count"] + 1}


def reinforce_gradient(logits: Tensor, z: Tensor, losses: Tensor, baseline: float, kind: str) -> Tensor:
    """The estimate of ∇_logits E[L] from samples z [n, ...] and their losses [n]."""
    s = score(logits, z, kind)  # [n, *logits.shape]
    adv = (losses.double() - baseline).to(s.dtype).view(-1, *[1] * (s.dim() - 1))
    return (adv * s).mean(0)


class Reinforce(SeededSteps):
    """The REINFORCE estimator: ``(algorithm, phi, tasks) -> (grads, metrics)``.

    The algorithm names the logits in φ with ``algorithm.discrete = {key: "categorical" | "bernoulli"}``
    and lists ``"reinforce"`` in its ``estimators``. Each call draws ``samples`` choices z; for each,
    φ's logits are replaced by the choice (one-hot or 0/1) and the mean task loss of the meta-batch is
    computed. The logits get the REINFORCE estimate with a moving-average baseline (``decay``); the
    other entries of φ get the ordinary gradient of the mean loss over the samples (pathwise), or zero
    with ``pathwise=False`` (a task loss that cannot be differentiated).

    Randomness and checkpoints as in ``EvolutionStrategies``: call t draws from
    ``derived_seed(seed, t)``; ``start``, ``state_dict`` and ``load_state_dict`` hold the seed, t and
    the baseline.
    """

    name = "reinforce"

    def __init__(self, samples: int = 4, decay: float = 0.9, pathwise: bool = True, seed: int | None = None):
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.samples, self.decay, self.pathwise = samples, float(decay), pathwise
        self._init_seed(seed)
        self.baseline = baseline_init()

    def start(self, seed: int) -> None:
        super().start(seed)
        self.baseline = baseline_init()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "baseline": dict(self.baseline)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.baseline = dict(state["baseline"])

    def __call__(self, algorithm, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        discrete = dict(getattr(algorithm, "discrete", {}) or {})
        if not discrete:
            raise ValueError(f"{algorithm.name} declares no discrete meta-parameters (algorithm.discrete); "
                             "REINFORCE has nothing to sample")
        for kind in discrete.values():
            _check(kind)
        generator = self.generator()
        self.step += 1
        draws = {k: sample(phi[k], kind, generator, self.samples) for k, kind in discrete.items()}
        continuous = {k: v for k, v in phi.items() if k not in discrete}
        losses, sums = [], {}
        total = 0.0
        for i in range(self.samples):
            chosen = {k: as_value(phi[k], draws[k][i], kind) for k, kind in discrete.items()}
            parts = [algorithm.task_loss({**continuous, **chosen}, t) for t in tasks.unstack()]
            loss = torch.stack([p[0] for p in parts]).mean()
            total = total + loss
            losses.append(loss.detach())
            for name in parts[0][1]:
                sums[name] = sums.get(name, 0.0) + float(torch.stack([p[1][name] for p in parts]).mean())
        losses_t = torch.stack(losses)
        grads = {k: torch.zeros_like(v) for k, v in phi.items()}
        if self.pathwise and any(v.requires_grad for v in continuous.values()) and total.requires_grad:
            grads.update(grads_or_zeros(total / self.samples, continuous))
        baseline = self.baseline["value"] if self.baseline["count"] else float(losses_t.mean())
        for k, kind in discrete.items():
            grads[k] = reinforce_gradient(phi[k], draws[k], losses_t, baseline, kind).to(phi[k].dtype)
        self.baseline = baseline_update(self.baseline, losses_t, self.decay)
        return grads, {"loss": float(losses_t.mean()), **{k: v / self.samples for k, v in sums.items()},
                       "baseline": float(self.baseline["value"])}


@dataclass
class ReinforceOptions:
    """Settings of the REINFORCE estimator."""

    samples: int = option(4, "REINFORCE: choices sampled per step", check="positive")
    decay: float = option(0.9, "REINFORCE: decay of the moving-average baseline, in [0, 1)", check="unit")
    pathwise: bool = option(True, "REINFORCE: the continuous entries of φ get the gradient of the mean loss "
                            "(--no-pathwise: zero, for a task loss that cannot be differentiated)")
    estimator_seed: int | None = option(None, SEED_HELP)


def reinforce(options: ReinforceOptions) -> Reinforce:
    if not options.decay < 1:
        raise UsageError(f"--decay must be in [0, 1), got {options.decay}")
    return Reinforce(options.samples, options.decay, options.pathwise, options.estimator_seed)
