"""metaphi search-arch: architecture search on one data set, then the result retrained from scratch.

The data set is split (stratified, seeded) into train / val / test. A searcher looks for a cell
genotype (metaphi/nas/space.py) using train for weights and val for judging architectures:
DARTS first or second order (metaphi/nas/darts.py), or REINFORCE, regularized evolution or random
search (metaphi/nas/blackbox.py). All get the same budget in model evaluations (minibatch gradient
evaluations of a network, search network or child). The genotype found is exported as JSON,
retrained from scratch on train and tested on test.

Writes to --out: ``genotype.json`` (the exported architecture), ``result.json`` (method, genotype,
search cost in seconds and model evaluations, validation and test accuracy, settings, machine) and
``checkpoint.pt`` (the search state; ``--resume`` continues a killed search to the same result).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from metaphi.tasks.registry import NAMED as DATA
from metaphi.tasks.registry import load_named as load_store

METHODS = ("darts-1", "darts-2", "reinforce", "evolution", "random", "retrain")


def budget_plan(method: str, budget: int, child_steps: int, darts_settings=None, samples: int = 1) -> dict:
    """DARTS iterations or black-box candidates that the budget (model evaluations) buys."""
    if method.startswith("darts"):
        per = darts_settings.grad_evals_per_iteration()
        return {"iterations": budget // per, "per_unit": per}
    per = child_steps + 1
    n = budget // per
    if method == "reinforce":
        n -= n % samples
    return {"candidates": n, "per_unit": per}


def run_search(args, data: dict, config, progress: bool) -> dict:
    """The search part of ``search-arch``: returns the searcher's output dict."""
    from metaphi.config import UsageError
    from metaphi.nas import blackbox, darts
    from metaphi.nas.child import TrainSettings

    checkpoint = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(checkpoint) and not args.resume:
        raise UsageError(f"{checkpoint} exists: pass --resume to continue that search, or choose another --out")
    bar = None
    if args.method.startswith("darts"):
        settings = darts.DartsSettings(order=int(args.method[-1]), arch_grad=args.arch_grad, batch=args.batch,
                                       w_lr=args.w_lr, alpha_lr=args.alpha_lr, iterations=1)
        plan = budget_plan(args.method, args.budget, args.child_steps, settings)
        if plan["iterations"] < 1:
            raise UsageError(f"--budget {args.budget} buys no DARTS iteration ({plan['per_unit']} model "
                             "evaluations each); raise --budget")
        settings = darts.DartsSettings(**{**settings.to_dict(), "iterations": plan["iterations"]})
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=settings.iterations, desc=args.method)
        update = None if bar is None else (
            lambda t, row: (bar.update(1), bar.set_postfix(val_acc=f"{row['val_acc']:.3f}")))
        out = darts.search(config, data, settings, args.seed, checkpoint=checkpoint, progress=update)
        out["plan"] = {**plan, "settings": settings.to_dict()}
    else:
        child = TrainSettings(steps=args.child_steps, batch=args.batch, lr=args.w_lr)
        plan = budget_plan(args.method, args.budget, args.child_steps, samples=args.samples)
        if plan["candidates"] < 1:
            raise UsageError(f"--budget {args.budget} buys no candidate ({plan['per_unit']} model evaluations "
                             "each with --child-steps); raise --budget or lower --child-steps")
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=plan["candidates"], desc=args.method)
        update = None if bar is None else (
            lambda n, row: (bar.update(n - bar.n), bar.set_postfix(val_acc=f"{row['val_acc']:.3f}")))
        out = blackbox.search(args.method, config, data, plan["candidates"], child, args.seed,
                              controller_lr=args.controller_lr, samples=args.samples, population=args.population,
                              tournament=args.tournament, checkpoint=checkpoint, progress=update)
        out["plan"] = {**plan, "child": child.to_dict()}
    if bar is not None:
        bar.close()
    return out


