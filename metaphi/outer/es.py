"""Evolution strategies: an update of φ from loss values alone, for losses with no usable gradient.

Gaussian smoothing (Nesterov & Spokoiny 2017) replaces the loss of the learning algorithm L(φ) by

    L_σ(φ) = E_{ε ~ N(0, I)} L(φ + σε),      ∇L_σ(φ) = (1/σ) E[L(φ + σε) ε],

whose gradient needs only values of L. With n antithetic pairs (φ ± σε_i), as in Salimans et al.
2017 ("Evolution Strategies as a Scalable Alternative to Reinforcement Learning"),

    g = 1/(2nσ) Σ_i [L(φ + σε_i) − L(φ − σε_i)] ε_i,

so any part of L that is the same for both members of a pair (a constant, an even function of the
perturbation) cancels exactly within the pair instead of only in expectation. Fitness shaping
(Wierstra et al. 2014, "Natural Evolution Strategies") replaces each L by its centred rank in the
population, a number in [−0.5, 0.5]: the update then ignores the scale of L and any monotone
transform of it, and one outlier task cannot dominate. For a Gaussian ε, E[h(g·ε) ε] ∝ g for any
increasing h, so in the small-σ limit the ranked estimate still points along ∇L.

Used on MAML's loss (the query loss after inner adaptation) this is ES-MAML (Song et al. 2020,
"ES-MAML: Simple Hessian-Free Meta Learning"): no second derivatives, and the inner loop may be
anything, differentiable or not.

For a φ of a few dimensions (hyperparameters, a handful of scalars), ``CMAES`` wraps CMA-ES
(Hansen & Ostermeier 2001) from the optional ``cma`` package (``pip install metaphi[cma]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from metaphi.algorithms.base import check_first_step
from metaphi.config import UsageError, option
from metaphi.functional import Params
from metaphi.inner import FIRST_ORDER
from metaphi.tasks import Task

LOOP_HELP = ("run one by one what otherwise runs as one vmap batch (the tasks of a meta-batch; for ES, the "
             "population): same result, less memory")
SEED_HELP = "seed of the estimator's own random draws (none: the run's --seed)"

#: keeps the perturbation stream of a run apart from its task stream, which is seeded with the same number
_STREAM = 0x5DEECE66D


def derived_seed(seed: int, step: int) -> int:
    """A seed for step ``step`` of a stream seeded ``seed``: any step can be replayed without the others."""
    return (int(seed) * 6364136223846793005 + int(step) * 1442695040888963407 + _STREAM) % (2 ** 63)


class SeededSteps:
    """Randomness of an estimator that draws afresh at every call: call t uses a generator seeded with
    ``derived_seed(seed, t)``. ``start(seed)`` (the trainer calls it with the run's seed on a fresh run)
    resets t, unless a seed was fixed at construction; ``state_dict``/``load_state_dict`` carry (seed, t)
    through checkpoints, so a resumed run draws what an uninterrupted one would have."""

    def _init_seed(self, seed: int | None) -> None:
        self.fixed_seed = seed
        self.seed = 0 if seed is None else int(seed)
        self.step = 0

    def start(self, seed: int) -> None:
        self.seed = int(seed) if self.fixed_seed is None else self.fixed_seed
        self.step = 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def generator(self) -> torch.Generator:
        """The generator of the current call (does not advance t)."""
        return torch.Generator().manual_seed(derived_seed(self.seed, self.step))


def centered_ranks(values: Tensor) -> Tensor:
    """The rank of each value, scaled to [−0.5, 0.5] (smallest −0.5, largest 0.5)."""
    n = values.numel()
    ranks = torch.empty(n, dtype=torch.float64, device=values.device)
    ranks[torch.argsort(values.flatten())] = torch.arange(n, dtype=torch.float64, device=values.device)
    return (ranks / max(n - 1, 1) - 0.5).view(values.shape)


def shape_fitness(losses: Tensor, shaping: str) -> Tensor:
    if shaping == "centered_ranks":
        return centered_ranks(losses)
    if shaping == "none":
        return losses.double()
    raise ValueError(f"unknown fitness shaping '{shaping}' (valid: centered_ranks, none)")


def antithetic_noise(pairs: int, dim: int, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """ε [pairs, dim]; the population is φ + σε followed by φ − σε."""
    return torch.randn(pairs, dim, generator=generator, dtype=dtype)


def es_gradient(losses: Tensor, noise: Tensor, sigma: float, shaping: str = "centered_ranks") -> Tensor:
    """The antithetic estimate of ∇L from the losses [2n] of φ + σε_i (first n) and φ − σε_i (last n)."""
    pairs = noise.shape[0]
    if losses.shape != (2 * pairs,):
        raise ValueError(f"expected {2 * pairs} losses for {pairs} antithetic pairs, got {tuple(losses.shape)}")
    u = shape_fitness(losses, shaping)
    diff = (u[:pairs] - u[pairs:]).to(noise.dtype)
    return (diff[:, None] * noise).sum(0) / (2 * pairs * sigma)


def es_step(loss_fn: Callable[[Tensor], Tensor], theta: Tensor, sigma: float, pairs: int, generator: torch.Generator,
            shaping: str = "centered_ranks") -> tuple[Tensor, Tensor]:
    """One ES estimate at ``theta`` [D]: ``loss_fn`` maps a population [P, D] to its losses [P].

    Returns (gradient estimate [D], population losses [2·pairs]).
    """
    noise = antithetic_noise(pairs, theta.numel(), generator, theta.dtype).to(theta.device)
    population = torch.cat([theta + sigma * noise, theta - sigma * noise])
    losses = loss_fn(population)
    return es_gradient(losses, noise, sigma, shaping), losses


# φ as one flat vector and back: the noise lives in the flat space
def flatten(phi: Params, keys: Sequence[str]) -> Tensor:
    return torch.cat([phi[k].detach().reshape(-1) for k in keys])


def unflatten(flat: Tensor, like: Params, keys: Sequence[str]) -> Params:
    """Slice a vector [..., D] back into φ's shapes; leading dims (a population) are kept."""
    out, i = {}, 0
    lead = flat.shape[:-1]
    for k in keys:
        n = like[k].numel()
        out[k] = flat[..., i:i + n].reshape(tuple(lead) + tuple(like[k].shape))  # a scalar entry too
        i += n
    return out


class EvolutionStrategies(SeededSteps):
    """The ES estimator: ``(algorithm, phi, tasks) -> (grads, metrics)`` from task-loss values only.

    ``population`` perturbations (an even number: population/2 antithetic pairs) of the entries of φ
    whose names start with one of ``prefixes`` (all of φ by default; other entries get zero) are each
    scored by the mean task loss over the meta-batch; every member sees the same tasks, so task-to-task
    noise cancels between members. The unperturbed φ is scored too, for the reported loss and metrics.

    ``vectorize``: members are scored as one ``vmap`` batch (over members, then tasks), ``chunk``
    members at a time; if the task loss cannot run under ``vmap`` the estimator falls back to a loop
    for the rest of the run. Results are the same either way.

    Randomness: the perturbations of call t come from a generator seeded with
    ``derived_seed(seed, t)``. ``start(seed)`` (the trainer calls it with the run's seed on a fresh
    run) resets t; ``state_dict``/``load_state_dict`` carry (seed, t) through checkpoints, so a
    resumed run draws the same perturbations as an uninterrupted one.
    """

    name = "es"

    def __init__(self, population: int = 32, sigma: float = 0.01, shaping: str = "centered_ranks",
                 seed: int | None = None, vectorize: bool = True, chunk: int | None = None,
                 prefixes: Sequence[str] | None = None):
        if population < 2 or population % 2:
            raise ValueError(f"population must be an even number >= 2 (antithetic pairs), got {population}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        shape_fitness(torch.zeros(2), shaping)  # fail now on a bad name, not at the first step
        self.population, self.sigma, self.shaping = population, float(sigma), shaping
        self._init_seed(seed)
        self.vectorize, self.chunk = vectorize, chunk
        self.prefixes = tuple(prefixes) if prefixes else None
        self._vmap_ok = True

    # -- scoring a population ---------------------------------------------------------------
    def _keys(self, phi: Params) -> list[str]:
        if self.prefixes is None:
            return list(phi)
        keys = [k for k in phi if any(k == p or k.startswith(p + ".") for p in self.prefixes)]
        if not keys:
            raise ValueError(f"no entry of φ starts with {', '.join(self.prefixes)} (φ has {', '.join(phi)})")
        return keys

    @staticmethod
    def _member_loss(algorithm, phi: Params, tasks: Task, vectorize: bool) -> tuple[Tensor, dict[str, Tensor]]:
        if vectorize:
            losses, metrics = torch.func.vmap(lambda t: algorithm.task_loss(phi, t, FIRST_ORDER),
                                              randomness="different")(tasks)  # dropout: its own draws per task
            return losses.mean(), {k: v.mean() for k, v in metrics.items()}
        parts = [algorithm.task_loss(phi, t, FIRST_ORDER) for t in tasks.unstack()]
        losses = torch.stack([p[0] for p in parts])
        return losses.mean(), {k: torch.stack([p[1][k] for p in parts]).mean() for k in parts[0][1]}

    def population_losses(self, algorithm, phi: Params, keys: Sequence[str], members: Tensor, tasks: Task
                          ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean task loss [P] (and metrics [P]) of φ with ``keys`` set to each row of ``members`` [P, D]."""
        fixed = {k: v.detach() for k, v in phi.items() if k not in keys}
        batched = unflatten(members, phi, keys)
        if self.vectorize and self._vmap_ok:
            chunk = self.chunk or members.shape[0]
            try:
                outs = [torch.func.vmap(lambda m: self._member_loss(algorithm, {**fixed, **m}, tasks, True))(
                            {k: v[i:i + chunk] for k, v in batched.items()})
                        for i in range(0, members.shape[0], chunk)]
                return (torch.cat([o[0] for o in outs]),
                        {k: torch.cat([o[1][k] for o in outs]) for k in outs[0][1]})
            except RuntimeError:
                # a task loss with data-dependent control flow or an op vmap lacks: score members one by one
                self._vmap_ok = False
        rows = [self._member_loss(algorithm, {**fixed, **{k: v[i] for k, v in batched.items()}}, tasks, False)
                for i in range(members.shape[0])]
        return torch.stack([r[0] for r in rows]), {k: torch.stack([r[1][k] for r in rows]) for k in rows[0][1]}

    # -- the estimate ----------------------------------------------------------------------
    def __call__(self, algorithm, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        check_first_step(algorithm, tasks, vmapped=False)  # a task loss vmap cannot run is scored in a loop
        keys = self._keys(phi)
        theta = flatten(phi, keys)
        noise = antithetic_noise(self.population // 2, theta.numel(), self.generator(), theta.dtype).to(theta.device)
        self.step += 1
        members = torch.cat([theta + self.sigma * noise, theta - self.sigma * noise, theta[None]])
        with torch.no_grad():
            losses, metrics = self.population_losses(algorithm, phi, keys, members, tasks)
        flat_grad = es_gradient(losses[:-1], noise, self.sigma, self.shaping)
        grads = {k: torch.zeros_like(v) for k, v in phi.items()}
        grads.update({k: v.detach() for k, v in unflatten(flat_grad, phi, keys).items()})
        out = {"loss": float(losses[-1]), **{k: float(v[-1]) for k, v in metrics.items()},
               "es_spread": float(losses[:-1].std())}
        return grads, out


class CMAES:
    """CMA-ES (Hansen & Ostermeier 2001) for a small φ, as ask/tell over a flat vector.

    A thin layer over the ``cma`` package with the randomness taken from ``generator`` (never the
    global NumPy state) and losses minimised. ``bounds`` = (low, high) clips the search box.
    """

    def __init__(self, x0: Sequence[float], sigma0: float, generator: torch.Generator, popsize: int | None = None,
                 bounds: tuple[float, float] | None = None):
        try:
            import cma
        except ImportError as e:  # optional extra
            raise ImportError("CMA-ES needs the 'cma' package: pip install 'metaphi[cma]'") from e
        self._generator = generator
        opts = {"randn": self._randn, "seed": math.nan, "verbose": -9, "verb_log": 0, "verb_disp": 0}
        if popsize:
            opts["popsize"] = int(popsize)
        if bounds is not None:
            opts["bounds"] = [bounds[0], bounds[1]]
        self.es = cma.CMAEvolutionStrategy([float(x) for x in x0], float(sigma0), opts)

    def _randn(self, *shape):
        return torch.randn(*shape, generator=self._generator, dtype=torch.float64).numpy()

    @property
    def popsize(self) -> int:
        return int(self.es.popsize)

    @property
    def mean(self) -> Tensor:
        return torch.as_tensor(self.es.mean, dtype=torch.float64)

    def ask(self) -> Tensor:
        import numpy as np

        return torch.as_tensor(np.array(self.es.ask()), dtype=torch.float64)

    def tell(self, candidates: Tensor, losses: Sequence[float]) -> None:
        self.es.tell([c.numpy() for c in candidates.double()], [float(v) for v in losses])


@dataclass
class ESOptions:
    """Settings of the evolution-strategies estimator."""

    population: int = option(32, "ES: perturbed copies of φ scored per step (antithetic pairs, so even)",
                             check="positive")
    sigma: float = option(0.01, "ES: standard deviation of the perturbations", check="positive")
    shaping: str = option("centered_ranks", "ES: fitness shaping of the losses", choices=("centered_ranks", "none"))
    population_chunk: int | None = option(None, "ES: score at most this many members per vmap batch (none: all)",
                                          check="positive", metavar="N")
    perturb: list[str] | None = option(None, "ES: perturb only the entries of φ named by these prefixes, e.g. "
                                       "init.head (none: all of φ)")
    estimator_seed: int | None = option(None, SEED_HELP)
    loop: bool = option(False, LOOP_HELP)


def es(options: ESOptions) -> EvolutionStrategies:
    if options.population < 2 or options.population % 2:
        raise UsageError(f"--population must be an even number >= 2 (antithetic pairs), got {options.population}")
    if options.population_chunk is not None and options.loop:
        raise UsageError("--population-chunk splits the vmap batch of the population; it does not apply with --loop")
    return EvolutionStrategies(options.population, options.sigma, options.shaping, options.estimator_seed,
                               not options.loop, options.population_chunk, options.perturb)
