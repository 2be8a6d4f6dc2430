"""metaphi search-arch: architecture search on one data set, then the result retrained from scratch.

The data set is split (stratified, seeded) into train / val / test. A searcher looks for a cell
genotype (metaphi/nas/space.py) using train for weights and val for judging architectures:
DARTS first or second order (metaphi/nas/darts.py), or REINFORCE, regularized evolution or random
search (metaphi/nas/blackbox.py). All get the same budget in model evaluations (minibatch gradient
evaluations of a network, search network or child). The genotype found is exported as JSON,
retrained from scratch on train and tested on test.

Writes to --out: ``config.yaml`` (the resolved config: ``--config`` it with another ``--out`` to run
again), ``genotype.json`` (the exported architecture), ``result.json`` (method, genotype, search
cost in seconds and model evaluations, validation and test accuracy, settings, machine) and
``checkpoint.pt`` (the search state; ``--resume`` continues a killed search to the same result).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

from metaphi.config import MISSING, UsageError, option
from metaphi.nas.space import OPS
from metaphi.tasks.registry import NAMED

METHODS = ("darts-1", "darts-2", "reinforce", "evolution", "random", "retrain")


@dataclass
class ArchSearchConfig:
    """``metaphi search-arch``: the searcher, its data and budget, the search space and the final training."""

    method: str = option(MISSING, "darts-1 / darts-2 (first / second order), reinforce, evolution, random; retrain: "
                                  "only retrain --genotype", choices=METHODS, positional=True)
    data: str = option("digits", "digits (built in, 8x8), glyphs (built in, 28x28), omniglot (small1 under "
                                 "--data-root)", choices=NAMED)
    data_root: str | None = option(None, "folder with the Omniglot archives (none: $METAPHI_DATA or "
                                         "~/.cache/metaphi/data)")
    classes: int | None = option(None, "use this many classes, drawn by --split-seed (none: all)", check="positive")
    split: list[float] = option(default_factory=lambda: [0.5, 0.25, 0.25], help="fractions train,val,test of every "
                                "class", check="positive")
    split_seed: int = option(0, "seed of the class draw and of the split")
    budget: int = option(600, "search budget in model evaluations (minibatch gradient evaluations)", check="positive")
    child_steps: int = option(30, "black-box searchers: training steps of each candidate", check="positive")
    retrain_steps: int = option(300, "training steps of the final network", check="positive")
    retrain_channels: int | None = option(None, "channels of the final network (none: --channels)", check="positive")
    channels: int = option(8, "channels of the first cell", check="positive")
    layers: int = option(3, "cells (3: normal, reduction, reduction)", check="positive")
    nodes: int = option(3, "intermediate nodes per cell", check="positive")
    ops: list[str] | None = option(None, f"comma list of operations (none: all, {','.join(OPS)})", choices=OPS)
    batch: int = option(64, "minibatch of every training step", check="positive")
    w_lr: float = option(0.05, "weights: momentum SGD step size, cosine", check="positive")
    alpha_lr: float = option(3e-3, "DARTS: Adam step size of α", check="positive")
    arch_grad: str = option("finite-difference", "darts-2: DARTS's finite-difference Hessian-vector product, the exact "
                            "one by autograd, or the implicit-function gradient at the current weights (5 CG steps, "
                            "damping 0.1)", choices=("finite-difference", "exact", "implicit"))
    controller_lr: float = option(0.1, "REINFORCE: Adam step size of the logits", check="positive")
    samples: int = option(1, "REINFORCE: architectures per controller update", check="positive")
    population: int = option(8, "evolution: population size P", check="positive")
    tournament: int = option(3, "evolution: sample size S", check="positive")
    genotype: str | None = option(None, "retrain: the genotype.json to retrain")
    seed: int = option(0, "seed of the search and of the final training")
    threads: int = option(0, "torch threads (0: torch's choice)", check="nonneg")
    out: str = option("runs/search-arch", "folder for config.yaml, genotype.json, result.json, checkpoint.pt")
    resume: bool = option(False, "continue the search saved in --out")
    quiet: bool = option(False, "no progress output")


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


def check_resume(config: ArchSearchConfig) -> None:
    """A UsageError when --resume and the checkpoint in --out disagree (one without the other)."""
    checkpoint = os.path.join(config.out, "checkpoint.pt")
    if os.path.exists(checkpoint) and not config.resume:
        raise UsageError(f"{checkpoint} exists: pass --resume to continue that search, or choose another --out")
    if config.resume and not os.path.exists(checkpoint):
        raise UsageError(f"--resume: no checkpoint in {config.out}; leave out --resume to start a new search")


def run_search(config: ArchSearchConfig, data: dict, network, progress: bool) -> dict:
    """The search part of ``search-arch``: returns the searcher's output dict."""
    from metaphi.nas import blackbox, darts
    from metaphi.nas.child import TrainSettings

    checkpoint = os.path.join(config.out, "checkpoint.pt")
    check_resume(config)
    bar = None
    if config.method.startswith("darts"):
        settings = darts.DartsSettings(order=int(config.method[-1]), arch_grad=config.arch_grad, batch=config.batch,
                                       w_lr=config.w_lr, alpha_lr=config.alpha_lr, iterations=1)
        plan = budget_plan(config.method, config.budget, config.child_steps, settings)
        if plan["iterations"] < 1:
            raise UsageError(f"--budget {config.budget} buys no DARTS iteration ({plan['per_unit']} model "
                             "evaluations each); raise --budget")
        settings = darts.DartsSettings(**{**settings.to_dict(), "iterations": plan["iterations"]})
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=settings.iterations, desc=config.method)
        update = None if bar is None else (
            lambda t, row: (bar.update(1), bar.set_postfix(val_acc=f"{row['val_acc']:.3f}")))
        out = darts.search(network, data, settings, config.seed, checkpoint=checkpoint, progress=update)
        out["plan"] = {**plan, "settings": settings.to_dict()}
    else:
        child = TrainSettings(steps=config.child_steps, batch=config.batch, lr=config.w_lr)
        plan = budget_plan(config.method, config.budget, config.child_steps, samples=config.samples)
        if plan["candidates"] < 1:
            raise UsageError(f"--budget {config.budget} buys no candidate ({plan['per_unit']} model evaluations "
                             "each with --child-steps); raise --budget or lower --child-steps")
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=plan["candidates"], desc=config.method)
        update = None if bar is None else (
            lambda n, row: (bar.update(n - bar.n), bar.set_postfix(val_acc=f"{row['val_acc']:.3f}")))
        out = blackbox.search(config.method, network, data, plan["candidates"], child, config.seed,
                              controller_lr=config.controller_lr, samples=config.samples,
                              population=config.population, tournament=config.tournament, checkpoint=checkpoint,
                              progress=update)
        out["plan"] = {**plan, "child": child.to_dict()}
    if bar is not None:
        bar.close()
    return out


