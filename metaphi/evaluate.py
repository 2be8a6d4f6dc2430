"""Testing a learning algorithm on fixed, seed-stable episodes: mean ± 95% CI after 0..S inner steps."""
from __future__ import annotations

from contextlib import contextmanager

import math
import time

import torch
from tqdm.auto import tqdm

from metaphi.functional import Params
from metaphi.tasks import Task


def confidence95(values: torch.Tensor) -> float:
    """Half-width of the normal-approximation 95% confidence interval of the mean (for hundreds of
    test tasks; over a few seeds use ``mean_ci95``, the t-interval)."""
    n = values.numel()
    if n < 2:
        return float("nan")
    return float(1.96 * values.double().std(unbiased=True) / math.sqrt(n))


_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a table to 30, then the
    Cornish-Fisher expansion, within 1e-3)."""
    if df < 1:
        raise ValueError("a t-interval needs at least two values")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of the mean (nan with one value)."""
    v = [float(a) for a in values]
    n = len(v)
    m = sum(v) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((a - m) ** 2 for a in v) / (n - 1))
    return m, t_quantile_975(n - 1) * sd / math.sqrt(n)


def fixed_tasks(sampler, n: int, seed: int):
    """The same ``n`` tasks for every method: drawn from a generator seeded with ``seed`` alone.
    ``sampler`` is an episode sampler (``sample(generator) -> Task``) or the function training takes,
    ``(n, generator) -> Task`` of a batch of tasks (asked for one at a time)."""
    generator = torch.Generator().manual_seed(seed)
    if callable(getattr(sampler, "sample", None)):
        draw = sampler.sample
    elif callable(sampler):
        draw = lambda g: sampler(1, g).unstack()[0]
    else:
        raise TypeError(f"a sampler has sample(generator) or is called as (n, generator) -> Task; got "
                        f"{type(sampler).__name__}")
    for _ in range(n):
        yield draw(generator)


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
    with eval_mode(algorithm):
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


@contextmanager
def eval_mode(algorithm):
    """The algorithm's network in eval mode while it is scored (dropout off; what ``model.eval()``
    means for the user's layers), restored after."""
    model = getattr(algorithm, "model", None)
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
