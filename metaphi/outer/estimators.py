"""Estimators of the update of φ from a meta-batch of tasks.

Each estimator is a callable ``(algorithm, phi, tasks) -> (grads, metrics)`` where ``tasks`` is a
batched Task (leading dimension = task) and ``grads`` has the keys of φ. The trainer hands the
grads to an ordinary torch optimizer, so any of them can drive any outer optimizer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..functional import Params, detach, grads_or_zeros, prefixed, with_prefix
from ..inner.adapt import inner_checkpointing
from ..tasks import Task
from .es import SeededSteps


def _mean_task_loss(algorithm, phi: Params, tasks: Task, first_order: bool, vectorize: bool
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    if vectorize:
        losses, metrics = torch.func.vmap(lambda t: algorithm.task_loss(phi, t, first_order=first_order))(tasks)
        return losses.mean(), {k: v.mean() for k, v in metrics.items()}
    total, sums = 0.0, {}
    parts = tasks.unstack()
    for task in parts:
        loss, metrics = algorithm.task_loss(phi, task, first_order=first_order)
        total = total + loss
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    n = len(parts)
    return total / n, {k: v / n for k, v in sums.items()}


class Unrolled:
    """∇_φ of the mean query loss, backpropagated through the inner loop.

    ``first_order=False``: exact (second-order) meta-gradient, MAML.
    ``first_order=True``: the inner gradients are held constant (first-order MAML).
    ``vectorize``: tasks are run as one ``vmap`` batch instead of a Python loop; same result.
    In the loop each task's gradient is taken before the next task is run, so memory holds one
    task's graph, not the meta-batch's.
    ``checkpoint``: inner loops are gradient-checkpointed (``metaphi.inner.adapt``), for long inner
    loops that would not fit otherwise; tasks then run in the loop.
    ``chunk``: with ``vectorize``, at most this many tasks per ``vmap`` batch, each chunk's gradient
    taken before the next is run: memory grows with the chunk, not with the meta-batch.
    """

    def __init__(self, first_order: bool = False, vectorize: bool = False, checkpoint: bool = False,
                 chunk: int | None = None):
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.first_order = first_order
        self.vectorize = vectorize and not checkpoint
        self.checkpoint = checkpoint
        self.chunk = chunk
        self.name = "first-order" if first_order else "second-order"

    def __call__(self, algorithm, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        if self.vectorize:
            n = _task_count(tasks)
            if self.chunk is None or self.chunk >= n:
                loss, metrics = _mean_task_loss(algorithm, phi, tasks, self.first_order, True)
                grads = grads_or_zeros(loss, phi)
                return grads, {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}
            grads = {k: torch.zeros_like(v) for k, v in phi.items()}
            sums: dict[str, float] = {}
            for start in range(0, n, self.chunk):
                part = torch.utils._pytree.tree_map(lambda t: t[start:start + self.chunk], tasks)
                share = _task_count(part) / n
                loss, metrics = _mean_task_loss(algorithm, phi, part, self.first_order, True)
                if loss.requires_grad:
                    for k, g in grads_or_zeros(loss * share, phi).items():
                        grads[k] += g
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * share
            return grads, sums
        grads = {k: torch.zeros_like(v) for k, v in phi.items()}
        total, sums = 0.0, {}
        parts = tasks.unstack()
        with inner_checkpointing(self.checkpoint):
            for task in parts:
                loss, metrics = algorithm.task_loss(phi, task, first_order=self.first_order)
                if loss.requires_grad:
                    for k, g in grads_or_zeros(loss / len(parts), phi).items():
                        grads[k] += g
                total += float(loss.detach())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        return grads, {"loss": total / len(parts), **{k: v / len(parts) for k, v in sums.items()}}


def _task_count(tasks: Task) -> int:
    return torch.utils._pytree.tree_leaves(tasks)[0].shape[0]


class Reptile(SeededSteps):
    """Reptile's update direction (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning
    Algorithms"): train on the task for k steps from θ₀ = φ to θ_k, then move φ toward θ_k.

        g = φ − mean_tasks θ_k(task)      (so that a gradient step φ − ε g is Reptile's update)

    The inner loop learns from all the task's data (support and query), as in the paper; the query
    loss of the support-adapted learner is reported for monitoring only. Only the initialization
    ("init.*") moves; other meta-parameters get a zero direction.

    ``minibatches``: each of the k steps takes a different part of the task's data (a seeded
    permutation split into k batches, one pass over the data; with fewer images than steps the
    permutation repeats). The paper's analysis (section 5) shows why this matters: the term of the
    update that rewards generalizing from one batch to another, E[H̄_i ḡ_j] for i < j, is only there
    when the batches differ; with the same full batch at every step Reptile is much closer to joint
    training, and on 1-shot tasks it barely learns. With ``minibatches=False`` every step sees all the
    data. Randomness as in the ES estimator: call t draws from ``derived_seed(seed, t)``, and
    ``start``/``state_dict``/``load_state_dict`` carry (seed, t) through checkpoints.
    """

    name = "reptile"

    def __init__(self, steps: int | None = None, minibatches: bool = True, seed: int | None = None):
        self.steps = steps
        self.minibatches = minibatches
        self._init_seed(seed)

    def _train(self, algorithm, phi_c: Params, data: tuple, generator: torch.Generator) -> Params:
        if not self.minibatches:
            return algorithm.learn(phi_c, data, steps=self.steps, first_order=True)
        steps = algorithm.inner_steps if self.steps is None else self.steps
        rule = getattr(algorithm, "rule", None)
        if rule is not None and rule.init(prefixed(phi_c, "init")) is not None:
            raise ValueError("Reptile with minibatches restarts the update rule at every step; "
                             f"{type(rule).__name__} keeps state between steps, use minibatches=False")
        n = data[0].shape[0]
        order = torch.randperm(n, generator=generator)
        if n < steps:
            order = order.repeat(-(-steps // n))
        rest = {k: v for k, v in phi_c.items() if not k.startswith("init.")}
        params = prefixed(phi_c, "init")
        for batch in torch.tensor_split(order, steps):
            params = algorithm.learn({**rest, **with_prefix(params, "init")}, tuple(d[batch] for d in data),
                                     steps=1, first_order=True)
            params = detach(params)
        return params

    def __call__(self, algorithm, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        phi_c = detach(phi)
        init = prefixed(phi_c, "init")
        direction = {k: torch.zeros_like(v) for k, v in phi.items()}
        loss_sum, parts = 0.0, tasks.unstack()
        generator = self.generator()
        self.step += 1
        for task in parts:
            both = tuple(torch.cat([s, q]) for s, q in zip(task.support, task.query))
            adapted = self._train(algorithm, phi_c, both, generator)
            for k, v in init.items():
                direction["init." + k] += (v - adapted[k].detach()) / len(parts)
            with torch.no_grad():
                loss, _ = algorithm.task_loss(phi_c, task, first_order=True)
            loss_sum += float(loss)
        return direction, {"loss": loss_sum / len(parts)}


def second_order(vectorize: bool = False, checkpoint: bool = False, task_chunk: int | None = None, **_) -> Unrolled:
    return Unrolled(first_order=False, vectorize=vectorize, checkpoint=checkpoint, chunk=task_chunk)


def first_order(vectorize: bool = False, checkpoint: bool = False, task_chunk: int | None = None, **_) -> Unrolled:
    return Unrolled(first_order=True, vectorize=vectorize, checkpoint=checkpoint, chunk=task_chunk)


def reptile(steps: int | None = None, minibatches: bool = True, seed: int | None = None, **_) -> Reptile:
    return Reptile(steps, minibatches, seed)
