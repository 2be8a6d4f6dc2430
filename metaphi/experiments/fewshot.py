"""Few-shot learning: meta-train an algorithm on a benchmark's tasks and test it on held-out ones
(``metaphi run``), and re-test a saved run (``metaphi eval``).

A run with ``--out`` writes checkpoint.pt, metrics.jsonl and result.json there; the scratch and
pre-training baselines run beside the algorithm unless asked not to.
"""
from __future__ import annotations

import json
import os
import sys
import time

from metaphi.config import UsageError, positive as _positive, writable_dir as _writable_dir
from metaphi.experiments.report import machine, write_json


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
    from metaphi.algorithms import create_algorithm
    from metaphi.evaluate import evaluate
    from metaphi.outer import BLACK_BOX, COMPILABLE, build_estimator
    from metaphi.train import TrainConfig, meta_train

    import torch

    eval_steps = s["eval_steps"] if eval_steps is None else eval_steps
    with torch.random.fork_rng():  # the initial weights come from the seed, and touch no global state
        torch.manual_seed(args.seed)
        algo = create_algorithm(name, benchmark, s["ways"], s["inner_lr"], s["inner_steps"], eval_steps)
    if init:
        from metaphi.algorithms.ssl import start_from
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
    from metaphi import distributed
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
    from metaphi import distributed

    args.device = distributed.init_from_env(args.device)
    try:
        return _run(args, distributed.is_main())
    finally:
        distributed.shutdown()


def _run(args, main_process: bool) -> int:
    from metaphi.algorithms import BASELINES
    from metaphi.tasks.registry import build_benchmark

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
    from metaphi.algorithms import build_algorithm
    from metaphi.tasks.registry import build_benchmark
    from metaphi.evaluate import evaluate
    from metaphi.train import load_checkpoint

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