def cmd_search_arch(args) -> int:
    import dataclasses

    import torch

    from metaphi.config import UsageError, positive as _positive, writable_dir as _writable_dir

    from metaphi.experiments.report import machine, write_json
    from metaphi.nas.child import TrainSettings, retrain, split_data
    from metaphi.nas.space import OPS, NetworkConfig, export, load_exported

    for name in ("budget", "child_steps", "retrain_steps", "batch", "channels", "layers", "nodes", "samples",
                 "population", "tournament", "w_lr", "alpha_lr", "controller_lr"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _positive("retrain-channels", args.retrain_channels)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        fractions = tuple(float(v) for v in args.split.split(","))
    except ValueError:
        raise UsageError(f"--split takes three fractions train,val,test, got {args.split!r}") from None
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip()) if args.ops else OPS
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise UsageError(f"--ops: unknown {', '.join(bad)} (valid: {', '.join(OPS)})")
    if args.tournament > args.population:
        raise UsageError(f"--tournament ({args.tournament}) cannot exceed --population ({args.population})")
    if args.method == "retrain" and not args.genotype:
        raise UsageError("search-arch retrain needs --genotype FILE (a genotype.json written by a search)")
    out_dir = _writable_dir(args.out)
    progress = not args.quiet and (sys.stderr.isatty() or os.environ.get("METAPHI_PROGRESS") == "1")
    try:
        store = load_store(args.data, args.data_root, args.classes, args.split_seed)
        data = split_data(store, fractions, args.split_seed)
        config = NetworkConfig(store.image_shape[0], store.num_classes, args.channels, args.layers, args.nodes, ops)
    except ValueError as e:
        raise UsageError(str(e)) from e
    started = time.perf_counter()
    if args.method == "retrain":
        try:
            with open(args.genotype) as f:
                genotype, saved_config = load_exported(f.read())
        except OSError as e:
            raise UsageError(f"--genotype {args.genotype}: {e.strerror}") from e
        except ValueError as e:
            raise UsageError(f"--genotype {args.genotype}: {e}") from e
        if (saved_config.in_channels, saved_config.num_classes) != (config.in_channels, config.num_classes):
            raise UsageError(f"--genotype {args.genotype} was found for {saved_config.in_channels}-channel images "
                             f"and {saved_config.num_classes} classes; this data has {config.in_channels} and "
                             f"{config.num_classes}")
        config = saved_config
        found = {"genotype": genotype, "seconds": 0.0, "grad_evals": 0, "history": [], "plan": {}}
    else:
        found = run_search(args, data, config, progress)
    search_seconds = found["seconds"]
    genotype = found["genotype"]
    retrain_config = dataclasses.replace(config, channels=args.retrain_channels or config.channels)
    with open(os.path.join(out_dir, "genotype.json"), "w") as f:
        f.write(export(genotype, retrain_config) + "\n")
    settings = TrainSettings(steps=args.retrain_steps, batch=args.batch, lr=args.w_lr)
    t0 = time.perf_counter()
    final = retrain(genotype, retrain_config, data, settings, args.seed)
    result = {
        "method": args.method, "data": args.data, "classes": config.num_classes, "seed": args.seed,
        "split_seed": args.split_seed, "split": list(fractions),
        "sizes": {k: int(v[1].numel()) for k, v in data.items()},
        "genotype": genotype.to_dict(), "genotype_text": str(genotype), "network": retrain_config.to_dict(),
        "search_network": config.to_dict(), "budget": args.budget, "search_seconds": search_seconds,
        "grad_evals": found["grad_evals"], "architectures_evaluated": len(found["history"])
        if not args.method.startswith("darts") else 0,
        "search_val_acc": found.get("val_acc"), "plan": found.get("plan"),
        "retrain": settings.to_dict(), "retrain_seconds": time.perf_counter() - t0,
        "val_acc": final["val_acc"], "test_acc": final["test_acc"], "parameters": final["parameters"],
        "wall_seconds": time.perf_counter() - started, "machine": machine(),
        "history": [{k: v for k, v in h.items() if k != "choice"} for h in found["history"]],
    }
    if "alpha" in found:
        result["alpha"] = {k: v.tolist() for k, v in found["alpha"].items()}
    if "policy" in found:
        result["policy"] = found["policy"]
    write_json(result, os.path.join(out_dir, "result.json"))
    if not args.quiet:
        print(f"{args.method}: {genotype}")
        print(f"search {search_seconds:.1f} s, {found['grad_evals']} model evaluations; retrained "
              f"{args.retrain_steps} steps: val {100 * final['val_acc']:.2f}%, test {100 * final['test_acc']:.2f}% "
              f"({final['parameters']} parameters)")
        print(f"wrote {os.path.join(out_dir, 'result.json')} and {os.path.join(out_dir, 'genotype.json')}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("search-arch", help="architecture search (DARTS, REINFORCE, evolution, random) on one "
                              "data set, retrained from scratch", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=METHODS,
                   help="darts-1 / darts-2 (first / second order), reinforce, evolution, random; retrain: only "
                        "retrain --genotype")
    p.add_argument("--data", default="digits", choices=DATA,
                   help="digits (built in, 8x8), glyphs (built in, 28x28), omniglot (small1 under --data-root)")
    p.add_argument("--data-root", help="folder with the Omniglot archives (default: $METAPHI_DATA or "
                   "~/.cache/metaphi/data)")
    p.add_argument("--classes", type=int, help="use this many classes, drawn by --split-seed (default all)")
    p.add_argument("--split", default="0.5,0.25,0.25", help="fractions train,val,test of every class")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=600,
                   help="search budget in model evaluations (minibatch gradient evaluations; default 600)")
    p.add_argument("--child-steps", type=int, default=30,
                   help="black-box searchers: training steps of each candidate (default 30)")
    p.add_argument("--retrain-steps", type=int, default=300, help="training steps of the final network")
    p.add_argument("--retrain-channels", type=int, help="channels of the final network (default --channels)")
    p.add_argument("--channels", type=int, default=8, help="channels of the first cell (default 8)")
    p.add_argument("--layers", type=int, default=3, help="cells (default 3: normal, reduction, reduction)")
    p.add_argument("--nodes", type=int, default=3, help="intermediate nodes per cell (default 3)")
    p.add_argument("--ops", help="comma list of operations (default all: zero,skip,max_pool_3x3,avg_pool_3x3,"
                   "conv_3x3,conv_5x5,dil_conv_3x3)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--w-lr", type=float, default=0.05, help="weights: momentum SGD step size, cosine (default 0.05)")
    p.add_argument("--alpha-lr", type=float, default=3e-3, help="DARTS: Adam step size of α (default 3e-3)")
    p.add_argument("--arch-grad", default="finite-difference", choices=["finite-difference", "exact", "implicit"],
                   help="darts-2: DARTS's finite-difference Hessian-vector product, the exact one by autograd, or "
                        "the implicit-function gradient at the current weights (5 CG steps, damping 0.1)")
    p.add_argument("--controller-lr", type=float, default=0.1, help="REINFORCE: Adam step size of the logits")
    p.add_argument("--samples", type=int, default=1, help="REINFORCE: architectures per controller update")
    p.add_argument("--population", type=int, default=8, help="evolution: population size P (default 8)")
    p.add_argument("--tournament", type=int, default=3, help="evolution: sample size S (default 3)")
    p.add_argument("--genotype", help="retrain: the genotype.json to retrain")
    p.add_argument("--seed", type=int, default=0, help="seed of the search and of the final training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/search-arch", help="folder for genotype.json, result.json, checkpoint.pt")
    p.add_argument("--resume", action="store_true", help="continue the search saved in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_search_arch)
