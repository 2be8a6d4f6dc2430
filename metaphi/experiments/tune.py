"""``metaphi tune``: meta-learning's own hyperparameters, searched on validation tasks.

Learning to learn to learn: MAML and its family have hyperparameters of their own (the inner step
size α, the number of inner steps, the meta-batch size) and the loss of a configuration, the
validation score after meta-training with it, is not differentiable in them. So they are searched
with the black-box estimators of ``metaphi.outer``:

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
this writes. The first trial is always the benchmark's default configuration, so the result is never
worse than the default on validation.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from metaphi.config import UsageError, positive as _positive, writable_dir as _writable_dir

from metaphi.experiments.report import machine, write_json

METHODS = ("reinforce", "es", "cma", "random")
DIMS = ("inner_lr", "inner_steps", "meta_batch")


@dataclass
class Space:
    """α log-uniform in ``lr``, ``steps`` and ``meta_batch`` from their lists; ``lr_points`` on the grid."""

    lr: tuple[float, float]
    steps: tuple[int, ...]
    meta_batch: tuple[int, ...]
    lr_points: int = 9

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
        where = lambda options, v: (min(range(len(options)), key=lambda i: abs(options[i] - v)) / max(len(options) - 1, 1))
        return torch.tensor([(math.log(config["inner_lr"]) - lo) / (hi - lo) if hi > lo else 0.5,
                             where(self.steps, config["inner_steps"]), where(self.meta_batch, config["meta_batch"])],
                            dtype=torch.float64).clamp(0, 1)


# -- searchers: propose(n) -> configurations; observe(configurations, scores) with higher = better -----------

class RandomSearch:
    def __init__(self, space: Space, generator: torch.Generator, **_):
        self.space, self.generator = space, generator

    def propose(self, n: int) -> list[dict]:
        return [self.space.from_unit(torch.rand(3, generator=self.generator, dtype=torch.float64)) for _ in range(n)]

    def observe(self, configs: list[dict], scores: list[float]) -> None:
        pass


class ReinforceSearch:
    """A categorical per dimension over the grid; logits follow REINFORCE on −score with Adam."""

    def __init__(self, space: Space, generator: torch.Generator, lr: float = 0.2, decay: float = 0.8, **_):
        from metaphi.outer.reinforce import baseline_init

        self.space, self.generator, self.decay = space, generator, decay
        sizes = [len(v) for v in space.grid().values()]
        self.logits = [torch.zeros(n, dtype=torch.float64, requires_grad=True) for n in sizes]
        self.optimizer = torch.optim.Adam(self.logits, lr=lr)
        self.baseline = baseline_init()
        self._draws: list[torch.Tensor] = []

    def propose(self, n: int) -> list[dict]:
        from metaphi.outer.reinforce import sample

        self._draws = [sample(l, "categorical", self.generator, n) for l in self.logits]
        return [self.space.from_indices([d[i] for d in self._draws]) for i in range(n)]

    def observe(self, configs: list[dict], scores: list[float]) -> None:
        from metaphi.outer.reinforce import baseline_update, reinforce_gradient

        losses = -torch.tensor(scores, dtype=torch.float64)
        b = self.baseline["value"] if self.baseline["count"] else float(losses.mean())
        self.optimizer.zero_grad()
        for logits, z in zip(self.logits, self._draws):
            logits.grad = reinforce_gradient(logits, z[:len(scores)], losses, b, "categorical")
        self.optimizer.step()
        self.baseline = baseline_update(self.baseline, losses, self.decay)

    def probabilities(self) -> dict[str, list[float]]:
        return {d: torch.softmax(l.detach(), -1).tolist() for d, l in zip(DIMS, self.logits)}


class ESSearch:
    """Antithetic ES on the [0, 1]³ encoding, from the default configuration, with Adam on the centre."""

    def __init__(self, space: Space, generator: torch.Generator, start: dict, sigma: float = 0.15, lr: float = 0.1, **_):
        self.space, self.generator, self.sigma = space, generator, sigma
        self.center = space.to_unit(start).clone().requires_grad_()
        self.optimizer = torch.optim.Adam([self.center], lr=lr)
        self._noise = None

    def propose(self, n: int) -> list[dict]:
        from metaphi.outer.es import antithetic_noise

        pairs = max(1, n // 2)
        self._noise = antithetic_noise(pairs, 3, self.generator, torch.float64)
        c = self.center.detach()
        population = torch.cat([c + self.sigma * self._noise, c - self.sigma * self._noise])
        return [self.space.from_unit(u) for u in population][:n]

    def observe(self, configs: list[dict], scores: list[float]) -> None:
        from metaphi.outer.es import es_gradient

        if len(scores) != 2 * self._noise.shape[0]:
            return  # the budget cut a population short: a lone member has no antithetic partner
        self.optimizer.zero_grad()
        self.center.grad = es_gradient(-torch.tensor(scores, dtype=torch.float64), self._noise, self.sigma)
        self.optimizer.step()
        with torch.no_grad():
            self.center.clamp_(0, 1)


class CMASearch:
    def __init__(self, space: Space, generator: torch.Generator, start: dict, round_size: int = 4, **_):
        from metaphi.outer.es import CMAES

        self.space = space
        self.cma = CMAES(space.to_unit(start).tolist(), 0.25, generator, popsize=max(round_size, 2), bounds=(0.0, 1.0))
        self._asked = None

    def propose(self, n: int) -> list[dict]:
        self._asked = self.cma.ask()
        return [self.space.from_unit(u) for u in self._asked][:n]

    def observe(self, configs: list[dict], scores: list[float]) -> None:
        if len(scores) == len(self._asked):
            self.cma.tell(self._asked, [-s for s in scores])


def make_searcher(method: str, space: Space, generator: torch.Generator, start: dict, round_size: int):
    classes = {"random": RandomSearch, "reinforce": ReinforceSearch, "es": ESSearch, "cma": CMASearch}
    if method not in classes:
        raise ValueError(f"unknown search method '{method}' (valid: {', '.join(METHODS)})")
    return classes[method](space, generator, start=start, round_size=round_size)


def _key(config: dict) -> tuple:
    return (round(config["inner_lr"], 12), config["inner_steps"], config["meta_batch"])


def search(objective: Callable[[dict], dict], space: Space, budget: int, method: str, generator: torch.Generator,
           start: dict, round_size: int = 4, on_trial: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ``budget`` trials: ``start`` first, then rounds of ``round_size`` proposals of ``method``.

    ``objective(config)`` returns a dict with ``score`` (higher is better). A configuration proposed
    again is not re-run (every trial starts from the same seed, so it would score the same); it still
    counts toward the budget, so a converged search ends. Returns the trial records in order.
    """
    searcher = make_searcher(method, space, generator, start, round_size)
    cache: dict[tuple, dict] = {}
    trials: list[dict] = []

    def run(config: dict, proposer: str) -> dict:
        key = _key(config)
        cached = key in cache
        if not cached:
            cache[key] = objective(config)
        record = {"trial": len(trials), "proposer": proposer, "cached": cached, **config, **cache[key]}
        trials.append(record)
        if on_trial:
            on_trial(record)
        return record

    run(dict(start), "default")
    while len(trials) < budget:
        n = min(round_size, budget - len(trials))
        configs = searcher.propose(n)
        scores = [run(c, method)["score"] for c in configs]
        # a failed trial (a diverging run) ranks below every finished one
        finite = [s for s in scores if math.isfinite(s)]
        floor = (min(finite) - 1.0) if finite else -1.0
        searcher.observe(configs, [s if math.isfinite(s) else floor for s in scores])
    return trials


