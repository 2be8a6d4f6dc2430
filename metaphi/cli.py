"""Command line: ``metaphi run | eval``.

Bad input exits with code 2 and one line that says what is wrong and what is valid; a run stopped by
a non-finite loss exits with code 3 and keeps its last good checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

USAGE_ERROR, NONFINITE = 2, 3


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _algorithm_names():
    from .algorithms import ALGORITHMS
    return list(ALGORITHMS)


#: further subcommands: modules with ``register(subparsers)``, which adds a parser whose ``func``
#: takes the parsed args and returns an exit code
COMMANDS: tuple[str, ...] = ("metaphi.predict", "metaphi.compare", "metaphi.tune", "metaphi.l2o_cli", "metaphi.domaingen",
                              "metaphi.distill", "metaphi.augment_cli", "metaphi.continual_cli", "metaphi.nas_cli",
                              "metaphi.reweight_cli")


THREADS_HELP = ("torch CPU threads (default: torch's choice, lowered to the cores left free by other work, "
                "judged by the 1-minute load average; OMP_NUM_THREADS, if set, is respected)")


def auto_threads(cpus: int, load: float, default: int) -> int:
    """Threads for this process: torch's ``default``, but no more than the cores that other work leaves
    free (``cpus`` minus the 1-minute ``load``), and at least one. Intra-op threads that have to share a
    core with another busy process wait on each other at every operation: on a 2-core machine with one
    other busy process, two threads ran meta-training several times slower than one."""
    free = cpus - int(round(load))
    return max(1, min(default, free))


def set_threads(requested: int | None) -> None:
    import torch
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads must be a positive number, got {requested}")
        torch.set_num_threads(requested)
    elif not os.environ.get("OMP_NUM_THREADS") and hasattr(os, "getloadavg"):
        torch.set_num_threads(auto_threads(os.cpu_count() or 1, os.getloadavg()[0], torch.get_num_threads()))


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from .benchmarks import BENCHMARKS
    from .outer import ESTIMATORS

    parser = _Parser(prog="metaphi", description="Meta-learning on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="meta-train an algorithm and test it on held-out tasks")
    run.add_argument("algorithm", choices=_algorithm_names())
    run.add_argument("--benchmark", default="glyphs",
                     help=f"one of {', '.join(BENCHMARKS)} (default: glyphs, built in)")
    run.add_argument("--data-root", default=None,
                     help="folder with the data set's archives (default: $METAPHI_DATA or ~/.cache/metaphi/data)")
    run.add_argument("--download", action="store_true", help="download missing archives (checked by SHA-256)")
    run.add_argument("--within-alphabet", action="store_true",
                     help="test and validation tasks take all their classes from one alphabet (group)")
    run.add_argument("--image-size", type=int, help="folder:PATH only: resize images to this size (default 84)")
    run.add_argument("--channels", type=int, choices=[1, 3], help="folder:PATH only: 1 (grey) or 3 (RGB, default)")
    run.add_argument("--invert", action="store_true", help="folder:PATH only: dark ink on light paper becomes high")
    run.add_argument("--split-file", help="folder:PATH only: a file mapping class -> train/val/test")
    run.add_argument("--ways", type=int)
    run.add_argument("--train-ways", type=int,
                     help="classes per meta-training task, for learners that take any number (protonet, matching, "
                          "relation; default: --ways)")
    run.add_argument("--init", metavar="[ssl:]CHECKPOINT",
                     help="start the network's body from a saved run's (ssl: insists on a self-supervised run)")
    run.add_argument("--shots", type=int, help="support examples per class (K) for meta-training")
    run.add_argument("--query", type=int, help="query examples per class for meta-training")
    run.add_argument("--eval-shots", type=int, help="support examples per class at test (default: --shots)")
    run.add_argument("--eval-query", type=int, help="query examples per class at test")
    run.add_argument("--inner-steps", type=int, help="inner steps during meta-training")
    run.add_argument("--eval-steps", type=int, help="inner steps at test")
    run.add_argument("--inner-lr", type=float)
    run.add_argument("--meta-batch", type=int, help="tasks per meta-update")
    run.add_argument("--meta-lr", type=float)
    run.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="outer optimizer")
    run.add_argument("--estimator", choices=list(ESTIMATORS),
                     help="how φ's update is estimated (default: the algorithm's own)")
    run.add_argument("--loop", action="store_true", help="run the tasks of a meta-batch one by one instead of as one vmap batch")
    run.add_argument("--task-chunk", type=int, metavar="N",
                     help="vmap at most N tasks at a time, each chunk's gradient taken before the next: memory of N "
                          "tasks instead of the meta-batch (default: the whole meta-batch in one vmap)")
    run.add_argument("--checkpoint-inner", action="store_true",
                     help="gradient-checkpoint each inner step: memory for long second-order inner loops, for "
                          "about two more forwards and one more inner backward per step (tasks run one by one)")
    run.add_argument("--compile", action="store_true",
                     help="compile each task's meta-gradient with torch.compile (second-order and first-order "
                          "estimators): faster meta-iterations after a first one that compiles for tens of seconds")
    run.add_argument("--solver", choices=["cg", "neumann"], help="implicit estimator: linear solver (default cg)")
    run.add_argument("--solver-steps", type=int, help="implicit estimator: most Hessian-vector products (default 5)")
    run.add_argument("--solver-tol", type=float, help="implicit estimator: relative residual to stop at")
    run.add_argument("--solver-damping", type=float, help="implicit estimator: δ added to the Hessian's diagonal")
    run.add_argument("--neumann-alpha", type=float, help="implicit estimator: Neumann step (default: the inner lr)")
    run.add_argument("--iterations", type=int)
    run.add_argument("--eval-tasks", type=int, help="test tasks (default 600)")
    run.add_argument("--val-every", type=int, default=100, help="validate every this many iterations")
    run.add_argument("--val-tasks", type=int, default=100)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    run.add_argument("--eval-seed", type=int, default=1234, help="seed of the fixed test tasks")
    run.add_argument("--device", default="cpu")
    run.add_argument("--out", default=None, help="output folder (default: runs/ALGO-BENCHMARK-...)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    run.add_argument("--no-baselines", action="store_true", help="skip the scratch and pre-training baselines")
    run.add_argument("--baseline-steps", type=int, default=10, help="fine-tuning steps of the baselines at test")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="re-evaluate a saved run on its fixed test tasks")
    ev.add_argument("checkpoint")
    ev.add_argument("--eval-tasks", type=int, default=None)
    ev.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    ev.add_argument("--eval-steps", type=int, default=None)
    ev.add_argument("--eval-seed", type=int, default=None)
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--within-alphabet", action="store_true",
                    help="test tasks take all their classes from one alphabet (group)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="write the result JSON here")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def _positive(name: str, value, allow_zero: bool = False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"--{name} must be {'>= 0' if allow_zero else 'a positive number'}, got {value}")


def _writable_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        raise UsageError(f"--out {path} is not a writable folder ({e.strerror}); choose another with --out")
    return path


def int_list(text: str, name: str) -> list[int]:
    """A comma list of non-negative integers from option ``--name`` (``"0,1,2"``), or a UsageError."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be a comma list of integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"--{name} must list non-negative integers, got {text!r}")
    return values


