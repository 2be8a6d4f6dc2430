"""Black-box architecture search: REINFORCE, regularized evolution and random search.

All three search the genotypes of metaphi/nas/space.py (``DiscreteSpace``: the architectures DARTS
can export) and judge an architecture the same way: its network is trained from scratch for a few
steps on the training split and scored by its validation accuracy (``ChildFitness``). The score is a
deterministic function of the architecture and the search seed (the child's weights and batches are
drawn from a seed derived from both), so two searchers that meet the same architecture see the same
number.

* **REINFORCE** (in the style of Zoph & Le 2017, "Neural Architecture Search with Reinforcement
  Learning"): a controller p_φ over the decisions of an architecture, trained on the score-function
  gradient E[(L(z) − b) ∇_φ log p_φ(z)] with L = validation error and b a moving average of past
  errors. Zoph & Le's controller is an LSTM that emits the decisions one after another; here it is
  one categorical distribution per decision (independent logits), which is what
  ``metaphi.outer.reinforce.Reinforce`` estimates: ``ChildFitness`` is an algorithm whose φ is the
  logits (``discrete``) and whose task loss is the child's validation error, so the library's own
  estimator, with its seeded draws, baseline and checkpointable state, trains the controller.
* **Regularized evolution** (Real, Aggarwal, Huang & Le 2019, "Regularized Evolution for Image
  Classifier Architecture Search", Algorithm 1): a population of P architectures starts uniformly
  at random; each cycle samples S of them, mutates the best of the sample (one decision, an input
  set or an operation, changed to another value) and adds the child while the *oldest* member dies.
  Ageing instead of killing the worst is the regularization.
* **Random search**: architectures drawn uniformly (every decision uniform, so every genotype is
  equally likely), the best by validation accuracy kept; the baseline of Li & Talwalkar 2019.

The result of each is the architecture with the best validation score seen.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from typing import Callable, Sequence

import torch
from torch import Tensor

from metaphi.functional import Params
from metaphi.inner import Unroll
from metaphi.outer.es import derived_seed
from metaphi.tasks import Task
from metaphi.nas.child import Split, TrainSettings, accuracy, train
from metaphi.nas.space import DiscreteSpace, Genotype, Network, NetworkConfig, init_params

METHODS = ("reinforce", "evolution", "random")


def genotype_seed(genotype: Genotype, seed: int) -> int:
    """A seed that depends on the architecture and the search seed only."""
    digest = hashlib.sha256(repr(genotype.to_dict()).encode()).digest()
    return derived_seed(seed, int.from_bytes(digest[:7], "little"))


class ChildFitness:
    """Trains an architecture's network from scratch for ``settings.steps`` steps on a task's support
    (the training split) and scores it on its query (the validation split).

    As an algorithm for ``metaphi.outer.reinforce.Reinforce``: φ holds one vector of logits per
    decision of the space (``policy.<decision>``, listed in ``discrete``), and ``task_loss`` reads
    the chosen architecture off φ's one-hot entries and returns its validation error (not
    differentiable; use ``pathwise=False``). Every architecture scored is appended to ``evaluated``.
    """

    name = "child-training"
    estimators = ("reinforce",)

    def __init__(self, space: DiscreteSpace, config: NetworkConfig, settings: TrainSettings, seed: int):
        self.space, self.config, self.settings, self.seed = space, config, settings, int(seed)
        self.discrete = {f"policy.{name}": "categorical" for name, _ in space.decisions}
        self.evaluated: list[dict] = []

    def init_meta_params(self) -> Params:
        return {f"policy.{name}": torch.zeros(n, dtype=torch.float64, requires_grad=True)
                for name, n in self.space.decisions}

    def score(self, choice: Sequence[int], train_split: Split, val_split: Split) -> dict:
        genotype = self.space.decode(choice)
        seed = genotype_seed(genotype, self.seed)
        started = time.perf_counter()
        net = Network(self.config, genotype)
        params = init_params(net, torch.Generator().manual_seed(derived_seed(seed, -1)), train_split[0].dtype)
        params = train(net, params, train_split, self.settings, seed)
        row = {"choice": [int(c) for c in choice], "genotype": genotype.to_dict(),
               "val_acc": accuracy(net, params, val_split), "seconds": time.perf_counter() - started}
        self.evaluated.append(row)
        return row

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        choice = [int(phi[k].argmax()) for k in self.discrete]
        row = self.score(choice, task.support, task.query)
        return (torch.tensor(1.0 - row["val_acc"], dtype=torch.float64),
                {"accuracy": torch.tensor(row["val_acc"], dtype=torch.float64)})


def mutate(space: DiscreteSpace, choice: Sequence[int], generator: torch.Generator) -> list[int]:
    """One decision with more than one option, changed to a different value (uniformly)."""
    free = [i for i, (_, n) in enumerate(space.decisions) if n > 1]
    i = free[int(torch.randint(len(free), (1,), generator=generator))]
    n = space.decisions[i][1]
    new = int(torch.randint(n - 1, (1,), generator=generator))
    out = list(choice)
    out[i] = new if new < choice[i] else new + 1
    return out


class RandomSearch:
    name = "random"

    def __init__(self, space: DiscreteSpace):
        self.space = space

    def ask(self, generator: torch.Generator) -> list[int]:
        return self.space.uniform(generator)

    def tell(self, choice: Sequence[int], val_acc: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RegularizedEvolution:
    """Real et al. 2019, Algorithm 1: population ``population``, tournament of ``sample``, oldest dies."""

    name = "evolution"

    def __init__(self, space: DiscreteSpace, population: int = 8, sample: int = 3):
        if population < 2 or not 1 <= sample <= population:
            raise ValueError(f"evolution needs population >= 2 and 1 <= sample <= population, got "
                             f"{population} and {sample}")
        self.space, self.population, self.sample = space, population, sample
        self.members: deque = deque()  # (choice, val_acc), oldest first

    def ask(self, generator: torch.Generator) -> list[int]:
        if len(self.members) < self.population:
            return self.space.uniform(generator)
        picks = torch.randperm(len(self.members), generator=generator)[:self.sample].tolist()  # S distinct
        parent = max((self.members[i] for i in picks), key=lambda m: m[1])
        return mutate(self.space, parent[0], generator)

    def tell(self, choice: Sequence[int], val_acc: float) -> None:
        self.members.append((list(choice), float(val_acc)))
        if len(self.members) > self.population:
            self.members.popleft()

    def state_dict(self) -> dict:
        return {"members": [list(m) for m in self.members]}

    def load_state_dict(self, state: dict) -> None:
        self.members = deque((list(c), float(a)) for c, a in state["members"])


def search(method: str, config: NetworkConfig, data: dict[str, Split], candidates: int, child: TrainSettings,
           seed: int, controller_lr: float = 0.1, samples: int = 1, decay: float = 0.9, population: int = 8,
           tournament: int = 3, checkpoint: str | None = None, progress: Callable | None = None) -> dict:
    """Score ``candidates`` architectures with ``method`` (one of ``METHODS``); returns {"genotype"
    (the best by validation accuracy), "val_acc", "history", "seconds", "grad_evals"}.

    Candidate i of random search and evolution draws from ``derived_seed(seed, i)``; REINFORCE's draws
    come from the estimator's own seeded stream. With ``checkpoint`` the state is saved after every
    candidate (REINFORCE: every controller update) and a run resumes from it to the same result."""
    from metaphi import checkpoint as ck
    from metaphi.outer.reinforce import Reinforce

    if method not in METHODS:
        raise ValueError(f"unknown black-box method '{method}' (valid: {', '.join(METHODS)})")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    space = DiscreteSpace(config.nodes, config.ops)
    fitness = ChildFitness(space, config, child, seed)
    run = {"method": method, "config": config.to_dict(), "candidates": candidates, "child": child.to_dict(),
           "seed": seed, "controller_lr": controller_lr, "samples": samples, "decay": decay,
           "population": population, "tournament": tournament}
    state = {"done": 0, "seconds": 0.0}
    if method == "reinforce":
        if candidates % samples:
            raise ValueError(f"REINFORCE scores {samples} architectures per update; candidates ({candidates}) "
                             "must be a multiple of it")
        estimator = Reinforce(samples=samples, decay=decay, pathwise=False)
        estimator.start(seed)
        phi = fitness.init_meta_params()
        opt = torch.optim.Adam(list(phi.values()), lr=controller_lr)
        searcher = None
    else:
        searcher = RandomSearch(space) if method == "random" else RegularizedEvolution(space, population, tournament)
    if checkpoint and os.path.exists(checkpoint):
        saved = ck.load(checkpoint)
        if saved["run"] != run:
            raise ValueError(f"{checkpoint} holds a different search; use another --out or delete it")
        state, fitness.evaluated = saved["state"], saved["evaluated"]
        if searcher is None:
            estimator.load_state_dict(saved["estimator"])
            with torch.no_grad():
                for k in phi:
                    phi[k].copy_(saved["phi"][k])
            opt.load_state_dict(saved["opt"])
        else:
            searcher.load_state_dict(saved["searcher"])

    def save():
        if checkpoint:
            extra = ({"estimator": estimator.state_dict(), "phi": {k: v.detach() for k, v in phi.items()},
                      "opt": opt.state_dict()} if searcher is None else {"searcher": searcher.state_dict()})
            ck.save({"run": run, "state": state, "evaluated": fitness.evaluated, **extra}, checkpoint)

    task = Task.stack([Task(data["train"], data["val"])]) if searcher is None else None
    started = time.perf_counter() - state["seconds"]
    while state["done"] < candidates:
        if searcher is None:
            grads, _ = estimator(fitness, phi, task)
            opt.zero_grad()
            for k, v in phi.items():
                v.grad = grads[k]
            opt.step()
            state["done"] += samples
        else:
            choice = searcher.ask(torch.Generator().manual_seed(derived_seed(seed, state["done"])))
            row = fitness.score(choice, data["train"], data["val"])
            searcher.tell(choice, row["val_acc"])
            state["done"] += 1
        state["seconds"] = time.perf_counter() - started
        if progress is not None:
            progress(state["done"], fitness.evaluated[-1])
        save()
    best = max(fitness.evaluated, key=lambda r: r["val_acc"])  # first of the ties: the earliest found
    out = {"genotype": Genotype.from_dict(best["genotype"]), "val_acc": best["val_acc"],
           "history": fitness.evaluated, "seconds": state["seconds"],
           "grad_evals": candidates * (child.steps + 1)}
    if searcher is None:
        out["policy"] = {k: v.detach().tolist() for k, v in phi.items()}
    return out
