"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

φ is an initialization. For each task, train from θ₀ = φ for k steps of SGD on the task's data to
θ_k, then move φ toward it:  φ ← φ + ε · mean_tasks (θ_k − φ).  No second derivatives, and no
support/query split is needed for the update. The algorithm is MAML's learner with the Reptile
estimator (metaphi.outer.Reptile) as its default way of optimizing φ; evaluation is the same
k-step fine-tuning from the learned initialization.
"""
from __future__ import annotations

from metaphi.inner import SGD
from metaphi.algorithms.maml import MAML, MAMLOptions, task_model

#: Reptile learns from a task by several steps: with a benchmark's inner loop of fewer, it takes this many
MIN_INNER_STEPS = 5


def defaults(settings: dict) -> dict:
    """The run settings Reptile takes where the user gave none, from the benchmark's ``settings``:
    at least ``MIN_INNER_STEPS`` inner steps."""
    return {"inner_steps": max(MIN_INNER_STEPS, settings.get("inner_steps") or 0)}


def reptile(benchmark, ways: int, inner_lr: float, inner_steps: int = MIN_INNER_STEPS, eval_steps=None,
            options: MAMLOptions | None = None) -> MAML:
    return MAML(task_model(benchmark, ways), benchmark.problem, SGD(inner_lr), inner_steps, eval_steps, name="reptile",
                estimators=("reptile", "first-order", "second-order"), options=options)
