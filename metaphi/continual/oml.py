"""OML and its control on a stream: a body meta-trained (or pre-trained) before the stream, frozen,
and a fresh head learned online (Javed & White 2019, "Meta-Learning Representations for Continual
Learning", NeurIPS).

Before the stream the body φ is meta-trained on classes disjoint from the stream's
(``Stream.meta_train``) with OML's objective, :class:`metaphi.algorithms.oml.OMLObjective` (the
math is there), by the core trainer; ``pretrain`` trains the same body by plain cross-entropy on the
same batches (:class:`metaphi.algorithms.oml.PretrainObjective`). On the stream, φ is frozen and a
fresh head (zeros, one output per stream class) is learned online in one pass, one example at a
time: W ← W − η ∇_W ℓ(φ, W; x, y).

Meta-training depends only on the meta-training classes, the settings and the seed, so it is kept in
a folder named by their hash and shared by the streams over the same classes (and by the methods that
start from pretrain's body, ``metaphi continual --init pretrain``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from metaphi.algorithms.oml import OMLObjective, PretrainObjective, TrajectoryTasks
from metaphi.config import option
from metaphi.continual.net import grad, head_keys, sgd
from metaphi.models import PlainConvNet as ConvNet
from metaphi.functional import Params, prefixed
from metaphi.tasks.base import ImageClasses


@dataclass
class BodyOptions:
    """How the body is meta-trained (or pre-trained) before the stream: what ``--init pretrain`` uses."""

    meta_iterations: int = option(500, "meta-training steps (also of the body --init pretrain starts from)",
                                  check="nonneg")
    meta_batch: int = option(4, "tasks per meta-training step", check="positive")
    meta_lr: float = option(3e-3, "Adam step size of meta-training", check="rate")
    traj_classes: int = option(2, "classes per trajectory", check="positive")
    traj_shots: int = option(5, "images per trajectory class", check="positive")
    remember: int = option(16, "random images of all meta-training classes in the meta-loss",
                           check="nonneg")


@dataclass
class PretrainOptions(BodyOptions):
    online_lr: float = option(0.03, "step size of the head learned online (0.03 is oml's choice "
                              "on glyphs-val; pretrain's was 0.3)", check="rate")


@dataclass
class OMLOptions(PretrainOptions):
    inner_lr: float = option(1.0, "inner step size on the head", check="rate")
    estimator: str = option("second-order", "meta-gradient estimator", choices=("second-order", "first-order"),
                            flag="--meta-estimator")


class OML:
    """Meta-train (or pre-train) a body before the stream; on the stream, learn the head online."""

    name = "oml"
    objective = OMLObjective
    Options = OMLOptions

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
        stored = load_checkpoint(ck) if ck and os.path.exists(ck) else None
        if stored is not None and stored["iteration"] >= self.meta_iterations:
            phi = stored["phi"]
        else:
            sampler = TrajectoryTasks(meta_train, self.traj_classes, self.traj_shots, self.remember)
            config = TrainConfig(iterations=self.meta_iterations, meta_batch=self.meta_batch, meta_lr=self.meta_lr,
                                 seed=seed, val_every=10**9, checkpoint_every=100)
            state = train(objective, build_estimator(self.estimator, {"loop": True}), sampler.sample_batch, config,
                          out_dir=folder, resume=stored is not None, progress=progress,
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
    """OML's control: the body pre-trained by plain cross-entropy (no inner loop, so no inner step size
    and no estimator to choose), then the same frozen body and online head."""

    name = "pretrain"
    objective = PretrainObjective
    Options = PretrainOptions
