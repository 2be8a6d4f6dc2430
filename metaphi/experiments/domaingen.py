"""``metaphi domaingen``: leave-one-domain-out domain generalization, then few-shot adaptation.

    metaphi domaingen rotated-omniglot --methods erm,mldg --seeds 0,1,2,3,4 --out runs/domaingen

For every held-out domain (all of them by default), every method and every seed, a network is
trained on the other domains (``metaphi.algorithms.mldg``: ERM, MLDG, first-order MLDG) and scored
on the held-out domain's test images as it is (domain generalization), then after fine-tuning on K
labelled examples per class of that domain, for each K of ``--adapt-shots`` (few-shot adaptation,
averaged over ``--adapt-draws`` draws of the K examples).

Data (``DATA``):

* ``rotated-omniglot`` — characters of Omniglot minimal-split alphabets (``--alphabets``), domains
  are rotations by 0°, 15°, ..., 75° (the Rotated-MNIST protocol); needs the small1 archive
  (``--data-root``);
* ``rotated-glyphs`` — the same with the built-in glyphs;
* ``glyph-styles`` — glyphs drawn in six styles: plain, bold, slant, noise, inverted, texture;
* ``folder:PATH`` — your data, ``PATH/<domain>/<class>/<image>``.

``--domains`` picks the angles or styles. Each run trains with the core trainer (``meta_train``),
so it has a checkpoint in ``--out/<data>/<method>/held-<domain>/seed-<n>/``; a command run again
with the same settings reuses finished runs and resumes unfinished ones from their checkpoints
(``--fresh`` starts over). ``--out`` gets ``results.json`` (every run and the summary),
``results.md``: per held-out domain and on average, mean ± 95% CI over seeds (Student t), for
domain generalization and for each K of few-shot adaptation, and ``config.yaml``
(``metaphi domaingen --config OUT/config.yaml --out NEW`` runs the same study again).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

from metaphi.config import UsageError, option

DATASETS = ("rotated-omniglot", "rotated-glyphs", "glyph-styles")
METHODS = ("erm", "mldg", "mldg-fo")
#: options of MLDG's objective: they do not apply to ERM
MLDG_ONLY = ("inner_lr", "beta")


@dataclass
class DomainGenConfig:
    data: str = option("rotated-glyphs", f"{', '.join(DATASETS)} or folder:PATH (rotated-glyphs is built in)",
                       positional=True)
    methods: list[str] = option(default_factory=lambda: ["erm", "mldg"], help="comma list of erm, mldg, mldg-fo")
    held_out: list[str] = option(default_factory=lambda: ["all"],
                                 help="comma list of domains to hold out, by name or position, or all")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2, 3, 4], help="comma list of seeds")
    domains: list[str] = option(default_factory=list,
                                help="angles (rotated-*), styles (glyph-styles) or domain folders to use (none: all)")
    alphabets: list[str] = option(default_factory=lambda: ["Greek"], help="rotated-omniglot: comma list of small1 "
                                                                        "alphabets")
    classes: int | None = option(None, "use this many of the classes, drawn by --split-seed (none: all for "
                                       "Omniglot and folders, 10 for glyphs)", check="positive")
    data_root: str | None = option(None, "folder with the Omniglot archives (none: $METAPHI_DATA or "
                                         "~/.cache/metaphi/data)")
    download: bool = option(False, "rotated-omniglot: download the small1 archive if it is missing (checked by "
                                   "SHA-256)")
    image_size: int | None = option(None, "folder:PATH only: resize images to this size (none: 28)", check="positive")
    channels: int | None = option(None, "folder:PATH only: 1 (grey) or 3 (RGB) (none: 1)", choices=(1, 3))
    invert: bool = option(False, "folder:PATH only: dark ink on light paper becomes high")
    test_per_class: int = option(6, "test images per class of every domain", check="positive")
    adapt_per_class: int = option(5, "adaptation pool per class", check="nonneg")
    split_seed: int = option(0, "seed of the instance split and the class choice")
    iterations: int = option(300, "training iterations", check="nonneg")
    batch: int = option(8, "images per source domain per iteration", check="positive")
    meta_batch: int = option(1, "meta-train/meta-test splits per update", check="positive")
    meta_test: int = option(1, "source domains held out as meta-test per split", check="positive")
    meta_lr: float = option(3e-3, "Adam step size", check="rate")
    inner_lr: float = option(0.1, "mldg, mldg-fo: step size α of the virtual step", check="rate")
    beta: float = option(1.0, "mldg, mldg-fo: weight β of the meta-test loss", check="nonneg")
    hidden: int = option(16, "channels of the convnet", check="positive")
    blocks: int = option(4, "conv blocks of the convnet", check="positive")
    adapt_shots: list[int] = option(default_factory=lambda: [1, 5],
                                    help="comma list of K for few-shot adaptation; 0 or none for none")
    adapt_steps: int = option(30, "fine-tuning steps", check="nonneg")
    adapt_lr: float = option(0.1, "fine-tuning SGD step size", check="rate")
    adapt_params: str = option("head", "what is fine-tuned", choices=("head", "all"))
    adapt_draws: int = option(5, "draws of the K examples averaged", check="positive")
    eval_seed: int = option(1234, "seed of the adaptation draws")
    checkpoint_every: int = option(100, "iterations between checkpoints", check="positive")
    out: str = option("runs/domaingen", "folder for results.json, results.md, config.yaml and the runs")
    fresh: bool = option(False, "retrain runs already in --out instead of reusing/resuming them")
    threads: int | None = option(None, "torch CPU threads (none: torch's); 1 is fastest for these small networks "
                                       "on a busy machine", check="positive")
    quiet: bool = option(False, "no progress")


def build_domains(config: DomainGenConfig):
    """The DomainSet of ``config`` (``metaphi.tasks.registry.build_domains``)."""
    from metaphi.tasks.registry import build_domains as build

    return build(config.data, domains=config.domains, alphabets=config.alphabets, classes=config.classes,
                 data_root=config.data_root, download=config.download, image_size=config.image_size,
                 channels=config.channels, invert=config.invert, test_per_class=config.test_per_class,
                 adapt_per_class=config.adapt_per_class, split_seed=config.split_seed)


def validate(config: DomainGenConfig) -> DomainGenConfig:
    """What the field checks cannot see; ``config`` with ``adapt_shots`` without zeros."""
    bad = [m for m in config.methods if m not in METHODS]
    if not config.methods or bad:
        raise UsageError(f"--methods: unknown method '{bad[0] if bad else ''}' (valid: {', '.join(METHODS)})")
    if not config.seeds:
        raise UsageError("--seeds: give at least one seed")
    if not any(m != "erm" for m in config.methods):
        defaults = DomainGenConfig()
        for name in MLDG_ONLY:
            if getattr(config, name) != getattr(defaults, name):
                raise UsageError(f"--{name.replace('_', '-')} applies to mldg and mldg-fo, and --methods is "
                                 f"{','.join(config.methods)}")
    shots = [k for k in config.adapt_shots if k != 0]
    if any(k < 0 for k in shots) or (shots and max(shots) > config.adapt_per_class):
        raise UsageError(f"--adapt-shots must lie in 1..--adapt-per-class ({config.adapt_per_class}), "
                         f"got {','.join(map(str, config.adapt_shots))}")
    return dataclasses.replace(config, adapt_shots=shots)


def main(config: DomainGenConfig) -> int:
    run(config)
    return 0


def run(config: DomainGenConfig) -> dict:
    """Every (method, held-out domain, seed) of ``config``; writes config.yaml, results.json and
    results.md into ``config.out`` and returns the summary."""
    from metaphi.config import writable_dir
    from metaphi.experiments.report import save_config

    config = validate(config)
    domains = build_domains(config)
    held = (domains.domains if config.held_out == ["all"]
            else [domains.domains[domains.index(d)] for d in config.held_out])
    options = {"domains": config.domains, "alphabets": config.alphabets, "classes": config.classes,
               "image_size": config.image_size, "channels": config.channels, "invert": config.invert,
               "test_per_class": config.test_per_class, "adapt_per_class": config.adapt_per_class,
               "split_seed": config.split_seed}
    settings = {"iterations": config.iterations, "batch": config.batch, "meta_batch": config.meta_batch,
                "meta_test": config.meta_test, "meta_lr": config.meta_lr, "inner_lr": config.inner_lr,
                "beta": config.beta, "hidden": config.hidden, "blocks": config.blocks,
                "adapt_shots": config.adapt_shots, "adapt_steps": config.adapt_steps, "adapt_lr": config.adapt_lr,
                "adapt_params": config.adapt_params, "adapt_draws": config.adapt_draws,
                "eval_seed": config.eval_seed, "checkpoint_every": config.checkpoint_every,
                "data_options": options}
    if (len(domains.domains) - 1 <= config.meta_test and any(m != "erm" for m in config.methods)
            and len(domains.domains) > 2):
        raise UsageError(f"--meta-test {config.meta_test} leaves no meta-train domain among "
                         f"{len(domains.domains) - 1} source domains")
    writable_dir(config.out)
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    save_config(config, config.out, "domaingen")
    progress = not config.quiet and sys.stderr.isatty()
    log = (lambda *a: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"{domains.name}: {domains.num_classes} classes, domains {', '.join(domains.domains)}; "
        f"{len(config.methods) * len(held) * len(config.seeds)} runs")
    summary = sweep(domains, config.methods, held, config.seeds, settings, config.out, fresh=config.fresh,
                    progress=progress, log=log)
    print(markdown(summary))
    print(f"wrote {os.path.join(config.out, 'results.md')}, results.json and config.yaml")
    return summary


def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]", "_", text.replace("°", "deg"))


def run_one(domains, method: str, held_out: str, seed: int, settings: dict, folder: str, fresh: bool = False,
            progress: bool = False) -> dict:
    """Train ``method`` on every domain but ``held_out`` and test it there; the run's result dict.

    A finished run in ``folder`` with the same settings is returned as it is; an unfinished one
    resumes from its checkpoint. A folder holding a run of other settings is an error unless ``fresh``.
    """
    import torch

    from metaphi.algorithms.mldg import create
    from metaphi.models import GroupNormConvNet as ConvNet
    from metaphi.evaluate import evaluate
    from metaphi.experiments.report import machine, write_json
    from metaphi.outer import build_estimator
    from metaphi.train import TrainConfig, load_checkpoint, meta_train

    s = settings
    run = {"data": domains.name, "domains": domains.domains, "method": method, "held_out": held_out, "seed": seed,
           **{k: v for k, v in s.items() if k not in ("adapt_shots", "adapt_draws", "eval_seed")}}
    evaluation = {k: s[k] for k in ("adapt_shots", "adapt_draws", "eval_seed", "adapt_steps", "adapt_lr",
                                    "adapt_params")}
    done, ck_path = os.path.join(folder, "result.json"), os.path.join(folder, "checkpoint.pt")
    if not fresh and os.path.exists(done):
        with open(done) as f:
            previous = json.load(f)
        if previous.get("run") == run and previous.get("evaluation") == evaluation:
            previous["reused"] = True
            return previous
    resume = False
    if not fresh and os.path.exists(ck_path):
        stored = load_checkpoint(ck_path).get("run")
        if stored != run:
            raise UsageError(f"{folder} holds a run with other settings; use another --out, or --fresh to replace it")
        resume = True
    os.makedirs(folder, exist_ok=True)
    split = domains.leave_one_out(held_out)
    c, _, _ = domains.image_shape
    with torch.random.fork_rng():  # the initial weights come from the seed alone
        torch.manual_seed(seed)
        model = ConvNet(c, domains.num_classes, hidden=s["hidden"], blocks=s["blocks"])
    algo = create(method, model, inner_lr=s["inner_lr"], beta=s["beta"], meta_test=s["meta_test"],
                  adapt_lr=s["adapt_lr"], eval_steps=s["adapt_steps"], adapt_params=s["adapt_params"])
    estimator = build_estimator(algo.estimators[0], {"loop": True})
    config = TrainConfig(iterations=s["iterations"], meta_batch=s["meta_batch"], meta_lr=s["meta_lr"], seed=seed,
                         checkpoint_every=s["checkpoint_every"], val_every=10**9)
    started = time.perf_counter()
    state = meta_train(algo, estimator, split.source_batches(s["batch"], s["meta_test"]).sample_batch, config,
                       out_dir=folder, resume=resume, run=run, progress=progress)
    tested = time.perf_counter()
    zero = evaluate(algo, state.phi, split.target_tasks(0), 1, s["eval_seed"], steps=0)
    adapted = {}
    for k in s["adapt_shots"]:
        r = evaluate(algo, state.phi, split.target_tasks(k), s["adapt_draws"], s["eval_seed"], steps=s["adapt_steps"])
        adapted[str(k)] = {"mean": r["mean"], "ci95": r["ci95"], "before": r["per_step"][0]["mean"]}
    result = {"run": run, "evaluation": evaluation, "accuracy": zero["mean"], "adapted": adapted,
              "test_images": len(split.target_test.targets), "iterations": state.iteration,
              "train_seconds": state.train_seconds, "test_seconds": time.perf_counter() - tested,
              "wall_seconds": time.perf_counter() - started,
              "final_loss": state.history[-1]["loss"] if state.history else None,
              "parameters": sum(v.numel() for v in state.phi.values()), "machine": machine(), "checkpoint": ck_path}
    write_json(result, done)
    return result


def summarize(results: list[dict], methods: list[str], held_outs: list[str], shots: list[int]) -> dict:
    """Per method: mean ± 95% CI over seeds on each held-out domain and on the average over them
    (each seed's average over held-out domains, then over seeds), for DG and each K of adaptation."""
    from metaphi.evaluate import mean_ci95
    from metaphi.experiments.report import over_seeds

    table: dict = {}
    for method in methods:
        rows = [r for r in results if r["run"]["method"] == method]
        seeds = sorted({r["run"]["seed"] for r in rows})
        entry = {}
        for key in ["dg"] + [f"adapt{k}" for k in shots]:
            def value(r):
                return r["accuracy"] if key == "dg" else r["adapted"][key[len("adapt"):]]["mean"]
            flat = [{"held_out": r["run"]["held_out"], "value": value(r)} for r in rows
                    if r["run"]["held_out"] in held_outs]
            per_domain = {e["held_out"]: {"mean": e["value"], "ci95": e["value_ci"], "seeds": e["seeds"]}
                          for e in over_seeds(flat, ["held_out"], ["value"], order=held_outs)}
            averages = []
            for seed in seeds:
                vals = [value(r) for r in rows if r["run"]["seed"] == seed]
                if len(vals) == len(held_outs):
                    averages.append(sum(vals) / len(vals))
            avg = dict(zip(("mean", "ci95"), mean_ci95(averages))) if averages else None
            entry[key] = {"domains": per_domain, "average": avg and {**avg, "seeds": len(averages)}}
        entry["train_seconds"] = sum(r["train_seconds"] for r in rows)
        entry["wall_seconds"] = sum(r["wall_seconds"] for r in rows)
        entry["runs"] = len(rows)
        table[method] = entry
    return table


def _cell(x: dict | None) -> str:
    from metaphi.experiments.report import pm

    if not x:
        return "–"
    return pm(x["mean"], None if math.isnan(x["ci95"]) else x["ci95"], digits=1)


def markdown(summary: dict) -> str:
    """The results as Markdown tables: one for domain generalization, one per K of adaptation."""
    from metaphi.experiments.report import markdown_table

    held, methods, table = summary["held_out"], summary["methods"], summary["table"]
    s = summary["settings"]
    lines = []
    keys = [("dg", "Domain generalization: accuracy (%) on the held-out domain")] + [
        (f"adapt{k}", f"Few-shot adaptation: accuracy (%) on the held-out domain after fine-tuning "
                      f"{'the head' if s['adapt_params'] == 'head' else 'all parameters'} on {k} labelled "
                      f"example{'s' if k > 1 else ''} per class ({s['adapt_steps']} SGD steps, lr {s['adapt_lr']}, "
                      f"mean of {s['adapt_draws']} draws)") for k in s["adapt_shots"]]
    for key, title in keys:
        rows = [[m] + [_cell(table[m][key]["domains"].get(d)) for d in held] + [_cell(table[m][key]["average"])]
                for m in methods]
        lines += [f"**{title}**, mean ± 95% CI over seeds {summary['seeds']}", "",
                  markdown_table(["method", *held, "average"], rows), ""]
    lines.append(markdown_table(["method", "runs", "train s", "wall s"],
                                [[m, table[m]["runs"], f"{table[m]['train_seconds']:.0f}",
                                  f"{table[m]['wall_seconds']:.0f}"] for m in methods]))
    return "\n".join(lines)


def sweep(domains, methods: list[str], held_outs: list[str], seeds: list[int], settings: dict, out_dir: str,
          fresh: bool = False, progress: bool = False, log=print) -> dict:
    """Every (method, held-out domain, seed) run; writes and returns the summary."""
    from metaphi.experiments.report import machine, write_json

    total = len(methods) * len(held_outs) * len(seeds)
    results, n, started = [], 0, time.perf_counter()
    for held in held_outs:
        for seed in seeds:
            for method in methods:
                n += 1
                folder = os.path.join(out_dir, _slug(domains.name), method, f"held-{_slug(held)}", f"seed-{seed}")
                r = run_one(domains, method, held, seed, settings, folder, fresh=fresh, progress=progress)
                results.append(r)
                adapted = ", ".join(f"{k}-shot {100 * v['mean']:.1f}%" for k, v in r["adapted"].items())
                elapsed = time.perf_counter() - started
                took = "reused" if r.get("reused") else f"{r['wall_seconds']:.0f} s"
                log(f"[{n}/{total}] {method:<8} held out {held:<8} seed {seed}: {100 * r['accuracy']:.1f}%"
                    f"{'; ' + adapted if adapted else ''} ({took}, {elapsed:.0f} s in all)")
    summary = {"data": domains.name, "domains": domains.domains, "classes": domains.num_classes,
               "held_out": held_outs, "methods": methods, "seeds": seeds, "settings": settings,
               "table": summarize(results, methods, held_outs, settings["adapt_shots"]),
               "wall_seconds": time.perf_counter() - started, "machine": machine(),
               "runs": [{k: v for k, v in r.items() if k != "machine"} for r in results]}
    write_json(summary, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(summary) + "\n")
    return summary
