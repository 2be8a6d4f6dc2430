"""OML: online-aware meta-learning of a representation (Javed & White 2019, "Meta-Learning
Representations for Continual Learning", NeurIPS), and its supervised pre-training control.

The network splits into a representation φ (the convolutional ``body``) and a prediction head W
(the linear ``head``). Before the stream, φ is meta-trained on classes disjoint from the stream's
(``Stream.meta_train``) so that *online* SGD on W alone learns new classes without wrecking old
ones. One meta-training task imitates a stretch of the stream:

* a trajectory S = (x_1, y_1), ..., (x_k, y_k): ``traj_shots`` images of each of ``traj_classes``
  classes, class after class (a correlated, non-i.i.d. stretch, as a continual stream is);
* the rows of W for those classes are reset to zero, as for classes never seen;
* inner loop, one example a step: W_j = W_{j-1} − α ∇_W ℓ(φ, W_{j-1}; x_j, y_j)  (k steps);
* meta-loss on the trajectory and a "remember" batch Q of random images of all meta-training
  classes: L(φ, W_0) = ℓ(φ, W_k; S ∪ Q) — the learner must have learned the new classes and not
  forgotten the others, after updates that only saw the new ones.

The meta-gradient ∇_(φ, W_0) L runs through the k inner steps (``metaphi.inner.adapt`` for each
one-example step, an estimator of ``metaphi.outer``: second-order by default, first-order by
option), over meta-batches with Adam, by the repo's trainer (``metaphi.train.meta_train``, which
checkpoints and resumes). This is OML's objective; the paper's network is larger (6 conv + 2 fc
layers, 963 background classes) and its prediction network has two layers.

On the stream, φ is frozen and a fresh head (zeros, one output per stream class) is learned online
in one pass, one example at a time: W ← W − η ∇_W ℓ(φ, W; x, y).

``pretrain`` is the control that separates meta-learning from simply having seen many classes: the
same body trained by plain cross-entropy on the same meta-training batches (S ∪ Q as one batch, the
same number of steps), then the same frozen-body online head.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F

from metaphi.algorithms.base import Algorithm
from metaphi.functional import Params, params_of, prefixed, with_prefix
from metaphi.inner.adapt import adapt
from metaphi.inner.rules import SGD
from metaphi.tasks.base import ImageClasses, Task
from metaphi.continual.net import ConvNet, as_input, grad, head_keys, loss, sgd


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

    def __init__(self, net: ConvNet, inner_lr: float, seed: int):
        self.net, self.inner_lr, self.seed = net, float(inner_lr), seed
        self.rule = SGD(inner_lr)

    def init_meta_params(self) -> Params:
        return with_prefix(params_of(self.net), "init")

    def spec(self) -> dict:
        return {"name": self.name, "net": self.net.spec, "inner_lr": self.inner_lr, "seed": self.seed}

    def task_loss(self, phi: Params, task: Task, first_order: bool = False):
        params = prefixed(phi, "init")
        (x, y), (xq, yq) = task.support, task.query
        keep = 1.0 - F.one_hot(y, params["head.bias"].shape[0]).amax(0).to(params["head.bias"].dtype)
        fast = {**params, "head.weight": params["head.weight"] * keep[:, None], "head.bias": params["head.bias"] * keep}
        keys = head_keys(params)
        for j in range(len(y)):
            fast = adapt(lambda p, j=j: loss(self.net, p, x[j:j + 1], y[j:j + 1]), fast, self.rule, {}, 1,
                         first_order=first_order, trainable=keys)
        out = torch.func.functional_call(self.net, fast, (xq,))
        value = F.cross_entropy(out, yq)
        return value, {"accuracy": (out.argmax(-1) == yq).float().mean()}


class PretrainObjective(OMLObjective):
    """Plain cross-entropy on the same batches (support and query together): supervised pre-training."""

    name = "pretrain"
    estimators = ("first-order",)

    def spec(self) -> dict:
        return {"name": self.name, "net": self.net.spec, "seed": self.seed}

    def task_loss(self, phi: Params, task: Task, first_order: bool = False):
        params = prefixed(phi, "init")
        x = torch.cat([task.support[0], task.query[0]])
        y = torch.cat([task.support[1], task.query[1]])
        out = torch.func.functional_call(self.net, params, (x,))
        return F.cross_entropy(out, y), {"accuracy": (out.argmax(-1) == y).float().mean()}


class OML:
    """Meta-train (or pre-train) a body before the stream; on the stream, learn the head online."""

    name = "oml"
    objective = OMLObjective

    def __init__(self, online_lr: float = 0.03, meta_iterations: int = 500, meta_batch: int = 4,
                 meta_lr: float = 3e-3, inner_lr: float = 1.0, traj_classes: int = 2, traj_shots: int = 5,
                 remember: int = 16, estimator: str = "second-order"):
        if online_lr <= 0 or inner_lr <= 0 or meta_lr <= 0 or meta_iterations < 0 or meta_batch < 1:
            raise ValueError("learning rates must be positive, meta-iterations >= 0 and meta-batch >= 1")
        self.online_lr, self.meta_iterations, self.meta_batch = float(online_lr), int(meta_iterations), int(meta_batch)
        self.meta_lr, self.inner_lr = float(meta_lr), float(inner_lr)
        self.traj_classes, self.traj_shots, self.remember = int(traj_classes), int(traj_shots), int(remember)
        self.estimator = estimator if self.objective is OMLObjective else "first-order"

    def spec(self) -> dict:
        return {"name": self.name, "online_lr": self.online_lr, **self.meta_spec()}

    def meta_spec(self) -> dict:
        spec = {"meta_iterations": self.meta_iterations, "meta_batch": self.meta_batch, "meta_lr": self.meta_lr,
                "inner_lr": self.inner_lr, "traj_classes": self.traj_classes, "traj_shots": self.traj_shots,
                "remember": self.remember, "estimator": self.estimator}
        if self.objective is PretrainObjective:  # no inner loop: these do not change what it learns
            del spec["inner_lr"], spec["estimator"]
        return spec

    def meta_folder(self, workdir: str, meta_train: ImageClasses, net_spec: dict, seed: int) -> str:
        """Meta-training depends only on the meta-training classes, the settings and the seed, so streams
        over the same classes share it: a folder named by a hash of those."""
        key = json.dumps({"classes": meta_train.classes, "shape": list(meta_train.image_shape), "net": net_spec,
                          "method": self.name, **self.meta_spec()}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return os.path.join(workdir, f"{self.name}-{digest}-seed{seed}")

    def meta_train_body(self, net: ConvNet, meta_train: ImageClasses, seed: int, workdir: str | None,
                        progress: bool) -> Params:
        from metaphi.outer import build_estimator
        from metaphi.train import TrainConfig, load_checkpoint, meta_train as train

        spec = dict(net.spec, num_classes=meta_train.num_classes)
        with torch.random.fork_rng():  # the initial weights come from the seed alone
            torch.manual_seed(seed + 7919)
            meta_net = ConvNet(**spec)
        objective = self.objective(meta_net, self.inner_lr, seed)
        folder = self.meta_folder(workdir, meta_train, spec, seed) if workdir else None
        ck = os.path.join(folder, "checkpoint.pt") if folder else None
        if ck and os.path.exists(ck) and load_checkpoint(ck)["iteration"] >= self.meta_iterations:
            phi = load_checkpoint(ck)["phi"]
        else:
            sampler = TrajectoryTasks(meta_train, self.traj_classes, self.traj_shots, self.remember)
            config = TrainConfig(iterations=self.meta_iterations, meta_batch=self.meta_batch, meta_lr=self.meta_lr,
                                 seed=seed, val_every=10**9, checkpoint_every=100)
            state = train(objective, build_estimator(self.estimator, vectorize=False), sampler.sample_batch, config,
                          out_dir=folder, resume=bool(ck and os.path.exists(ck)), progress=progress,
                          run={"meta_train_classes": meta_train.num_classes})
            phi = state.phi
        return {k: v.detach() for k, v in prefixed(phi, "init").items() if k.startswith("body.")}

    def start(self, net, params, stream, generator, seed=0, workdir=None, progress=False) -> dict:
        if stream.meta_train is None:
            raise ValueError(f"{self.name} learns its representation on meta-training classes held out from the "
                             f"stream, and stream {stream.name} has none; use a built-in stream (glyphs, omniglot, ...)")
        body = self.meta_train_body(net, stream.meta_train, seed, workdir, progress)
        head = {k: torch.zeros_like(v) for k, v in params.items() if k.startswith("head.")}
        return {"params": {**body, **head}}

    def learn(self, net, state: dict, experience, generator) -> dict:
        params = state["params"]
        keys = head_keys(params)
        for j in range(len(experience.train_y)):  # online: one example at a time, one pass
            g, _ = grad(net, params, experience.train_x[j:j + 1], experience.train_y[j:j + 1], keys=keys)
            params = sgd(params, g, self.online_lr)
        return {**state, "params": params}

    def weights(self, state: dict):
        return state["params"]


class Pretrain(OML):
    name = "pretrain"
    objective = PretrainObjective