def name_list(text: str, valid, name: str = "methods") -> list[str]:
    """A comma list of names from option ``--name``, each one of ``valid``, or a UsageError."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in valid]
    if bad or not names:
        raise UsageError(f"--{name}: unknown {', '.join(bad) or '(none)'} (valid: {', '.join(valid)})")
    return names


def write_result(result: dict, out: str, table: str, quiet: bool, also: str = "") -> None:
    """``out``/result.json (with the machine) and ``out``/result.md (``table``); the table is printed unless
    ``quiet``, with the files written (``also`` names the others)."""
    result["machine"] = machine()
    write_json(result, os.path.join(out, "result.json"))
    with open(os.path.join(out, "result.md"), "w") as f:
        f.write(table + "\n")
    if not quiet:
        print(table)
        print(f"wrote {os.path.join(out, 'result.json')}, result.md{also}")


def write_json(obj, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def machine() -> str:
    import torch
    return (f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def resolve_run_settings(args, benchmark) -> dict:
    d = benchmark.defaults
    s = {k: getattr(args, k) if getattr(args, k) is not None else d.get(k)
         for k in ("ways", "shots", "query", "inner_lr", "inner_steps", "eval_steps", "meta_batch", "iterations",
                   "eval_tasks", "meta_lr")}
    s["eval_shots"] = args.eval_shots or d.get("eval_shots") or s["shots"]
    s["eval_query"] = args.eval_query or d.get("eval_query") or s["query"]
    if args.algorithm == "reptile" and args.inner_steps is None:
        s["inner_steps"] = max(5, s["inner_steps"])
    for name in ("ways", "shots", "query", "eval_shots", "eval_query", "meta_batch", "eval_tasks", "inner_lr",
                 "meta_lr"):
        _positive(name.replace("_", "-"), s[name])
    for name in ("inner_steps", "eval_steps", "iterations"):
        _positive(name.replace("_", "-"), s[name], allow_zero=True)
    _positive("val-every", args.val_every)
    _positive("val-tasks", args.val_tasks)
    _positive("baseline-steps", args.baseline_steps, allow_zero=True)
    return s


def train_and_test(name: str, benchmark, s: dict, args, out_dir: str, estimator_name: str | None = None,
                   eval_steps: int | None = None, progress: bool = True, init: str | None = None,
                   train_ways: int | None = None) -> dict:
    """Meta-train algorithm ``name`` with settings ``s`` and test it; returns its result dict.

    ``init``: ``[ssl:]CHECKPOINT`` whose body the network starts from; ``train_ways``: classes per
    meta-training task when it differs from the test's (learners with ``any_ways`` only)."""
    from .algorithms import create_algorithm
    from .evaluate import evaluate
    from .outer import BLACK_BOX, COMPILABLE, build_estimator
    from .train import TrainConfig, meta_train

    import torch

    eval_steps = s["eval_steps"] if eval_steps is None else eval_steps
    with torch.random.fork_rng():  # the initial weights come from the seed, and touch no global state
        torch.manual_seed(args.seed)
        algo = create_algorithm(name, benchmark, s["ways"], s["inner_lr"], s["inner_steps"], eval_steps)
    if init:
        from .algorithms.ssl import start_from
        algo = start_from(algo, init)
    train_ways = train_ways or s["ways"]
    if train_ways != s["ways"] and not getattr(algo, "any_ways", False):
        raise UsageError(f"--train-ways: {name} learns tasks of one size (only protonet, matching and relation "
                         f"take any number of classes)")
    estimator_name = estimator_name or (algo.estimators[0] if algo.estimators else "first-order")
    if algo.estimators and estimator_name not in tuple(algo.estimators) + BLACK_BOX:
        raise UsageError(f"--estimator {estimator_name} does not apply to {name} (valid: {', '.join(algo.estimators)})")
    test_sampler = benchmark.episodes("test", s["ways"], s["eval_shots"], s["eval_query"])
    sample_train = algo.training_tasks(benchmark, train_ways, s["shots"], s["query"])
    validate = None
    if "val" in benchmark.splits or benchmark.regression_tasks is not None:
        val_sampler = benchmark.episodes("val", s["ways"], s["eval_shots"], s["eval_query"])
        validate = lambda phi: evaluate(algo, phi, val_sampler, args.val_tasks, args.eval_seed + 1,
                                        device=args.device)["mean"]
    iterations = s["iterations"] if algo.trains else 0
    config = TrainConfig(iterations=iterations, meta_batch=s["meta_batch"], meta_lr=s["meta_lr"],
                         optimizer=args.optimizer, seed=args.seed, val_every=args.val_every, device=args.device)
    run = {"benchmark": benchmark.name, "data_root": args.data_root, "benchmark_options": benchmark_options(args),
           **s, "eval_steps": eval_steps,
           "estimator": estimator_name, "seed": args.seed, "eval_seed": args.eval_seed,
           "input": benchmark.input_spec(), "train_ways": train_ways, "init": init}
    started = time.perf_counter()
    solver_options = {k: getattr(args, k) for k in ("solver", "solver_steps", "solver_tol", "solver_damping",
                                                    "neumann_alpha") if getattr(args, k, None) is not None}
    if getattr(args, "compile", False):
        if estimator_name not in COMPILABLE:
            raise UsageError(f"--compile applies to the {' and '.join(COMPILABLE)} estimators, not '{estimator_name}'")
        if getattr(args, "checkpoint_inner", False):
            raise UsageError("--compile and --checkpoint-inner do not go together (a checkpointed inner loop runs "
                             "eagerly)")
        solver_options["compile"] = True
        if progress:
            print(f"{name}: --compile: the first meta-iteration compiles the meta-gradient (tens of seconds to "
                  "minutes on a CPU; cached on disk for runs with the same shapes)", file=sys.stderr, flush=True)
    estimator = build_estimator(estimator_name, vectorize=not args.loop,
                                checkpoint=getattr(args, "checkpoint_inner", False),
                                task_chunk=getattr(args, "task_chunk", None), **solver_options)
    state = meta_train(algo, estimator, sample_train, config, out_dir=out_dir, validate=validate,
                       resume=args.resume and os.path.exists(os.path.join(out_dir, "checkpoint.pt")), run=run,
                       progress=progress)
    from . import distributed
    if not distributed.is_main():  # under torchrun rank 0 alone tests and writes the results
        return {"algorithm": name, "rank": distributed.rank()}
    test = evaluate(algo, state.phi, test_sampler, s["eval_tasks"], args.eval_seed, device=args.device,
                    progress=progress, desc=f"test {name}")
    result = {
        "algorithm": name, "benchmark": benchmark.name, "metric": benchmark.problem.metric,
        "higher_is_better": benchmark.problem.higher_is_better,
        "mean": test["mean"], "ci95": test["ci95"], "per_step": test["per_step"],
        "iterations": state.iteration, "wall_seconds": time.perf_counter() - started,
        "train_seconds": state.train_seconds, "test_seconds": test["seconds"], "seed": args.seed,
        "eval_seed": args.eval_seed, "eval_tasks": s["eval_tasks"], "ways": s["ways"], "shots": s["shots"],
        "query": s["query"], "eval_shots": s["eval_shots"], "eval_query": s["eval_query"],
        "inner_lr": s["inner_lr"], "inner_steps": s["inner_steps"], "eval_steps": eval_steps,
        "meta_batch": s["meta_batch"], "meta_lr": s["meta_lr"], "estimator": estimator_name,
        "parameters": sum(v.numel() for v in state.phi.values()), "machine": machine(),
        "train_ways": train_ways, "init": init,
        "checkpoint": os.path.join(out_dir, "checkpoint.pt"), "processes": distributed.world_size(),
    }
    write_json(result, os.path.join(out_dir, "result.json"))
    return result