def best_trial(trials: list[dict]) -> dict:
    finished = [t for t in trials if math.isfinite(t["score"])]
    if not finished:
        raise RuntimeError("every trial diverged; narrow --lr-range")
    return max(finished, key=lambda t: t["score"])


# -- the objective: meta-train with a configuration, score it on validation tasks -----------------------------

def trial_iterations(base_iterations: int, base_meta_batch: int, meta_batch: int) -> int:
    """Iterations that see as many training tasks as the default configuration."""
    return max(1, round(base_iterations * base_meta_batch / meta_batch))


def make_objective(name: str, benchmark, settings: dict, args, progress: bool) -> Callable[[dict], dict]:
    from metaphi.algorithms import create_algorithm
    from metaphi.evaluate import evaluate
    from metaphi.outer import build_estimator
    from metaphi.train import NonFiniteLoss, TrainConfig, meta_train

    higher = benchmark.problem.higher_is_better
    val_sampler = benchmark.episodes("val", settings["ways"], settings["eval_shots"], settings["eval_query"])

    def objective(config: dict) -> dict:
        started = time.perf_counter()
        iterations = trial_iterations(settings["iterations"], settings["meta_batch"], config["meta_batch"])
        with torch.random.fork_rng():  # every trial starts from the same initial weights
            torch.manual_seed(args.seed)
            algo = create_algorithm(name, benchmark, settings["ways"], config["inner_lr"], config["inner_steps"],
                                    args.max_eval_steps)
        estimator = build_estimator(args.estimator or algo.estimators[0], vectorize=not args.loop)
        sample = algo.training_tasks(benchmark, settings["ways"], settings["shots"], settings["query"])
        train_config = TrainConfig(iterations=iterations, meta_batch=config["meta_batch"], meta_lr=settings["meta_lr"],
                                   seed=args.seed, device=args.device)
        record = {"iterations": iterations}
        try:
            state = meta_train(algo, estimator, sample, train_config, progress=progress)
            val = evaluate(algo, state.phi, val_sampler, args.val_tasks, args.val_seed, args.max_eval_steps,
                           device=args.device)
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


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got '{text}'")
    if not values:
        raise UsageError(f"expected comma-separated integers, got '{text}'")
    return values


