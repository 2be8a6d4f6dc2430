"""One data set as a search task, and training a network of the space on it.

Architecture search on one data set: its images are split (stratified, seeded) into a *train* part,
on which every network's weights are learned, a *val* part, on which architectures are judged
(DARTS's α gradient, the black-box searchers' fitness), and a *test* part, touched only by the final
network retrained from scratch.

Weights are trained functionally (params in, params out) by SGD with Nesterov-free heavy-ball
momentum, weight decay and a cosine step size, as in DARTS's weight updates
(``metaphi.inner.rules.MomentumSGD``):

    v ← μ v + ∇L(w) + λ w,      w ← w − η_t v,      η_t = η_min + (η − η_min)(1 + cos(π t / T)) / 2.

Minibatches of step t come from a generator seeded with ``derived_seed(seed, t)``, so any step can
be replayed on its own (a resumed run draws the same batches).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from metaphi.functional import Params, call
from metaphi.functional import accuracy as functional_accuracy
from metaphi.outer.es import derived_seed

Split = tuple[Tensor, Tensor]


def split_data(store, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25), seed: int = 0,
               dtype: torch.dtype = torch.float32) -> dict[str, Split]:
    """train / val / test of an ``ImageClasses`` store, stratified by class; images scaled to [0, 1]."""
    from metaphi.tasks.corrupt import stratified_split

    if len(fractions) != 3 or min(fractions) <= 0:
        raise ValueError(f"three positive fractions train,val,test are needed, got {list(fractions)}")
    if sum(fractions) > 1 + 1e-9:
        raise ValueError(f"the fractions train,val,test must sum to at most 1, got {list(fractions)}")
    # train and val by stratified_split; test is the rest of each class (scaled by its fraction), so
    # that rounding three parts separately can never ask a class for more images than it has
    train, val = stratified_split(store.targets, list(fractions[:2]), torch.Generator().manual_seed(seed))
    rest = torch.ones(store.targets.numel(), dtype=torch.bool)
    rest[train] = False
    rest[val] = False
    rest = torch.nonzero(rest).flatten()
    if sum(fractions) < 1 - 1e-9:  # keep the test fraction of what remains, per class
        keep = []
        for c in torch.unique(store.targets[rest]).tolist():
            idx = rest[store.targets[rest] == c]
            n = int(round(fractions[2] / (1 - sum(fractions[:2])) * idx.numel()))
            keep.append(idx[:n])
        rest = torch.sort(torch.cat(keep)).values
    parts = [train, val, rest]
    out = {}
    for name, idx in zip(("train", "val", "test"), parts):
        if idx.numel() == 0:
            raise ValueError(f"the {name} split is empty: give it a larger fraction or use more images per class")
        out[name] = (store.images[idx].to(dtype) / 255.0, store.targets[idx])
    return out


def batch_of(data: Split, size: int, generator: torch.Generator) -> Split:
    """``size`` examples drawn without replacement (the whole split if it is smaller)."""
    x, y = data
    idx = torch.randperm(x.shape[0], generator=generator)[:size]
    return x[idx], y[idx]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    batch: int = 64
    lr: float = 0.05
    lr_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0

    def lr_at(self, step: int) -> float:
        return self.lr_min + (self.lr - self.lr_min) * (1 + math.cos(math.pi * step / max(self.steps, 1))) / 2

    def to_dict(self) -> dict:
        return asdict(self)


def loss_and_grads(net: nn.Module, params: Params, x: Tensor, y: Tensor, *args) -> tuple[Tensor, Params]:
    """Cross-entropy of a minibatch and its gradient in the weights (other inputs held fixed).

    Plain ``torch.autograd.grad`` on fresh leaves: for these small networks of many small ops it is
    about twice as fast on a CPU as ``torch.func.grad``, and nothing here needs a transform."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(call(net, leaves, x, *args), y)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves, grads))


def train(net: nn.Module, params: Params, data: Split, settings: TrainSettings, seed: int,
          progress=None) -> Params:
    """``settings.steps`` steps of momentum SGD from ``params`` on minibatches of ``data``."""
    from metaphi.inner.rules import MomentumSGD

    params = {k: v.detach() for k, v in params.items()}
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    for step in range(settings.steps):
        x, y = batch_of(data, settings.batch, torch.Generator().manual_seed(derived_seed(seed, step)))
        loss, grads = loss_and_grads(net, params, x, y)
        if not torch.isfinite(loss):
            from metaphi.train import NonFiniteLoss
            raise NonFiniteLoss(f"the training loss became {float(loss)} at step {step}; lower the step size")
        rule = MomentumSGD(settings.lr_at(step), settings.momentum, settings.weight_decay, settings.grad_clip)
        params, velocity = rule.update(params, grads, velocity, {})
        if progress is not None:
            progress(step)
    return params


def accuracy(net: nn.Module, params: Mapping[str, Tensor], data: Split, *args, chunk: int = 1024) -> float:
    """Accuracy on ``data``, in fixed chunks (batch normalization uses each chunk's statistics)."""
    return functional_accuracy(net, params, data[0], data[1], chunk, *args)


def retrain(genotype, config, data: dict[str, Split], settings: TrainSettings, seed: int) -> dict:
    """The genotype's network trained from scratch (weights drawn from ``seed``) on ``train``, then
    scored on ``val`` and ``test``."""
    from metaphi.nas.space import Network, init_params, parameter_count

    net = Network(config, genotype)
    params = init_params(net, torch.Generator().manual_seed(derived_seed(seed, -1)),
                         dtype=data["train"][0].dtype)
    params = train(net, params, data["train"], settings, seed)
    return {"val_acc": accuracy(net, params, data["val"]), "test_acc": accuracy(net, params, data["test"]),
            "parameters": parameter_count(net), "params": params}