def format_table(result: dict) -> str:
    metric = result["metric"]
    lines = [f"{result['benchmark']} {result['ways']}-way {result['eval_shots']}-shot, {metric} on "
             f"{result['eval_tasks']} test tasks (seed {result['eval_seed']}), ± 95% CI",
             f"{'method':<10} {'steps':>5} {metric:>18} {'meta-train s':>13} {'test s':>8}"]
    rows = [result] + list(result.get("baselines", {}).values())
    for r in rows:
        scale, unit = (100.0, "%") if metric == "accuracy" else (1.0, "")
        value = f"{r['mean'] * scale:.2f} ± {r['ci95'] * scale:.2f}{unit}"
        lines.append(f"{r['algorithm']:<10} {len(r['per_step']) - 1:>5} {value:>18} {r['train_seconds']:>13.1f} "
                     f"{r['test_seconds']:>8.1f}")
    return "\n".join(lines)


def benchmark_options(args) -> dict:
    return {"download": args.download, "within_group": args.within_alphabet, "image_size": args.image_size,
            "channels": args.channels, "invert": args.invert, "split_file": args.split_file}


def cmd_run(args) -> int:
    """``metaphi run``; under ``torchrun`` every process runs it, joined into one process group."""
    from . import distributed

    args.device = distributed.init_from_env(args.device)
    try:
        return _run(args, distributed.is_main())
    finally:
        distributed.shutdown()


