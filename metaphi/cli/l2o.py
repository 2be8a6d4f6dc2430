"""``metaphi l2o train | eval``: meta-train a learned optimizer, and compare optimizers on an optimizee family.

    metaphi l2o train --rule lstm --family glyphs --horizon 100 --unroll 20 --iterations 100 --out runs/l2o-lstm
    metaphi l2o eval runs/l2o-lstm/optimizer.pt --family glyphs-relu --horizons 100 200 --out relu.json

``train`` writes ``checkpoint.pt`` (resumable with ``--resume``), ``metrics.jsonl``, ``optimizer.pt``
(the best meta-parameters on validation problems; load it with ``metaphi.inner.optim.LearnedOptimizer``)
and ``result.json`` (its final loss on test problems). ``eval`` tunes the learning rate of each
hand-designed optimizer on a grid on validation problems and reports every optimizer's mean final loss
± 95% CI on the same test problems.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

RULE_NAMES = ("lstm", "mlp-rule", "per-layer-sgd", "schedule-sgd")


def register(subparsers) -> None:
    from metaphi.experiments.l2o import PRESETS

    l2o = subparsers.add_parser("l2o", help="learned optimizers: meta-train one, or compare optimizers")
    sub = l2o.add_subparsers(dest="l2o_command", required=True, parser_class=type(l2o))

    tr = sub.add_parser("train", help="meta-train a learned update rule by truncated backpropagation")
    tr.add_argument("--rule", choices=RULE_NAMES, default="lstm")
    tr.add_argument("--family", choices=list(PRESETS), default="quadratic", help="optimizee family")
    tr.add_argument("--horizon", type=int, default=100, help="optimizee steps per run")
    tr.add_argument("--unroll", type=int, default=20, help="steps per truncation (one meta-update each)")
    tr.add_argument("--iterations", type=int, default=100, help="optimizee runs")
    tr.add_argument("--problems", type=int, default=1, help="problems trained side by side in a run")
    tr.add_argument("--meta-lr", type=float, default=1e-3)
    tr.add_argument("--second-order", action="store_true",
                    help="backpropagate through the optimizee's gradients too (the paper drops these)")
    tr.add_argument("--estimator", choices=["backprop", "es"], default="backprop",
                    help="meta-gradient by backpropagation through the truncation, or by evolution strategies")
    tr.add_argument("--population", type=int, default=16, help="es: population size (even: antithetic pairs)")
    tr.add_argument("--sigma", type=float, default=0.01, help="es: perturbation scale")
    tr.add_argument("--clip", type=float, default=1.0, help="meta-gradient norm clip (0: off)")
    tr.add_argument("--lr", type=float, default=None,
                    help="starting step size of per-layer-sgd / schedule-sgd (0.1) and mlp-rule (Adam's, 0.01)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--val-every", type=int, default=10, help="validate every this many runs (0: never)")
    tr.add_argument("--val-problems", type=int, default=10)
    tr.add_argument("--max-seconds", type=float, default=None, help="stop after this much training time")
    tr.add_argument("--eval-problems", type=int, default=20, help="test problems scored at the end")
    tr.add_argument("--eval-seed", type=int, default=1234)
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    tr.add_argument("--out", default=None, help="output folder (default runs/l2o-RULE-FAMILY-seedS)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="compare learned optimizers with tuned hand-designed ones")
    ev.add_argument("optimizers", nargs="*", help="learned optimizer files (optimizer.pt)")
    ev.add_argument("--family", choices=list(PRESETS), default="quadratic")
    ev.add_argument("--horizons", type=int, nargs="+", default=[100, 200])
    ev.add_argument("--problems", type=int, default=20, help="test problems (seeds)")
    ev.add_argument("--seed", type=int, default=1234, help="seed of the test problems")
    ev.add_argument("--baselines", nargs="*", default=["sgd", "nesterov", "rmsprop", "adam"],
                    help="hand-designed optimizers, each with its learning rate tuned on --grid")
    ev.add_argument("--grid", type=float, nargs="+", default=None, help="learning rates tried (default 1e-4 .. 10)")
    ev.add_argument("--tune-problems", type=int, default=10)
    ev.add_argument("--tune-seed", type=int, default=77)
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--out", default=None, help="write the result JSON here")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)


def _check(args, names_positive: tuple[str, ...], names_nonneg: tuple[str, ...] = ()) -> None:
    from metaphi.config import UsageError

    for name in names_positive:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    for name in names_nonneg:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def make_rule(name: str, lr: float | None, horizon: int, seed: int):
    from metaphi.inner.learned import LSTMRule, MLPRule, PerLayerSGD, ScheduledSGD

    if name == "lstm":
        return LSTMRule(seed=seed)
    if name == "mlp-rule":
        return MLPRule(lr=0.01 if lr is None else lr, seed=seed)
    if name == "per-layer-sgd":
        return PerLayerSGD(0.1 if lr is None else lr)
    return ScheduledSGD(0.1 if lr is None else lr, steps=horizon)


def _progress(args) -> bool:
    return not args.quiet and (sys.stderr.isatty() or os.environ.get("METAPHI_PROGRESS") == "1")


def cmd_train(args) -> int:
    import torch

    from metaphi.config import UsageError, writable_dir as _writable_dir

    from metaphi.experiments.report import machine, write_json
    from metaphi.experiments.l2o import L2OConfig, build_family, evaluate_rule, meta_train, summarize
    from metaphi.inner.optim import load_learned

    _check(args, ("horizon", "unroll", "iterations", "problems", "meta_lr", "val_problems", "eval_problems", "lr",
                  "max_seconds", "threads", "sigma"), ("val_every", "clip"))
    if args.population < 2 or args.population % 2:
        raise UsageError(f"--population must be an even number >= 2 (antithetic pairs), got {args.population}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = _writable_dir(args.out or os.path.join("runs", f"l2o-{args.rule}-{args.family}-seed{args.seed}"))
    if args.resume and not os.path.exists(os.path.join(out, "checkpoint.pt")):
        raise UsageError(f"--resume: no checkpoint in {out}")
    family = build_family(args.family, split="train")
    val_family = build_family(args.family, split="val")
    test_family = build_family(args.family, split="test")
    rule = make_rule(args.rule, args.lr, args.horizon, args.seed)
    config = L2OConfig(horizon=args.horizon, unroll=args.unroll, iterations=args.iterations, problems=args.problems,
                       meta_lr=args.meta_lr, second_order=args.second_order, estimator=args.estimator,
                       es_population=args.population, es_sigma=args.sigma, clip=args.clip or None, seed=args.seed,
                       val_every=args.val_every, val_problems=args.val_problems, max_seconds=args.max_seconds)
    started = time.perf_counter()
    try:
        state = meta_train(rule, family, config, out_dir=out, resume=args.resume, val_family=val_family,
                           progress=_progress(args))
    except ValueError as e:  # a checkpoint of another configuration
        raise UsageError(str(e))
    rule, meta, info = load_learned(os.path.join(out, "optimizer.pt"))
    curve = evaluate_rule(rule, meta, test_family, args.horizon, args.eval_problems, args.eval_seed,
                          at=[args.horizon])
    result = {"rule": rule.spec(), "family": args.family, "family_spec": family.spec(), "config": vars_of(config),
              "iterations": state.iteration, "truncations": state.truncations, "stopped_early": state.stopped_early,
              "train_seconds": state.seconds, "best_val": None if state.best_meta is None else state.best_val,
              "test": summarize(curve, [args.horizon]), "eval_problems": args.eval_problems,
              "eval_seed": args.eval_seed, "wall_seconds": time.perf_counter() - started, "machine": machine(),
              "optimizer": os.path.join(out, "optimizer.pt")}
    write_json(result, os.path.join(out, "result.json"))
    test = result["test"][str(args.horizon)]
    print(f"{args.rule} on {args.family}: final loss after {args.horizon} steps {test['mean']:.4g} ± {test['ci95']:.2g} "
          f"({args.eval_problems} test problems), {state.iteration} runs in {state.seconds:.0f} s")
    print(f"wrote {os.path.join(out, 'result.json')} and {os.path.join(out, 'optimizer.pt')}")
    return 0


def vars_of(config) -> dict:
    from dataclasses import asdict
    return asdict(config)


def compare(family_name: str, learned: dict, horizons: list[int], problems: int, seed: int, baselines: list[str],
            grid, tune_problems: int, tune_seed: int, progress: bool = False) -> dict:
    """Every optimizer's final loss at each horizon on the same test problems; baselines tuned first.

    ``learned`` maps a label to ``(rule, meta)``. Returns ``{"rows": {label: row}, "curves": {label:
    mean loss per step}}``; a row holds ``{str(horizon): {mean, ci95, diverged[, lr]}}``.
    """
    import torch
    from tqdm.auto import tqdm

    from metaphi.experiments.l2o import LR_GRID, baseline, build_family, evaluate_optimizer, evaluate_rule, summarize, tune_learning_rate

    test_family = build_family(family_name, split="test")
    tune_family = build_family(family_name, split="val")
    top = max(horizons)
    rows, curves = {}, {}
    jobs = [("baseline", b) for b in baselines] + [("learned", k) for k in learned]
    for kind, label in tqdm(jobs, desc=f"eval {family_name}", disable=not progress, leave=False):
        started = time.perf_counter()
        if kind == "baseline":
            tuned = tune_learning_rate(label, tune_family, horizons, tune_problems, tune_seed, grid or LR_GRID)
            row = {}
            by_lr = {}
            for h in horizons:
                lr = tuned[h]["lr"]
                if lr not in by_lr:
                    by_lr[lr] = evaluate_optimizer(baseline(label, lr), test_family, top, problems, seed)
                row[str(h)] = {**summarize(by_lr[lr], [h])[str(h)], "lr": lr, "tuning_grid": tuned[h]["grid"]}
            curve = by_lr[tuned[top]["lr"]]
        else:
            rule, meta = learned[label]
            try:
                curve = evaluate_rule(rule, meta, test_family, top, problems, seed)
            except ValueError as e:  # a per-layer rule on a net with other tensors
                rows[label] = {"error": str(e)}
                continue
            row = summarize(curve, horizons)
        row["seconds"] = time.perf_counter() - started
        rows[label] = row
        curves[label] = [float(v) for v in torch.where(torch.isfinite(curve), curve, torch.nan).nanmean(1)]
    return {"rows": rows, "curves": curves}


def format_rows(title: str, rows: dict, horizons: list[int]) -> str:
    lines = [title, f"{'optimizer':<16}" + "".join(f"{'T=' + str(h):>26}" for h in horizons)]
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"{label:<16} n/a ({row['error'][:60]})")
            continue
        cells = []
        for h in horizons:
            r = row[str(h)]
            cell = f"{r['mean']:.4g} ± {r['ci95']:.2g}" if r["diverged"] == 0 else f"diverged ({r['diverged']})"
            if "lr" in r:
                cell += f" (lr {r['lr']:g})"
            cells.append(f"{cell:>26}")
        lines.append(f"{label:<16}" + "".join(cells))
    return "\n".join(lines)


def cmd_eval(args) -> int:
    import torch

    from metaphi.config import UsageError

    from metaphi.experiments.report import machine, write_json
    from metaphi.experiments.l2o import BASELINES
    from metaphi.inner.optim import load_learned

    _check(args, ("problems", "tune_problems", "threads"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(h < 1 for h in args.horizons):
        raise UsageError(f"--horizons must be positive, got {args.horizons}")
    unknown = [b for b in args.baselines if b not in BASELINES]
    if unknown:
        raise UsageError(f"unknown baseline {unknown[0]} (valid: {', '.join(BASELINES)})")
    if args.grid and any(lr <= 0 for lr in args.grid):
        raise UsageError("--grid learning rates must be positive")
    learned = {}
    for path in args.optimizers:
        try:
            rule, meta, _ = load_learned(path)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e))
        label = f"{rule.spec()['name']}:{os.path.basename(os.path.dirname(os.path.abspath(path)))}"
        learned[label] = (rule, meta)
    if not learned and not args.baselines:
        raise UsageError("nothing to evaluate: give learned optimizer files or --baselines")
    started = time.perf_counter()
    horizons = sorted(set(args.horizons))
    result = compare(args.family, learned, horizons, args.problems, args.seed, args.baselines, args.grid,
                     args.tune_problems, args.tune_seed, progress=_progress(args))
    result.update({"family": args.family, "horizons": horizons, "problems": args.problems, "seed": args.seed,
                   "tune_problems": args.tune_problems, "tune_seed": args.tune_seed,
                   "optimizers": list(args.optimizers), "wall_seconds": time.perf_counter() - started,
                   "machine": machine()})
    print(format_rows(f"{args.family}: mean final loss ± 95% CI over {args.problems} test problems (seed {args.seed})",
                      result["rows"], horizons))
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    return 0
