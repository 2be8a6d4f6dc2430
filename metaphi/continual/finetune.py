"""Sequential fine-tuning: plain SGD on each experience in turn, nothing done against forgetting.

    θ ← θ − η ∇_θ ℓ(θ; B)      for each mini-batch B of the current experience, in the order shown

The lower bound of every continual-learning comparison (called "SGD" or "Single" in Lopez-Paz &
Ranzato 2017; "fine-tune" in Rebuffi et al. 2017): the network drifts to whatever the current
experience needs and forgets the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

from metaphi.config import option
from metaphi.continual.net import grad, minibatches, sgd


@dataclass
class FinetuneOptions:
    lr: float = option(0.01, "SGD step size (0.01 is finetune's and ewc's choice on "
                       "glyphs-val; replay's was 0.1)", check="rate")
    batch: int = option(10, "mini-batch of the stream", check="positive")
    epochs: int = option(1, "passes over each experience", check="positive")


class Finetune:
    name = "finetune"
    Options = FinetuneOptions

    def __init__(self, lr: float = 0.01, batch: int = 10, epochs: int = 1):
        if lr <= 0 or batch < 1 or epochs < 1:
            raise ValueError("lr must be positive, batch and epochs at least 1")
        self.lr, self.batch, self.epochs = float(lr), int(batch), int(epochs)

    def spec(self) -> dict:
        return {"name": self.name, "lr": self.lr, "batch": self.batch, "epochs": self.epochs}

    def start(self, net, params, stream, generator, seed=0, workdir=None, progress=False) -> dict:
        return {"params": params}

    def learn(self, net, state: dict, experience, generator) -> dict:
        params = state["params"]
        for _ in range(self.epochs):
            for x, y in minibatches(experience.train_x, experience.train_y, self.batch):
                g, _ = grad(net, params, x, y)
                params = sgd(params, g, self.lr)
        return {**state, "params": params}

    def weights(self, state: dict):
        return state["params"]
