"""``metaphi tune``: meta-learning's own hyperparameters, searched on validation tasks.

Learning to learn to learn: MAML and its family have hyperparameters of their own (the inner step
size α, the number of inner steps, the meta-batch size) and the loss of a configuration, the
validation score after meta-training with it, is not differentiable in them. So they are searched
with the black-box searchers of ``metaphi.outer.search``:

* ``reinforce`` — a factorised categorical policy over a grid (α on a log grid, the step counts, the
  meta-batch sizes), updated by REINFORCE with a moving-average baseline (metaphi.outer.reinforce);
* ``es`` — antithetic Gaussian ES with centred ranks over a continuous encoding in [0, 1]³
  (metaphi.outer.es);
* ``cma`` — CMA-ES over the same encoding (needs the optional ``cma`` package);
* ``random`` — independent draws, the baseline every search should beat (Bergstra & Bengio 2012).

Every trial meta-trains from the same seed on the same number of training tasks (iterations scale
inversely with the meta-batch, so a larger batch is not simply more compute) and is scored on fixed
*validation* tasks; the number of inner steps at test is chosen from the same validation curve.
Test tasks are never drawn here: they are for the one final ``metaphi run`` with the configuration
this writes. The first trial is always the default configuration (the family's for the benchmark),
so the result is never worse than the default on validation.

A trial is ``metaphi run``'s meta-training (:mod:`metaphi.experiments.fewshot`) with the trial's
inner lr, inner steps and meta-batch in the run config; family and estimator options (``--lam``,
``--loop``, ...) are those of ``metaphi run``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from metaphi.algorithms import ALGORITHMS
from metaphi.config import UsageError, option, writable_dir
from metaphi.experiments.fewshot import RunConfig
from metaphi.experiments.report import machine, save_config, write_json
from metaphi.outer import ESTIMATORS
from metaphi.outer.search import METHODS, best_trial, search

DIMS = ("inner_lr", "inner_steps", "meta_batch")


@dataclass
class TuneConfig:
    """``metaphi tune``: search ``algorithm``'s inner lr, inner steps and meta-batch on validation tasks."""

    algorithm: str | None = option(None, "the algorithm whose hyperparameters are searched", choices=ALGORITHMS,
                                   positional=True)
    benchmark: str = option("glyphs", "a benchmark with a validation split (glyphs is built in)")
    data_root: str | None = option(None, "folder with the data set's archives (none: $METAPHI_DATA or "
                                         "~/.cache/metaphi/data)")
    budget: int = option(12, "trials, the default configuration included", check="positive")
    method: str = option("reinforce", "search method", choices=METHODS)
    round_size: int = option(4, "proposals per update of the search distribution", check="positive", flag="--round")
    iterations: int | None = option(None, "meta-training iterations of a trial at the default meta-batch (none: the "
                                          "benchmark's)", check="positive")
    lr_range: list[float] | None = option(None, "inner lr range LOW HIGH, log scale (none: the default lr /10 to x5)",
                                          cli=False)  # the flag takes two numbers: metaphi.cli.tune adds it
    lr_points: int = option(9, "inner lr grid points for reinforce", check="positive")
    steps: list[int] = option(default_factory=lambda: [1, 2, 3, 4, 5], help="inner step counts to try",
                              check="nonneg")
    meta_batches: list[int] | None = option(None, "meta-batch sizes to try (none: the default's /4 to x2)",
                                            check="positive")
    max_eval_steps: int | None = option(None, "inner steps on validation tasks; the best count up to this is chosen "
                                              "(none: the larger of the default eval steps and the largest --steps)",
                                        check="positive")
    val_tasks: int = option(100, "validation tasks per trial", check="positive")
    val_seed: int = option(1235, "seed of the fixed validation tasks")
    ways: int | None = option(None, "classes per task (none: the benchmark's)", check="positive")
    shots: int | None = option(None, "support examples per class (none: the benchmark's)", check="positive")
    query: int | None = option(None, "query examples per class (none: the benchmark's)", check="positive")
    meta_lr: float | None = option(None, "outer step size (none: the benchmark's)", check="positive")
    estimator: str | None = option(None, "how trials meta-train (none: the algorithm's own)", choices=ESTIMATORS)
    algorithm_options: dict = option(default_factory=dict, cli=False,
                                     help="the family's own options (flags as for metaphi run)")
    estimator_options: dict = option(default_factory=dict, cli=False,
                                     help="the estimator's options (flags as for metaphi run)")
    seed: int = option(0, "seed of every trial's meta-training and of the search")
    device: str = option("cpu", "torch device", check="device")
    out: str | None = option(None, "output folder (none: runs/tune-ALGO-BENCHMARK-seedSEED)")
    plot: bool = option(True, "draw the trace PNG (needs matplotlib; --no-plot skips it)")
    quiet: bool = option(False, "no progress output")