def _run(args, main_process: bool) -> int:
    from .algorithms import BASELINES
    from .benchmarks import build_benchmark

    _positive("image-size", args.image_size)
    benchmark = build_benchmark(args.benchmark, args.data_root, **benchmark_options(args))
    s = resolve_run_settings(args, benchmark)
    out_dir = args.out or os.path.join("runs", f"{args.algorithm}-{benchmark.name}-{s['ways']}w{s['shots']}s-seed{args.seed}")
    _writable_dir(out_dir)
    progress = not args.quiet and sys.stderr.isatty() or os.environ.get("METAPHI_PROGRESS") == "1"
    # Sizes are checked against the data before any training starts.
    for split, shots, query in (("train", s["shots"], s["query"]), ("test", s["eval_shots"], s["eval_query"])):
        benchmark.episodes(split, s["ways"], shots, query)
    _positive("train-ways", args.train_ways)
    _positive("task-chunk", args.task_chunk)
    result = train_and_test(args.algorithm, benchmark, s, args, out_dir, args.estimator, progress=progress,
                            init=args.init, train_ways=args.train_ways)
    if not args.no_baselines:
        result["baselines"] = {}
        for name in BASELINES:
            if name == args.algorithm:
                continue
            sub_dir = _writable_dir(os.path.join(out_dir, "baselines", name))
            result["baselines"][name] = train_and_test(name, benchmark, s, args, sub_dir,
                                                       eval_steps=args.baseline_steps, progress=progress)
        if main_process:
            write_json(result, os.path.join(out_dir, "result.json"))
    if not main_process:
        return 0
    print(format_table(result))
    print(f"wrote {os.path.join(out_dir, 'result.json')} and {os.path.join(out_dir, 'checkpoint.pt')}")
    return 0


