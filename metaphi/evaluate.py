"""Testing a learning algorithm on fixed, seed-stable episodes: mean ± 95% CI after 0..S inner steps."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .functional import Params
from .tasks import Task


def confidence95(values: torch.Tensor) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean."""
    n = values.numel()
    if n < 2:
        return float("nan")
    return float(1.96 * values.double().std(unbiased=True) / math.sqrt(n))


def fixed_tasks(sampler, n: int, seed: int):
    """The same ``n`` tasks for every method: drawn from a generator seeded with ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield sampler.sample(generator)


def _chunks(tasks, size: int):
    chunk = []
    for task in tasks:
        chunk.append(task)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def evaluate(algorithm, phi: Params, sampler, n_tasks: int, seed: int, steps: int | None = None,
             device: str | torch.device = "cpu", progress: bool = False, desc: str = "test",
             chunk: int = 50) -> dict:
    """Score ``algorithm`` with meta-parameters ``phi`` on ``n_tasks`` fixed tasks.

    Tasks are scored ``chunk`` at a time under ``vmap`` where the algorithm allows it
    (``algorithm.batched_eval``), one by one otherwise; the result is the same.
    Returns ``mean``/``ci95`` of the metric after the last inner step, ``per_step`` for steps
    0..S, the number of tasks and the seconds taken.
    """
    start = time.perf_counter()
    phi = {k: v.detach() for k, v in phi.items()}
    batched = getattr(algorithm, "batched_eval", False)
    rows: list[torch.Tensor] = []
    bar = tqdm(total=n_tasks, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for tasks in _chunks(fixed_tasks(sampler, n_tasks, seed), chunk if batched else 1):
        if batched:
            stacked = Task.stack(tasks).to(device)
            scores = torch.func.vmap(lambda t: algorithm.evaluate(phi, t, steps))(stacked)
        else:
            scores = algorithm.evaluate(phi, tasks[0].to(device), steps).unsqueeze(0)
        rows.extend(scores.detach().cpu().double())
        bar.update(len(tasks))
        if progress:
            bar.set_postfix({"mean": f"{torch.stack(rows)[:, -1].mean():.4f}"})
    bar.close()
    table = torch.stack(rows)  # [tasks, steps + 1]
    per_step = [{"step": s, "mean": float(table[:, s].mean()), "ci95": confidence95(table[:, s])}
                for s in range(table.shape[1])]
    return {"mean": per_step[-1]["mean"], "ci95": per_step[-1]["ci95"], "per_step": per_step,
            "tasks": n_tasks, "eval_seed": seed, "seconds": time.perf_counter() - start}