@dataclass
class Space:
    """α log-uniform in ``lr``, ``steps`` and ``meta_batch`` from their lists; ``lr_points`` on the grid."""

    lr: tuple[float, float]
    steps: tuple[int, ...]
    meta_batch: tuple[int, ...]
    lr_points: int = 9
    dims = DIMS

    def grid(self) -> dict[str, list]:
        lo, hi = math.log(self.lr[0]), math.log(self.lr[1])
        n = self.lr_points
        lrs = [math.exp(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]
        return {"inner_lr": lrs, "inner_steps": list(self.steps), "meta_batch": list(self.meta_batch)}

    def from_indices(self, idx) -> dict:
        grid = self.grid()
        return {d: grid[d][int(i)] for d, i in zip(DIMS, idx)}

    def from_unit(self, u: torch.Tensor) -> dict:
        """A point of [0, 1]³ (clipped) as a configuration: α continuous, the counts snapped to their lists."""
        u = u.double().clamp(0, 1)
        lo, hi = math.log(self.lr[0]), math.log(self.lr[1])
        pick = lambda options, x: options[min(int(round(float(x) * (len(options) - 1))), len(options) - 1)]
        return {"inner_lr": math.exp(lo + (hi - lo) * float(u[0])), "inner_steps": pick(self.steps, u[1]),
                "meta_batch": pick(self.meta_batch, u[2])}

    def to_unit(self, config: dict) -> torch.Tensor:
        lo, hi = math.log(self.lr[0]), math.log(self.lr[1])
        where = lambda options, v: (min(range(len(options)), key=lambda i: abs(options[i] - v))
                                    / max(len(options) - 1, 1))
        return torch.tensor([(math.log(config["inner_lr"]) - lo) / (hi - lo) if hi > lo else 0.5,
                             where(self.steps, config["inner_steps"]), where(self.meta_batch, config["meta_batch"])],
                            dtype=torch.float64).clamp(0, 1)



def trial_iterations(base_iterations: int, base_meta_batch: int, meta_batch: int) -> int:
    """Iterations that see as many training tasks as the default configuration."""
    return max(1, round(base_iterations * base_meta_batch / meta_batch))


def base_run(config: TuneConfig, benchmark) -> RunConfig:
    """The run config every trial starts from: the tune config's run settings, completed as
    ``metaphi run`` completes them (the family's and the benchmark's defaults)."""
    from metaphi.experiments.fewshot import complete

    run = RunConfig(algorithm=config.algorithm, benchmark=config.benchmark, data_root=config.data_root,
                    ways=config.ways, shots=config.shots, query=config.query, meta_lr=config.meta_lr,
                    iterations=config.iterations, estimator=config.estimator,
                    algorithm_options=config.algorithm_options, estimator_options=config.estimator_options,
                    seed=config.seed, device=config.device, baselines=False, quiet=True)
    return complete(run, benchmark)


def make_objective(base: RunConfig, benchmark, val_tasks: int, val_seed: int, max_eval_steps: int,
                   progress: bool = False) -> Callable[[dict], dict]:
    """``objective(point)``: meta-train as ``metaphi run`` does with the point's inner lr, inner steps
    and meta-batch (iterations scaled to see as many tasks as ``base``), then the best score over 0 to
    ``max_eval_steps`` inner steps on fixed validation tasks."""
    from metaphi.evaluate import evaluate
    from metaphi.experiments.fewshot import make_algorithm, make_estimator, meta_train_algorithm
    from metaphi.train import NonFiniteLoss

    higher = benchmark.problem.higher_is_better
    val_sampler = benchmark.episodes("val", base.ways, base.eval_shots, base.eval_query)

    def objective(point: dict) -> dict:
        started = time.perf_counter()
        iterations = trial_iterations(base.iterations, base.meta_batch, point["meta_batch"])
        config = dataclasses.replace(base, inner_lr=point["inner_lr"], inner_steps=point["inner_steps"],
                                     meta_batch=point["meta_batch"], iterations=iterations, eval_steps=max_eval_steps)
        algorithm = make_algorithm(config, benchmark)  # every trial starts from the same initial weights
        estimator = make_estimator(config, algorithm)
        record = {"iterations": iterations}
        try:
            state = meta_train_algorithm(config, benchmark, algorithm, estimator, progress=progress)
            val = evaluate(algorithm, state.phi, val_sampler, val_tasks, val_seed, max_eval_steps, device=config.device)
            means = torch.tensor([row["mean"] for row in val["per_step"]], dtype=torch.float64)
            if not torch.isfinite(means).all():
                raise NonFiniteLoss("a non-finite validation score")
            step = int(means.argmax() if higher else means.argmin())
            row = val["per_step"][step]
            record.update({"eval_steps": step, "val": row["mean"], "val_ci95": row["ci95"],
                           "score": row["mean"] if higher else -row["mean"], "diverged": False})
        except NonFiniteLoss:
            record.update({"eval_steps": None, "val": float("nan"), "val_ci95": float("nan"), "score": float("-inf"),
                           "diverged": True})
        record["seconds"] = round(time.perf_counter() - started, 2)
        return record

    return objective


# -- plot and command ------------------------------------------------------------------------------------------

def plot_trace(trials: list[dict], metric: str, higher: bool, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [t["trial"] for t in trials]
    ys = [t["val"] for t in trials]
    best, running = [], None
    for t in trials:
        if math.isfinite(t["score"]) and (running is None or t["score"] > running["score"]):
            running = t
        best.append(running["val"] if running else float("nan"))
    fig, ax = plt.subplots(figsize=(7, 4))
    sc = ax.scatter(xs, ys, c=[math.log10(t["inner_lr"]) for t in trials], cmap="viridis", zorder=3,
                    label="trial (colour: log10 inner lr)")
    for t in trials:
        if math.isfinite(t["val"]):
            ax.annotate(f"{t['inner_steps']}/{t['meta_batch']}", (t["trial"], t["val"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.step(xs, best, where="post", color="C3", label="best so far")
    if math.isfinite(trials[0]["val"]):
        ax.axhline(trials[0]["val"], color="grey", ls="--", lw=1, label="default configuration")
    fig.colorbar(sc, ax=ax, label="log10 inner lr")
    ax.set_xlabel("trial (labels: inner steps / meta-batch)")
    ax.set_ylabel(f"validation {metric}" + (" (higher is better)" if higher else " (lower is better)"))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def option_flags(options: dict, cls) -> str:
    """`` --name value`` for each of ``options`` that differs from ``cls``'s default (a command line)."""
    from metaphi.config import default_of, fields, flag_of

    words = []
    for f in fields(cls):
        value = options.get(f.name, default_of(f))
        if value == default_of(f):
            continue
        if isinstance(value, bool):
            words.append(flag_of(f) if value else "--no-" + flag_of(f)[2:])
        else:
            words.append(f"{flag_of(f)} {','.join(map(str, value)) if isinstance(value, list) else value}")
    return "".join(" " + w for w in words)


def run(config: TuneConfig) -> int:
    """``metaphi tune``: writes best.json, trials.jsonl, trace.png and config.yaml to ``config.out``."""
    from metaphi.algorithms import options_class
    from metaphi.experiments.fewshot import load_benchmark, make_algorithm, make_estimator
    from metaphi.outer import estimator_options_class
    from metaphi.train import NonFiniteLoss

    if config.algorithm is None:
        raise UsageError(f"name the algorithm: metaphi tune ALGORITHM (valid: {', '.join(ALGORITHMS)})")
    if config.method == "cma":
        try:
            import cma  # noqa: F401
        except ImportError:
            raise UsageError("--method cma needs the 'cma' package: pip install 'metaphi[cma]'")
    if config.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("the trace plot needs matplotlib (pip install 'metaphi[plot]'); or pass --no-plot")
    if not config.steps:
        raise UsageError("--steps must list at least one inner step count")
    benchmark = load_benchmark(RunConfig(benchmark=config.benchmark, data_root=config.data_root))
    if benchmark.regression_tasks is None and "val" not in benchmark.splits:
        raise UsageError(f"benchmark '{benchmark.name}' has no validation split; tune never scores on test tasks")
    base = base_run(config, benchmark)
    steps = tuple(config.steps)
    meta_batches = tuple(config.meta_batches) if config.meta_batches else tuple(
        sorted({max(1, base.meta_batch // 4), max(1, base.meta_batch // 2), base.meta_batch, 2 * base.meta_batch}))
    lr_range = tuple(config.lr_range) if config.lr_range else (base.inner_lr / 10, base.inner_lr * 5)
    if len(lr_range) != 2 or not 0 < lr_range[0] <= lr_range[1]:
        raise UsageError(f"--lr-range must be 0 < LOW <= HIGH, got {' '.join(map(str, lr_range))}")
    max_eval_steps = config.max_eval_steps or max(base.eval_steps or 0, max(steps))
    space = Space(lr_range, steps, meta_batches, config.lr_points)
    start = {"inner_lr": float(base.inner_lr), "inner_steps": int(base.inner_steps), "meta_batch": int(base.meta_batch)}
    probe = make_algorithm(dataclasses.replace(base, eval_steps=1), benchmark)
    if not probe.trains:
        raise UsageError(f"{config.algorithm} has nothing to meta-train, so nothing to tune")
    make_estimator(base, probe)  # refused here, before any trial, when it does not fit the algorithm
    for split, shots, query in (("train", base.shots, base.query), ("val", base.eval_shots, base.eval_query)):
        benchmark.episodes(split, base.ways, shots, query)  # sizes are checked before any training
    out_dir = writable_dir(config.out or os.path.join("runs", f"tune-{config.algorithm}-{benchmark.name}-"
                                                              f"seed{config.seed}"))
    save_config(dataclasses.replace(
        config, ways=base.ways, shots=base.shots, query=base.query, meta_lr=base.meta_lr, iterations=base.iterations,
        estimator=base.estimator, algorithm_options=base.algorithm_options, estimator_options=base.estimator_options,
        lr_range=list(lr_range), meta_batches=list(meta_batches), max_eval_steps=max_eval_steps, out=out_dir), out_dir,
        "tune")
    progress = not config.quiet
    trials_path = os.path.join(out_dir, "trials.jsonl")
    open(trials_path, "w").close()
    metric = benchmark.problem.metric
    best_so_far = [None]

    def on_trial(t: dict) -> None:
        with open(trials_path, "a") as f:
            f.write(json.dumps(t) + "\n")
        if math.isfinite(t["score"]) and (best_so_far[0] is None or t["score"] > best_so_far[0]["score"]):
            best_so_far[0] = t
        if progress:
            result = "diverged" if t["diverged"] else f"val {metric} {t['val']:.4f} @ {t['eval_steps']} steps"
            best = best_so_far[0]["val"] if best_so_far[0] else float("nan")
            print(f"trial {t['trial'] + 1}/{config.budget} [{t['proposer']}{', seen' if t['cached'] else ''}] "
                  f"inner_lr={t['inner_lr']:.4g} inner_steps={t['inner_steps']} meta_batch={t['meta_batch']} "
                  f"({t['iterations']} it): {result} in {t['seconds']:.0f} s (best {best:.4f})", file=sys.stderr,
                  flush=True)

    started = time.perf_counter()
    objective = make_objective(base, benchmark, config.val_tasks, config.val_seed, max_eval_steps)
    generator = torch.Generator().manual_seed(config.seed)
    trials = search(objective, space, config.budget, config.method, generator, start, config.round_size, on_trial)
    try:
        best = best_trial(trials)
    except RuntimeError:
        raise NonFiniteLoss("every trial diverged; narrow --lr-range") from None
    d = benchmark.defaults
    run_iterations = trial_iterations(d["iterations"], base.meta_batch, best["meta_batch"])
    chosen = {k: best[k] for k in ("inner_lr", "inner_steps", "meta_batch", "eval_steps")}
    command = (f"metaphi run {config.algorithm} --benchmark {benchmark.name} --inner-lr {best['inner_lr']:.6g} "
               f"--inner-steps {best['inner_steps']} --eval-steps {best['eval_steps']} "
               f"--meta-batch {best['meta_batch']} --iterations {run_iterations}"
               + (f" --estimator {config.estimator}" if config.estimator else "")
               + option_flags(base.algorithm_options, options_class(config.algorithm))
               + option_flags(base.estimator_options, estimator_options_class(base.estimator)))
    summary = {
        "algorithm": config.algorithm, "benchmark": benchmark.name, "method": config.method, "budget": config.budget,
        "evaluated": sum(not t["cached"] for t in trials), "metric": metric,
        "higher_is_better": benchmark.problem.higher_is_better, "best": chosen, "best_trial": best["trial"],
        "val": best["val"], "val_ci95": best["val_ci95"], "default": {**start, "eval_steps": trials[0]["eval_steps"]},
        "default_val": trials[0]["val"], "run_iterations": run_iterations, "command": command,
        "space": {"inner_lr": list(space.lr), "inner_steps": list(space.steps), "meta_batch": list(space.meta_batch),
                  "max_eval_steps": max_eval_steps},
        "trial_iterations_at_default_batch": base.iterations, "val_tasks": config.val_tasks,
        "val_seed": config.val_seed, "seed": config.seed, "ways": base.ways, "shots": base.shots, "query": base.query,
        "wall_seconds": round(time.perf_counter() - started, 2), "machine": machine(),
    }
    write_json(summary, os.path.join(out_dir, "best.json"))
    if config.plot:
        plot_trace(trials, metric, benchmark.problem.higher_is_better, os.path.join(out_dir, "trace.png"),
                   f"metaphi tune {config.algorithm} --benchmark {benchmark.name} --method {config.method}")
    print(f"best of {len(trials)} trials ({summary['evaluated']} run) on {config.val_tasks} validation tasks: "
          f"{metric} {best['val']:.4f} ± {best['val_ci95']:.4f} (default {trials[0]['val']:.4f})")
    print(f"  {command}")
    print(f"wrote {os.path.join(out_dir, 'best.json')}, {trials_path}" +
          ("" if not config.plot else f" and {os.path.join(out_dir, 'trace.png')}"))
    return 0