def cmd_eval(args) -> int:
    from .algorithms import build_algorithm
    from .benchmarks import build_benchmark
    from .evaluate import evaluate
    from .train import load_checkpoint

    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"no checkpoint at {args.checkpoint}")
    try:
        ck = load_checkpoint(args.checkpoint)
    except Exception as e:  # a truncated or foreign file
        raise UsageError(f"{args.checkpoint} is not a readable metaphi checkpoint ({e})")
    _positive("eval-tasks", args.eval_tasks)
    _positive("eval-steps", args.eval_steps, allow_zero=True)
    run = ck["run"]
    algo = build_algorithm(ck["algorithm"])
    options = dict(run.get("benchmark_options", {}))
    if args.within_alphabet:
        options["within_group"] = True
    benchmark = build_benchmark(run["benchmark"], args.data_root or run.get("data_root"), **options)
    sampler = benchmark.episodes("test", run["ways"], run["eval_shots"], run["eval_query"])
    n = args.eval_tasks or run["eval_tasks"]
    seed = run["eval_seed"] if args.eval_seed is None else args.eval_seed
    phi = {k: v.to(args.device) for k, v in ck["phi"].items()}
    progress = not args.quiet and sys.stderr.isatty()
    test = evaluate(algo, phi, sampler, n, seed, args.eval_steps, device=args.device, progress=progress)
    result = {"algorithm": algo.name, "benchmark": benchmark.name, "metric": benchmark.problem.metric,
              "checkpoint": args.checkpoint, "iterations": ck["iteration"], **test}
    if args.out:
        write_json(result, args.out)
    print(json.dumps({k: result[k] for k in ("algorithm", "benchmark", "metric", "mean", "ci95", "tasks")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .tasks import DataError
    from .train import NonFiniteLoss

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and args.command != "run":
            raise UsageError(f"only 'metaphi run' runs on several processes (torchrun); run '{args.command}' "
                             "as one process")
        set_threads(getattr(args, "threads", None) or None)
        return args.func(args)
    except (UsageError, DataError) as e:
        print(f"metaphi: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except NonFiniteLoss as e:
        print(f"metaphi: stopped: {e}", file=sys.stderr)
        return NONFINITE


if __name__ == "__main__":
    sys.exit(main())
