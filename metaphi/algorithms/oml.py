"""OML: online-aware meta-learning of a representation (Javed & White 2019, "Meta-Learning
Representations for Continual Learning", NeurIPS), and its supervised pre-training control.

The network splits into a representation φ (the convolutional ``body``) and a prediction head W
(the linear ``head``). Before a continual stream, φ is meta-trained on classes disjoint from the
stream's so that *online* SGD on W alone learns new classes without wrecking old ones. One
meta-training task imitates a stretch of the stream (:class:`TrajectoryTasks`):

* a trajectory S = (x_1, y_1), ..., (x_k, y_k): ``traj_shots`` images of each of ``traj_classes``
  classes, class after class (a correlated, non-i.i.d. stretch, as a continual stream is);
* the rows of W for those classes are reset to zero, as for classes never seen;
* inner loop, one example a step: W_j = W_{j-1} − α ∇_W ℓ(φ, W_{j-1}; x_j, y_j)  (k steps);
* meta-loss on the trajectory and a "remember" batch Q of random images of all meta-training
  classes: L(φ, W_0) = ℓ(φ, W_k; S ∪ Q) — the learner must have learned the new classes and not
  forgotten the others, after updates that only saw the new ones.

The meta-gradient ∇_(φ, W_0) L runs through the k inner steps (``metaphi.inner.adapt`` for each
one-example step, unrolled as the estimator says: second order, or first order), over meta-batches
with Adam, by the core trainer (``metaphi.train.meta_train``). This is OML's objective; the
paper's network is larger (6 conv + 2 fc layers, 963 background classes) and its prediction network
has two layers.

:class:`PretrainObjective` is the control that separates meta-learning from simply having seen many
classes: the same body trained by plain cross-entropy on the same meta-training batches (S ∪ Q as
one batch, the same number of steps).

How the meta-trained body is used on a stream (frozen, a fresh head learned online) is the continual
method's business: :mod:`metaphi.continual.oml`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaphi.algorithms.base import Algorithm
from metaphi.continual.net import as_input, head_keys, loss
from metaphi.functional import Params, params_of, prefixed, with_prefix
from metaphi.inner import SGD, Unroll, adapt
from metaphi.tasks.base import ImageClasses, Task


class TrajectoryTasks:
    """Meta-training tasks of OML from ``data``: support = a class-by-class trajectory of
    ``traj_classes`` x ``traj_shots`` images, query = the trajectory and ``remember`` random images.
    ``sample_batch(n, generator)`` gives a batched Task (the trainer's sampler interface)."""

    def __init__(self, data: ImageClasses, traj_classes: int = 2, traj_shots: int = 5, remember: int = 16):
        if data.num_classes < traj_classes:
            raise ValueError(f"{data.num_classes} meta-training classes, a trajectory needs {traj_classes}")
        if int(data.counts.min()) < traj_shots:
            raise ValueError(f"a meta-training class has {int(data.counts.min())} images, a trajectory needs "
                             f"{traj_shots}")
        self.data, self.traj_classes, self.traj_shots, self.remember = data, traj_classes, traj_shots, remember

    def sample(self, generator: torch.Generator) -> Task:
        d = self.data
        classes = torch.randperm(d.num_classes, generator=generator)[:self.traj_classes]
        idx = []
        for c in classes.tolist():
            own = d.indices_of(c)
            idx.append(own[torch.randperm(len(own), generator=generator)[:self.traj_shots]])
        idx = torch.cat(idx)
        rem = torch.randint(len(d.targets), (self.remember,), generator=generator)
        x, y = as_input(d.images[idx]), d.targets[idx]
        q = torch.cat([idx, rem])
        return Task((x, y), (as_input(d.images[q]), d.targets[q]))

    def sample_batch(self, n: int, generator: torch.Generator) -> Task:
        return Task.stack([self.sample(generator) for _ in range(n)])


class OMLObjective(Algorithm):
    """OML's meta-training objective as an ``Algorithm`` for the trainer; φ = ``init.body.*, init.head.*``."""

    name = "oml"
    estimators = ("second-order", "first-order")

    def __init__(self, net: nn.Module, inner_lr: float, seed: int):
        self.net, self.inner_lr, self.seed = net, float(inner_lr), seed
        self.rule = SGD(inner_lr)

    def init_meta_params(self) -> Params:
        return with_prefix(params_of(self.net), "init")

    def spec(self) -> dict:
        return {"name": self.name, "net": self.net.spec, "inner_lr": self.inner_lr, "seed": self.seed}

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()):
        params = prefixed(phi, "init")
        (x, y), (xq, yq) = task.support, task.query
        keep = 1.0 - F.one_hot(y, params["head.bias"].shape[0]).amax(0).to(params["head.bias"].dtype)
        fast = {**params, "head.weight": params["head.weight"] * keep[:, None], "head.bias": params["head.bias"] * keep}
        keys = head_keys(params)
        for j in range(len(y)):
            fast = adapt(lambda p, j=j: loss(self.net, p, x[j:j + 1], y[j:j + 1]), fast, self.rule, {}, 1,
                         unroll, trainable=keys)
        out = torch.func.functional_call(self.net, fast, (xq,))
        value = F.cross_entropy(out, yq)
        return value, {"accuracy": (out.argmax(-1) == yq).float().mean()}


class PretrainObjective(OMLObjective):
    """Plain cross-entropy on the same batches (support and query together): supervised pre-training."""

    name = "pretrain"
    estimators = ("first-order",)

    def spec(self) -> dict:
        return {"name": self.name, "net": self.net.spec, "seed": self.seed}

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()):
        params = prefixed(phi, "init")
        x = torch.cat([task.support[0], task.query[0]])
        y = torch.cat([task.support[1], task.query[1]])
        out = torch.func.functional_call(self.net, params, (x,))
        return F.cross_entropy(out, y), {"accuracy": (out.argmax(-1) == y).float().mean()}
