"""Black-box searchers: φ a handful of hyperparameters whose loss has no gradient.

A searcher proposes configurations and observes their scores (higher is better):
``propose(n) -> list[dict]`` and ``observe(configs, scores)``. It works on a *space* that says how
a configuration is encoded, with

* ``dims``: the names of its dimensions, in order;
* ``grid() -> {dim: [values]}``: a finite grid, and ``from_indices(indices)`` a point of it;
* ``from_unit(u)`` / ``to_unit(config)``: a continuous encoding in [0, 1]^len(dims).

The searchers are the estimators of ``metaphi.outer`` turned on hyperparameters:

* ``reinforce`` — a factorised categorical policy over the grid, updated by REINFORCE with a
  moving-average baseline (Williams 1992; metaphi.outer.reinforce);
* ``es`` — antithetic Gaussian ES with centred ranks on the unit encoding (Salimans et al. 2017;
  metaphi.outer.es);
* ``cma`` — CMA-ES on the unit encoding (Hansen 2016; needs the optional ``cma`` package);
* ``random`` — independent draws, the baseline every search should beat (Bergstra & Bengio 2012).

:func:`search` runs a budget of trials of an objective with one of them, the start first.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

METHODS = ("reinforce", "es", "cma", "random")


class RandomSearch:
    """Independent uniform draws on the unit encoding."""

    def __init__(self, space, generator: torch.Generator):
        self.space, self.generator = space, generator

    def propose(self, n: int) -> list[dict]:
        d = len(self.space.dims)
        return [self.space.from_unit(torch.rand(d, generator=self.generator, dtype=torch.float64)) for _ in range(n)]

    def observe(self, configs: list[dict], scores: list[float]) -> None:
        pass


class ReinforceSearch:
    """A categorical per dimension over the grid; logits follow REINFORCE on −score with Adam."""

    def __init__(self, space, generator: torch.Generator, lr: float = 0.2, decay: float = 0.8):
        from metaphi.outer.reinforce import baseline_init

        self.space, self.generator, self.decay = space, generator, decay
        sizes = [len(v) for v in space.grid().values()]
        self.logits = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in sizes]
        self.optimizer = torch.optim.Adam(self.logits, lr=lr)
        self.baseline = baseline_init()
        self._draws: list[torch.Tensor] = []

    def propose(self, n: int) -> list[dict]:
        from metaphi.outer.reinforce import sample

        self._draws = [sample(l, "categorical", self.generator, n) for l in self.logits]
        return [self.space.from_indices([d[i] for d in self._draws]) for i in range(n)]

    def observe(self, configs: list[dict], scores: list[float]) -> None:
        from metaphi.outer.reinforce import baseline_update, reinforce_gradient

        losses = -torch.tensor(scores, dtype=torch.float64)
        b = self.baseline["value"] if self.baseline["count"] else float(losses.mean())
        self.optimizer.zero_grad()
        for logits, z in zip(self.logits, self._draws):
            logits.grad = reinforce_gradient(logits, z[:len(scores)], losses, b, "categorical")
        self.optimizer.step()
        self.baseline = baseline_update(self.baseline, losses, self.decay)

    def probabilities(self) -> dict[str, list[float]]:
        return {d: torch.softmax(l.detach(), -1).tolist() for d, l in zip(self.space.dims, self.logits)}


class ESSearch:
    """Antithetic ES on the unit encoding, from the start configuration, with Adam on the centre."""

    def __init__(self, space, generator: torch.Generator, start: dict, sigma: float = 0.15, lr: float = 0.1):
        self.space, self.generator, self.sigma = space, generator, sigma
        self.center = space.to_unit(start).clone().requires_grad_()
        self.optimizer = torch.optim.Adam([self.center], lr=lr)
        self._noise = None

    def propose(self, n: int) -> list[dict]:
        from metaphi.outer.es import antithetic_noise

        pairs = max(1, n // 2)
        self._noise = antithetic_noise(pairs, len(self.space.dims), self.generator, torch.float64)
        c = self.center.detach()
        population = torch.cat([c + self.sigma * self._noise, c - self.sigma * self._noise])
        return [self.space.from_unit(u) for u in population][:n]

    def observe(self, configs: list[dict], scores: list[float]) -> None:
        from metaphi.outer.es import es_gradient

        if len(scores) != 2 * self._noise.shape[0]:
            return  # the budget cut a population short: a lone member has no antithetic partner
        self.optimizer.zero_grad()
        self.center.grad = es_gradient(-torch.tensor(scores, dtype=torch.float64), self._noise, self.sigma)
        self.optimizer.step()
        with torch.no_grad():
            self.center.clamp_(0, 1)


class CMASearch:
    """CMA-ES on the unit encoding, from the start configuration, ``round_size`` candidates a generation."""

    def __init__(self, space, generator: torch.Generator, start: dict, round_size: int = 4):
        from metaphi.outer.es import CMAES

        self.space = space
        self.cma = CMAES(space.to_unit(start).tolist(), 0.25, generator, popsize=max(round_size, 2), bounds=(0.0, 1.0))
        self._asked = None

    def propose(self, n: int) -> list[dict]:
        self._asked = self.cma.ask()
        return [self.space.from_unit(u) for u in self._asked][:n]

    def observe(self, configs: list[dict], scores: list[float]) -> None:
        if len(scores) == len(self._asked):
            self.cma.tell(self._asked, [-s for s in scores])


def make_searcher(method: str, space, generator: torch.Generator, start: dict, round_size: int):
    if method == "random":
        return RandomSearch(space, generator)
    if method == "reinforce":
        return ReinforceSearch(space, generator)
    if method == "es":
        return ESSearch(space, generator, start)
    if method == "cma":
        return CMASearch(space, generator, start, round_size)
    raise ValueError(f"unknown search method '{method}' (valid: {', '.join(METHODS)})")


def _key(space, config: dict) -> tuple:
    return tuple(round(config[d], 12) if isinstance(config[d], float) else config[d] for d in space.dims)


def search(objective: Callable[[dict], dict], space, budget: int, method: str, generator: torch.Generator,
           start: dict, round_size: int = 4, on_trial: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``budget`` trials: ``start`` first, then rounds of ``round_size`` proposals of ``method``.

    ``objective(config)`` returns a dict with ``score`` (higher is better). A configuration proposed
    again is not re-run (every trial starts from the same seed, so it would score the same); it still
    counts toward the budget, so a converged search ends. Returns the trial records in order.
    """
    searcher = make_searcher(method, space, generator, start, round_size)
    cache: dict[tuple, dict] = {}
    trials: list[dict] = []

    def run(config: dict, proposer: str) -> dict:
        key = _key(space, config)
        cached = key in cache
        if not cached:
            cache[key] = objective(config)
        record = {"trial": len(trials), "proposer": proposer, "cached": cached, **config, **cache[key]}
        trials.append(record)
        if on_trial:
            on_trial(record)
        return record

    run(dict(start), "default")
    while len(trials) < budget:
        n = min(round_size, budget - len(trials))
        configs = searcher.propose(n)
        scores = [run(c, method)["score"] for c in configs]
        # a failed trial (a diverging run) ranks below every finished one
        finite = [s for s in scores if math.isfinite(s)]
        floor = (min(finite) - 1.0) if finite else -1.0
        searcher.observe(configs, [s if math.isfinite(s) else floor for s in scores])
    return trials


def best_trial(trials: list[dict]) -> dict:
    """The finished trial with the highest score."""
    finished = [t for t in trials if math.isfinite(t["score"])]
    if not finished:
        raise RuntimeError("every trial diverged; narrow the search space")
    return max(finished, key=lambda t: t["score"])