def main(config: ArchSearchConfig) -> int:
    run(config)
    return 0


def run(config: ArchSearchConfig) -> dict:
    """Search (or load ``config.genotype``), export the genotype, retrain it from scratch and test it;
    writes config.yaml, genotype.json, result.json (and the search's checkpoint.pt) into ``config.out``."""
    import torch

    from metaphi.config import writable_dir
    from metaphi.experiments.report import machine, save_config, write_json
    from metaphi.nas.child import TrainSettings, retrain, split_data
    from metaphi.nas.space import NetworkConfig, export, load_exported
    from metaphi.tasks.registry import load_named

    if config.threads:
        torch.set_num_threads(config.threads)
    if len(config.split) != 3:
        raise UsageError(f"--split takes three fractions train,val,test, got {','.join(map(str, config.split))}")
    if config.ops is not None and not config.ops:
        raise UsageError("--ops: give at least one operation")
    ops = tuple(config.ops) if config.ops else OPS
    if config.tournament > config.population:
        raise UsageError(f"--tournament ({config.tournament}) cannot exceed --population ({config.population})")
    if config.method == "retrain" and not config.genotype:
        raise UsageError("search-arch retrain needs --genotype FILE (a genotype.json written by a search)")
    if config.method != "retrain":
        check_resume(config)
    out_dir = writable_dir(config.out)
    progress = not config.quiet and (sys.stderr.isatty() or os.environ.get("METAPHI_PROGRESS") == "1")
    try:
        store = load_named(config.data, config.data_root, config.classes, config.split_seed)
        data = split_data(store, tuple(config.split), config.split_seed)
        network = NetworkConfig(store.image_shape[0], store.num_classes, config.channels, config.layers, config.nodes,
                                ops)
    except ValueError as e:
        raise UsageError(str(e)) from e
    save_config(config, out_dir, "search-arch")
    started = time.perf_counter()
    if config.method == "retrain":
        try:
            with open(config.genotype) as f:
                genotype, saved_network = load_exported(f.read())
        except OSError as e:
            raise UsageError(f"--genotype {config.genotype}: {e.strerror}") from e
        except ValueError as e:
            raise UsageError(f"--genotype {config.genotype}: {e}") from e
        if (saved_network.in_channels, saved_network.num_classes) != (network.in_channels, network.num_classes):
            raise UsageError(f"--genotype {config.genotype} was found for {saved_network.in_channels}-channel images "
                             f"and {saved_network.num_classes} classes; this data has {network.in_channels} and "
                             f"{network.num_classes}")
        network = saved_network
        found = {"genotype": genotype, "seconds": 0.0, "grad_evals": 0, "history": [], "plan": {}}
    else:
        try:
            found = run_search(config, data, network, progress)
        except ValueError as e:  # a checkpoint of another search in --out
            raise UsageError(str(e)) from e
    genotype = found["genotype"]
    retrain_network = dataclasses.replace(network, channels=config.retrain_channels or network.channels)
    with open(os.path.join(out_dir, "genotype.json"), "w") as f:
        f.write(export(genotype, retrain_network) + "\n")
    settings = TrainSettings(steps=config.retrain_steps, batch=config.batch, lr=config.w_lr)
    t0 = time.perf_counter()
    final = retrain(genotype, retrain_network, data, settings, config.seed)
    result = {
        "method": config.method, "data": config.data, "classes": network.num_classes, "seed": config.seed,
        "split_seed": config.split_seed, "split": list(config.split),
        "sizes": {k: int(v[1].numel()) for k, v in data.items()},
        "genotype": genotype.to_dict(), "genotype_text": str(genotype), "network": retrain_network.to_dict(),
        "search_network": network.to_dict(), "budget": config.budget, "search_seconds": found["seconds"],
        "grad_evals": found["grad_evals"], "architectures_evaluated": len(found["history"])
        if not config.method.startswith("darts") else 0,
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
    if not config.quiet:
        print(f"{config.method}: {genotype}")
        print(f"search {found['seconds']:.1f} s, {found['grad_evals']} model evaluations; retrained "
              f"{config.retrain_steps} steps: val {100 * final['val_acc']:.2f}%, test {100 * final['test_acc']:.2f}% "
              f"({final['parameters']} parameters)")
        print(f"wrote {os.path.join(out_dir, 'result.json')}, genotype.json and config.yaml")
    return result