def register(subparsers) -> None:
    from metaphi.algorithms import ALGORITHMS
    from metaphi.outer import ESTIMATORS

    p = subparsers.add_parser("tune", help="search inner lr, inner steps and meta-batch on validation tasks")
    p.add_argument("algorithm", choices=list(ALGORITHMS))
    p.add_argument("--benchmark", default="glyphs", help="a benchmark with a validation split (default: glyphs)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--budget", type=int, default=12, help="trials, the default configuration included (default 12)")
    p.add_argument("--method", choices=METHODS, default="reinforce", help="search method (default: reinforce)")
    p.add_argument("--round", type=int, default=4, dest="round_size",
                   help="proposals per update of the search distribution (default 4)")
    p.add_argument("--iterations", type=int,
                   help="meta-training iterations of a trial at the default meta-batch (default: the benchmark's)")
    p.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="inner lr range, log scale (default: the benchmark's lr /10 to x5)")
    p.add_argument("--lr-points", type=int, default=9, help="inner lr grid points for reinforce (default 9)")
    p.add_argument("--steps", default="1,2,3,4,5", help="inner step counts to try (default 1,2,3,4,5)")
    p.add_argument("--meta-batches", default=None, help="meta-batch sizes to try (default: the benchmark's /4 to x2)")
    p.add_argument("--max-eval-steps", type=int,
                   help="inner steps on validation tasks; the best count up to this is chosen (default: "
                        "the larger of the benchmark's eval steps and the largest --steps)")
    p.add_argument("--val-tasks", type=int, default=100, help="validation tasks per trial (default 100)")
    p.add_argument("--val-seed", type=int, default=1235, help="seed of the fixed validation tasks")
    p.add_argument("--ways", type=int)
    p.add_argument("--shots", type=int)
    p.add_argument("--query", type=int)
    p.add_argument("--meta-lr", type=float)
    p.add_argument("--estimator", choices=list(ESTIMATORS), help="how trials meta-train (default: the algorithm's own)")
    p.add_argument("--loop", action="store_true", help="run the tasks of a meta-batch one by one")
    p.add_argument("--seed", type=int, default=0, help="seed of every trial's meta-training and of the search")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output folder (default: runs/tune-ALGO-BENCHMARK-seedS)")
    p.add_argument("--no-plot", action="store_true", help="skip the trace PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from metaphi.algorithms import create_algorithm
    from metaphi.tasks.registry import build_benchmark

    for name in ("budget", "round_size", "iterations", "val_tasks", "lr_points", "ways", "shots", "query", "meta_lr",
                 "max_eval_steps"):
        _positive(name.replace("_", "-") if name != "round_size" else "round", getattr(args, name))
    if args.method == "cma":
        try:
            import cma  # noqa: F401
        except ImportError:
            raise UsageError("--method cma needs the 'cma' package: pip install 'metaphi[cma]'")
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("the trace plot needs matplotlib (pip install 'metaphi[plot]'); or pass --no-plot")
    benchmark = build_benchmark(args.benchmark, args.data_root)
    if benchmark.regression_tasks is None and "val" not in benchmark.splits:
        raise UsageError(f"benchmark '{benchmark.name}' has no validation split; tune never scores on test tasks")
    d = benchmark.defaults
    s = {k: getattr(args, k, None) if getattr(args, k, None) is not None else d.get(k)
         for k in ("ways", "shots", "query", "meta_lr", "iterations")}
    s["meta_batch"] = d["meta_batch"]
    s["eval_shots"] = d.get("eval_shots") or s["shots"]
    s["eval_query"] = d.get("eval_query") or s["query"]
    steps = _int_list(args.steps)
    meta_batches = _int_list(args.meta_batches) if args.meta_batches else tuple(
        sorted({max(1, d["meta_batch"] // 4), max(1, d["meta_batch"] // 2), d["meta_batch"], 2 * d["meta_batch"]}))
    if min(meta_batches) < 1:
        raise UsageError(f"--meta-batches must be positive, got {args.meta_batches}")
    if min(steps) < 0:
        raise UsageError(f"--steps must be >= 0, got {args.steps}")
    lr_range = tuple(args.lr_range) if args.lr_range else (d["inner_lr"] / 10, d["inner_lr"] * 5)
    if not 0 < lr_range[0] <= lr_range[1]:
        raise UsageError(f"--lr-range must be 0 < LOW <= HIGH, got {lr_range[0]} {lr_range[1]}")
    if args.max_eval_steps is None:
        args.max_eval_steps = max(d.get("eval_steps") or 0, max(steps))
    space = Space(lr_range, steps, meta_batches, args.lr_points)
    start = {"inner_lr": float(d["inner_lr"]), "inner_steps": int(d["inner_steps"]), "meta_batch": int(d["meta_batch"])}
    probe = create_algorithm(args.algorithm, benchmark, s["ways"], start["inner_lr"], start["inner_steps"], 1)
    if not probe.trains:
        raise UsageError(f"{args.algorithm} has nothing to meta-train, so nothing to tune")
    if args.estimator and probe.estimators and args.estimator not in tuple(probe.estimators) + _black_box():
        raise UsageError(f"--estimator {args.estimator} does not apply to {args.algorithm} "
                         f"(valid: {', '.join(probe.estimators)})")
    for split, shots, query in (("train", s["shots"], s["query"]), ("val", s["eval_shots"], s["eval_query"])):
        benchmark.episodes(split, s["ways"], shots, query)  # sizes are checked before any training
    out_dir = _writable_dir(args.out or os.path.join("runs", f"tune-{args.algorithm}-{benchmark.name}-seed{args.seed}"))
    progress = not args.quiet
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
            print(f"trial {t['trial'] + 1}/{args.budget} [{t['proposer']}{', seen' if t['cached'] else ''}] "
                  f"inner_lr={t['inner_lr']:.4g} inner_steps={t['inner_steps']} meta_batch={t['meta_batch']} "
                  f"({t['iterations']} it): {result} in {t['seconds']:.0f} s (best {best:.4f})", file=sys.stderr,
                  flush=True)

    started = time.perf_counter()
    objective = make_objective(args.algorithm, benchmark, s, args, progress=False)
    generator = torch.Generator().manual_seed(args.seed)
    trials = search(objective, space, args.budget, args.method, generator, start, args.round_size, on_trial)
    best = best_trial(trials)
    run_iterations = trial_iterations(d["iterations"], d["meta_batch"], best["meta_batch"])
    config = {k: best[k] for k in ("inner_lr", "inner_steps", "meta_batch", "eval_steps")}
    command = (f"metaphi run {args.algorithm} --benchmark {benchmark.name} --inner-lr {best['inner_lr']:.6g} "
               f"--inner-steps {best['inner_steps']} --eval-steps {best['eval_steps']} "
               f"--meta-batch {best['meta_batch']} --iterations {run_iterations}")
    summary = {
        "algorithm": args.algorithm, "benchmark": benchmark.name, "method": args.method, "budget": args.budget,
        "evaluated": sum(not t["cached"] for t in trials), "metric": metric,
        "higher_is_better": benchmark.problem.higher_is_better, "best": config, "best_trial": best["trial"],
        "val": best["val"], "val_ci95": best["val_ci95"], "default": {**start, "eval_steps": trials[0]["eval_steps"]},
        "default_val": trials[0]["val"], "run_iterations": run_iterations, "command": command,
        "space": {"inner_lr": list(space.lr), "inner_steps": list(space.steps), "meta_batch": list(space.meta_batch),
                  "max_eval_steps": args.max_eval_steps},
        "trial_iterations_at_default_batch": s["iterations"], "val_tasks": args.val_tasks, "val_seed": args.val_seed,
        "seed": args.seed, "ways": s["ways"], "shots": s["shots"], "query": s["query"],
        "wall_seconds": round(time.perf_counter() - started, 2), "machine": machine(),
    }
    write_json(summary, os.path.join(out_dir, "best.json"))
    if not args.no_plot:
        plot_trace(trials, metric, benchmark.problem.higher_is_better, os.path.join(out_dir, "trace.png"),
                   f"metaphi tune {args.algorithm} --benchmark {benchmark.name} --method {args.method}")
    print(f"best of {len(trials)} trials ({summary['evaluated']} run) on {args.val_tasks} validation tasks: "
          f"{metric} {best['val']:.4f} ± {best['val_ci95']:.4f} (default {trials[0]['val']:.4f})")
    print(f"  {command}")
    print(f"wrote {os.path.join(out_dir, 'best.json')}, {trials_path}" +
          ("" if args.no_plot else f" and {os.path.join(out_dir, 'trace.png')}"))
    return 0


def _black_box() -> tuple[str, ...]:
    from metaphi.outer import BLACK_BOX

    return BLACK_BOX
