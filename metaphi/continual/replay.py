"""Experience replay with a fixed memory (Chaudhry et al. 2019, "On Tiny Episodic Memories in
Continual Learning"; Rolnick et al. 2019).

A memory of at most M examples is filled by reservoir sampling (Vitter 1985, Algorithm R): the n-th
example of the stream enters with probability M/n, replacing a uniformly chosen slot, so at every
moment the memory is a uniform sample of everything seen so far without knowing the stream's
length or its experience boundaries. Each SGD step is on the current mini-batch B joined with a
mini-batch R drawn uniformly from the memory:

    θ ← θ − η ∇_θ ℓ(θ; B ∪ R),   then B is offered to the reservoir.

The memory is plain data in the learner's state (uint8 images and labels), saved with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metaphi.config import option
from metaphi.continual.finetune import FinetuneOptions
from metaphi.continual.net import grad, minibatches, sgd


def empty_memory(image_shape, capacity: int) -> dict:
    return {"x": torch.zeros((0, *image_shape), dtype=torch.uint8), "y": torch.zeros(0, dtype=torch.int64),
            "seen": 0, "capacity": int(capacity)}


def reservoir_add(memory: dict, x: Tensor, y: Tensor, generator: torch.Generator) -> dict:
    """The memory after offering the examples ``x, y`` one by one (Algorithm R); a new dict."""
    mx, my, seen, cap = memory["x"].clone(), memory["y"].clone(), memory["seen"], memory["capacity"]
    for i in range(len(y)):
        seen += 1
        if len(my) < cap:
            mx, my = torch.cat([mx, x[i:i + 1]]), torch.cat([my, y[i:i + 1]])
        else:
            j = int(torch.randint(seen, (1,), generator=generator))
            if j < cap:
                mx[j], my[j] = x[i], y[i]
    return {**memory, "x": mx, "y": my, "seen": seen}


def memory_sample(memory: dict, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` examples drawn uniformly without replacement (all of them if the memory holds fewer)."""
    size = len(memory["y"])
    idx = torch.randperm(size, generator=generator)[:n]
    return memory["x"][idx], memory["y"][idx]


@dataclass
class ReplayOptions(FinetuneOptions):
    memory: int = option(100, "examples in memory", check="positive")
    replay_batch: int | None = option(None, "memory examples per step (none: --batch)",
                                      check="positive")


class Replay:
    name = "replay"
    Options = ReplayOptions

    def __init__(self, lr: float = 0.01, batch: int = 10, epochs: int = 1, memory: int = 100,
                 replay_batch: int | None = None):
        if lr <= 0 or batch < 1 or epochs < 1 or memory < 1:
            raise ValueError("lr must be positive, batch, epochs and memory at least 1")
        self.lr, self.batch, self.epochs, self.memory = float(lr), int(batch), int(epochs), int(memory)
        self.replay_batch = int(replay_batch or batch)

    def spec(self) -> dict:
        return {"name": self.name, "lr": self.lr, "batch": self.batch, "epochs": self.epochs, "memory": self.memory,
                "replay_batch": self.replay_batch}

    def start(self, net, params, stream, generator, seed=0, workdir=None, progress=False) -> dict:
        return {"params": params, "memory": empty_memory(stream.image_shape, self.memory)}

    def learn(self, net, state: dict, experience, generator) -> dict:
        params, memory = state["params"], state["memory"]
        for epoch in range(self.epochs):
            for x, y in minibatches(experience.train_x, experience.train_y, self.batch):
                rx, ry = memory_sample(memory, self.replay_batch, generator)
                g, _ = grad(net, params, torch.cat([x, rx]), torch.cat([y, ry]))
                params = sgd(params, g, self.lr)
                if epoch == 0:  # each example is offered to the reservoir once
                    memory = reservoir_add(memory, x, y, generator)
        return {**state, "params": params, "memory": memory}

    def weights(self, state: dict):
        return state["params"]
