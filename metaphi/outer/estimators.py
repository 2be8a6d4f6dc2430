"""Estimators of the update of φ from a meta-batch of tasks.

Each estimator is a callable ``(algorithm, phi, tasks) -> (grads, metrics)`` where ``tasks`` is a
batched Task (leading dimension = task) and ``grads`` has the keys of φ. The trainer hands the
grads to an ordinary torch optimizer, so any of them can drive any outer optimizer.

How the inner loop is unrolled is the estimator's choice: it hands the algorithm's ``task_loss`` a
``metaphi.inner.Unroll`` (first-order or not, checkpointed or not). Each estimator's settings are a
dataclass (``UnrolledOptions``, ``ReptileOptions`` here), whose fields are the ``metaphi run`` flags.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor

from metaphi.algorithms.base import check_first_step
from metaphi.config import UsageError, option
from metaphi.functional import Params, detach, grads_or_zeros, prefixed, with_prefix
from metaphi.inner import FIRST_ORDER, Unroll
from metaphi.tasks import Task
from metaphi.outer.es import LOOP_HELP, SEED_HELP, SeededSteps


def _mean_task_loss(algorithm, phi: Params, tasks: Task, unroll: Unroll, vectorize: bool
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    if vectorize:
        losses, metrics = torch.func.vmap(lambda t: algorithm.task_loss(phi, t, unroll),
                                          randomness="different")(tasks)  # dropout: its own draws per task
        return losses.mean(), {k: v.mean() for k, v in metrics.items()}
    total, sums = 0.0, {}
    parts = tasks.unstack()
    for task in parts:
        loss, metrics = algorithm.task_loss(phi, task, unroll)
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
    ``compile``: the meta-gradient of one task (or of one vmap chunk) is written as a function,
    ``torch.func.grad`` of the task loss, and compiled by ``torch.compile``: the inner backward, the
    outer backward through it and the batch-norm double backward become one graph whose elementwise
    work is fused, instead of hundreds of small eager kernels per task. The first call compiles (tens
    of seconds on a CPU; cached on disk for later runs), later calls reuse the graph while the task
    shapes stay the same. Same meta-gradient to rounding (tests/test_compiled_estimator.py).
    """

    def __init__(self, first_order: bool = False, vectorize: bool = False, checkpoint: bool = False,
                 chunk: int | None = None, compile: bool = False):
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if compile and checkpoint:
            raise ValueError("compile and checkpoint do not go together: a checkpointed inner loop runs "
                             "eagerly, one step at a time")
        self.first_order = first_order
        self.vectorize = vectorize and not checkpoint
        self.checkpoint = checkpoint
        # what each task loss is told: a vmapped or compiled batch is never checkpointed
        self.unroll = Unroll(first_order=first_order, checkpoint=checkpoint)
        self.chunk = chunk
        self.compile = compile
        self._compiled: tuple | None = None  # (algorithm, its compiled meta-gradient)
        self.name = "first-order" if first_order else "second-order"

    def _compiled_grad(self, algorithm):
        """(trainable φ, fixed φ, task or batch of tasks) -> (mean-loss gradient, (loss, metrics)), compiled."""
        if self._compiled is not None and self._compiled[0] is algorithm:
            return self._compiled[1]
        # layout_optimization off: inductor's channels-last copies of the activations cost memory and, on
        # the CPU, no time (20-way 5-step MAML: 40.3 instead of 46.7 MB, 7.9 instead of 7.1 tasks/s)
        fn = torch.compile(_own_code(_meta_gradient(algorithm, Unroll(self.first_order), self.vectorize)),
                           dynamic=False, options={"layout_optimization": False})
        self._compiled = (algorithm, fn)
        return fn

    def _compiled_call(self, algorithm, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        keys = [k for k, v in phi.items() if v.requires_grad]
        trainable = {k: phi[k].detach() for k in keys}
        fixed = {k: v.detach() for k, v in phi.items() if k not in trainable}
        n = _task_count(tasks)
        parts = _chunks(tasks, self.chunk or n) if self.vectorize else tasks.unstack()
        grads = {k: torch.zeros_like(v) for k, v in phi.items()}
        sums: dict[str, float] = {}
        fn = self._compiled_grad(algorithm)
        for part in parts:
            share = (_task_count(part) if self.vectorize else 1) / n
            try:
                g, (loss, metrics) = fn(trainable, fixed, part)
            except torch._dynamo.exc.TorchDynamoException as e:
                raise RuntimeError(f"torch.compile could not compile the meta-gradient ({type(e).__name__}: {e}); "
                                   "run it without compiling") from e
            torch._foreach_add_([grads[k] for k in g], list(g.values()), alpha=share)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * share
        return grads, sums

    def __call__(self, algorithm, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        check_first_step(algorithm, tasks, vmapped=self.vectorize)
        if self.compile:
            return self._compiled_call(algorithm, phi, tasks)
        if self.vectorize:
            n = _task_count(tasks)
            if self.chunk is None or self.chunk >= n:
                loss, metrics = _mean_task_loss(algorithm, phi, tasks, Unroll(self.first_order), True)
                grads = grads_or_zeros(loss, phi)
                return grads, {"loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}}
            grads = {k: torch.zeros_like(v) for k, v in phi.items()}
            sums: dict[str, float] = {}
            for part in _chunks(tasks, self.chunk):
                share = _task_count(part) / n
                loss, metrics = _mean_task_loss(algorithm, phi, part, Unroll(self.first_order), True)
                if loss.requires_grad:
                    for k, g in grads_or_zeros(loss * share, phi).items():
                        grads[k] += g
                for k, v in {"loss": loss, **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * share
            return grads, sums
        grads = {k: torch.zeros_like(v) for k, v in phi.items()}
        total, sums = 0.0, {}
        parts = tasks.unstack()
        for task in parts:
            loss, metrics = algorithm.task_loss(phi, task, self.unroll)
            if loss.requires_grad:
                for k, g in grads_or_zeros(loss / len(parts), phi).items():
                    grads[k] += g
            total += float(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return grads, {"loss": total / len(parts), **{k: v / len(parts) for k, v in sums.items()}}


def _meta_gradient(algorithm, unroll: Unroll, batched: bool):
    """(trainable φ, fixed φ, a task or a batch of tasks) -> (∇ of the mean task loss, (loss, metrics))."""

    def meta_gradient(trainable: Params, fixed: Params, task: Task):
        def loss_of(params: Params):
            phi = {**fixed, **params}
            if batched:
                losses, metrics = torch.func.vmap(lambda t: algorithm.task_loss(phi, t, unroll),
                                                  randomness="different")(task)
                loss, metrics = losses.mean(), {k: v.mean() for k, v in metrics.items()}
            else:
                loss, metrics = algorithm.task_loss(phi, task, unroll)
            return loss, (loss.detach(), metrics)

        return torch.func.grad(loss_of, has_aux=True)(trainable)

    return meta_gradient


def _own_code(fn):
    """``fn`` with a code object of its own. torch.compile keeps its compiled graphs, and its limit
    on recompiling, per code object, with guards on the closure; one shared code object for every
    estimator and algorithm would reach that limit after a few and then run uncompiled without a
    word. A copy per compiled function keeps each one's graphs apart."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _chunks(tasks: Task, size: int) -> list[Task]:
    """A batched task split into batches of at most ``size`` tasks, in order."""
    n = _task_count(tasks)
    return [torch.utils._pytree.tree_map(lambda t: t[s:s + size], tasks) for s in range(0, n, size)]


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
            return algorithm.learn(phi_c, data, steps=self.steps, unroll=FIRST_ORDER)
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
                                     steps=1, unroll=FIRST_ORDER)
            params = detach(params)
        return params

    def __call__(self, algorithm, phi: Params, tasks: Task) -> tuple[Params, dict[str, float]]:
        check_first_step(algorithm, tasks, vmapped=False)
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
                loss, _ = algorithm.task_loss(phi_c, task, FIRST_ORDER)
            loss_sum += float(loss)
        return direction, {"loss": loss_sum / len(parts)}


@dataclass
class UnrolledOptions:
    """Settings of the unrolled estimators (second-order and first-order)."""

    loop: bool = option(False, LOOP_HELP)
    task_chunk: int | None = option(None, "vmap at most this many tasks at a time, each chunk's gradient taken before "
                                    "the next: memory grows with the chunk, not the meta-batch (none: all at once)",
                                    check="positive", metavar="N")
    checkpoint_inner: bool = option(False, "gradient-checkpoint the inner loop: memory grows by one parameter set "
                                    "per inner step, for about two more forwards per step; tasks run one by one")
    compile: bool = option(False, "compile each meta-gradient with torch.compile (the first iteration compiles: "
                           "tens of seconds to minutes on a CPU; cached on disk)")


def _unrolled(first_order: bool, options: UnrolledOptions) -> Unrolled:
    if options.compile and options.checkpoint_inner:
        raise UsageError("--compile and --checkpoint-inner do not go together (a checkpointed inner loop runs eagerly)")
    if options.task_chunk is not None and (options.loop or options.checkpoint_inner):
        raise UsageError("--task-chunk splits the vmap batch of tasks; it does not apply with "
                         f"{'--loop' if options.loop else '--checkpoint-inner'}, where tasks run one by one")
    return Unrolled(first_order=first_order, vectorize=not options.loop, checkpoint=options.checkpoint_inner,
                    chunk=options.task_chunk, compile=options.compile)


def second_order(options: UnrolledOptions) -> Unrolled:
    return _unrolled(False, options)


def first_order(options: UnrolledOptions) -> Unrolled:
    return _unrolled(True, options)


@dataclass
class ReptileOptions:
    """Settings of the Reptile estimator."""

    reptile_steps: int | None = option(None, "Reptile: SGD steps on each task (none: the run's --inner-steps)",
                                       check="positive", metavar="K")
    minibatches: bool = option(True, "Reptile: each step takes a different part of the task's data (--no-minibatches: "
                               "every step sees it all)")
    estimator_seed: int | None = option(None, SEED_HELP)


def reptile(options: ReptileOptions) -> Reptile:
    return Reptile(options.reptile_steps, options.minibatches, options.estimator_seed)
