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
(``--fresh`` starts over). ``--out`` gets ``results.json`` (every run and the summary) and
``results.md``: per held-out domain and on average, mean ± 95% CI over seeds (Student t), for
domain generalization and for each K of few-shot adaptation.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time

DATASETS = ("rotated-omniglot", "rotated-glyphs", "glyph-styles")


def _csv(text: str | None, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else []


def build_domains(data: str, options: dict):
    """The DomainSet called ``data`` (see the module's docstring) with ``options`` from the command line."""
    from metaphi.tasks import DataError
    from metaphi.tasks import domains as dm

    kw = dict(adapt=options.get("adapt_per_class", 5), test=options.get("test_per_class", 6),
              split_seed=options.get("split_seed", 0))
    chosen = options.get("domains")
    if data == "rotated-omniglot":
        from metaphi.tasks.registry import default_data_root

        classes = dm.omniglot_classes(options.get("data_root") or default_data_root(),
                                      options.get("alphabets") or ["Greek"], options.get("omniglot_set", "small1"),
                                      download=options.get("download", False))
        classes = dm.choose_classes(classes, options.get("classes"), kw["split_seed"])
        angles = [float(a) for a in chosen] if chosen else dm.ANGLES
        return dm.rotated_domains(classes, angles, name=data, **kw)
    if data in ("rotated-glyphs", "glyph-styles"):
        classes = dm.glyph_classes(options.get("classes") or 10, alphabets=2, seed=kw["split_seed"])
        if data == "rotated-glyphs":
            angles = [float(a) for a in chosen] if chosen else dm.ANGLES
            return dm.rotated_domains(classes, angles, name=data, **kw)
        return dm.style_domains(classes, chosen or dm.STYLES, name=data, **kw)
    if data.startswith("folder:"):
        found = dm.folder_domains(data[len("folder:"):], channels=options.get("channels") or 1,
                                  image_size=options.get("image_size") or 28, invert=options.get("invert", False),
                                  **kw)
        if chosen:
            unknown = [d for d in chosen if d not in found.domains]
            if unknown:
                raise DataError(f"{data}: no domain folder '{unknown[0]}' (domains: {', '.join(found.domains)})")
            keep = [found.domains.index(d) for d in chosen]
            found = dm.DomainSet(found.name, list(chosen), [found.parts[i] for i in keep], found.invert)
        return found
    raise DataError(f"unknown domain data '{data}' (valid: {', '.join(DATASETS)}, folder:PATH)")


def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]", "_", text.replace("°", "deg"))


def run_one(domains, method: str, held_out: str, seed: int, settings: dict, folder: str, fresh: bool = False,
            progress: bool = False) -> dict:
    """Train ``method`` on every domain but ``held_out`` and test it there; the run's result dict.

    A finished run in ``folder`` with the same settings is returned as it is; an unfinished one
    resumes from its checkpoint. A folder holding a run of other settings is an error unless ``fresh``.
    """
    import torch

    from metaphi.algorithms.mldg import ConvNet, create
    from metaphi.config import UsageError
    from metaphi.experiments.report import machine, write_json
    from metaphi.evaluate import evaluate
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
    estimator = build_estimator(algo.estimators[0], vectorize=False)
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
    table: dict = {}
    for method in methods:
        rows = [r for r in results if r["run"]["method"] == method]
        seeds = sorted({r["run"]["seed"] for r in rows})
        entry = {}
        for key in ["dg"] + [f"adapt{k}" for k in shots]:
            def value(r):
                return r["accuracy"] if key == "dg" else r["adapted"][key[len("adapt"):]]["mean"]
            per_domain = {}
            for d in held_outs:
                vals = [value(r) for r in rows if r["run"]["held_out"] == d]
                if vals:
                    m, ci = mean_ci95(vals)
                    per_domain[d] = {"mean": m, "ci95": ci, "seeds": len(vals)}
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
    if not x:
        return "–"
    ci = "" if math.isnan(x["ci95"]) else f" ± {100 * x['ci95']:.1f}"
    return f"{100 * x['mean']:.1f}{ci}"


def markdown(summary: dict) -> str:
    """The results as Markdown tables: one for domain generalization, one per K of adaptation."""
    held, methods, table = summary["held_out"], summary["methods"], summary["table"]
    s = summary["settings"]
    lines = []
    keys = [("dg", "Domain generalization: accuracy (%) on the held-out domain")] + [
        (f"adapt{k}", f"Few-shot adaptation: accuracy (%) on the held-out domain after fine-tuning "
                      f"{'the head' if s['adapt_params'] == 'head' else 'all parameters'} on {k} labelled "
                      f"example{'s' if k > 1 else ''} per class ({s['adapt_steps']} SGD steps, lr {s['adapt_lr']}, "
                      f"mean of {s['adapt_draws']} draws)") for k in s["adapt_shots"]]
    for key, title in keys:
        lines += [f"**{title}**, mean ± 95% CI over seeds {summary['seeds']}", "",
                  "| method | " + " | ".join(held) + " | average |", "|---" * (len(held) + 2) + "|"]
        for m in methods:
            e = table[m][key]
            cells = [_cell(e["domains"].get(d)) for d in held] + [_cell(e["average"])]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("| method | runs | train s | wall s |")
    lines.append("|---|---|---|---|")
    for m in methods:
        lines.append(f"| {m} | {table[m]['runs']} | {table[m]['train_seconds']:.0f} | {table[m]['wall_seconds']:.0f} |")
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


def register(subparsers) -> None:
    p = subparsers.add_parser("domaingen", help="leave-one-domain-out domain generalization (ERM, MLDG) and few-shot "
                              "adaptation", description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", default="rotated-glyphs",
                   help=f"{', '.join(DATASETS)} or folder:PATH (default: rotated-glyphs, built in)")
    p.add_argument("--methods", default="erm,mldg", help="comma list of erm, mldg, mldg-fo (default erm,mldg)")
    p.add_argument("--held-out", default="all",
                   help="comma list of domains to hold out, by name or position (default all)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list of seeds (default 0,1,2,3,4)")
    p.add_argument("--domains", help="angles (rotated-*), styles (glyph-styles) or domain folders to use")
    p.add_argument("--alphabets", default="Greek", help="rotated-omniglot: comma list of small1 alphabets")
    p.add_argument("--classes", type=int, help="use this many of the classes, drawn by --split-seed "
                   "(default: all for Omniglot and folders, 10 for glyphs)")
    p.add_argument("--data-root",
                   help="folder with the Omniglot archives (default: $METAPHI_DATA or ~/.cache/metaphi/data)")
    p.add_argument("--download", action="store_true",
                   help="rotated-omniglot: download the small1 archive if it is missing (checked by SHA-256)")
    p.add_argument("--image-size", type=int, help="folder:PATH only: resize images to this size (default 28)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="folder:PATH only: 1 (grey, default) or 3 (RGB)")
    p.add_argument("--invert", action="store_true", help="folder:PATH only: dark ink on light paper becomes high")
    p.add_argument("--test-per-class", type=int, default=6, help="test images per class of every domain (default 6)")
    p.add_argument("--adapt-per-class", type=int, default=5, help="adaptation pool per class (default 5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the instance split and the class choice")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="images per source domain per iteration (default 8)")
    p.add_argument("--meta-batch", type=int, default=1, help="meta-train/meta-test splits per update (default 1)")
    p.add_argument("--meta-test", type=int, default=1,
                   help="source domains held out as meta-test per split (default 1)")
    p.add_argument("--meta-lr", type=float, default=3e-3, help="Adam step size (default 3e-3)")
    p.add_argument("--inner-lr", type=float, default=0.1, help="MLDG: step size α of the virtual step (default 0.1)")
    p.add_argument("--beta", type=float, default=1.0, help="MLDG: weight β of the meta-test loss (default 1)")
    p.add_argument("--hidden", type=int, default=16, help="channels of the convnet (default 16)")
    p.add_argument("--blocks", type=int, default=4, help="conv blocks of the convnet (default 4)")
    p.add_argument("--adapt-shots", default="1,5", help="comma list of K for few-shot adaptation; 0 or '' for none")
    p.add_argument("--adapt-steps", type=int, default=30, help="fine-tuning steps (default 30)")
    p.add_argument("--adapt-lr", type=float, default=0.1, help="fine-tuning SGD step size (default 0.1)")
    p.add_argument("--adapt-params", choices=["head", "all"], default="head", help="what is fine-tuned (default head)")
    p.add_argument("--adapt-draws", type=int, default=5, help="draws of the K examples averaged (default 5)")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the adaptation draws")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--out", default="runs/domaingen")
    p.add_argument("--fresh", action="store_true",
                   help="retrain runs already in --out instead of reusing/resuming them")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 is fastest for these small "
                   "networks on a busy machine")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_domaingen)


def cmd_domaingen(args) -> int:
    from metaphi.algorithms.mldg import METHODS
    from metaphi.config import UsageError, writable_dir as _writable_dir

    try:
        seeds = _csv(args.seeds, int)
        shots = [k for k in _csv(args.adapt_shots, int) if k != 0]
    except ValueError as e:
        raise UsageError(f"--seeds and --adapt-shots are comma lists of integers ({e})") from None
    methods = _csv(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise UsageError(f"--methods: unknown method '{bad[0] if bad else ''}' (valid: {', '.join(METHODS)})")
    if not seeds:
        raise UsageError("--seeds: give at least one seed")
    for name in ("iterations", "batch", "meta_batch", "meta_test", "hidden", "blocks", "adapt_draws", "test_per_class",
                 "checkpoint_every"):
        if getattr(args, name) < (0 if name == "iterations" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    for name in ("adapt_steps", "adapt_per_class"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("meta_lr", "inner_lr", "adapt_lr"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.beta < 0:
        raise UsageError(f"--beta must be >= 0, got {args.beta}")
    if any(k < 0 for k in shots) or (shots and max(shots) > args.adapt_per_class):
        raise UsageError(f"--adapt-shots must lie in 1..--adapt-per-class ({args.adapt_per_class}), "
                         f"got {args.adapt_shots}")
    options = {"domains": _csv(args.domains), "alphabets": _csv(args.alphabets), "classes": args.classes,
               "data_root": args.data_root, "download": args.download, "image_size": args.image_size,
               "channels": args.channels, "invert": args.invert, "test_per_class": args.test_per_class,
               "adapt_per_class": args.adapt_per_class, "split_seed": args.split_seed}
    domains = build_domains(args.data, options)
    held = (domains.domains if args.held_out == "all"
            else [domains.domains[domains.index(d)] for d in _csv(args.held_out)])
    settings = {"iterations": args.iterations, "batch": args.batch, "meta_batch": args.meta_batch,
                "meta_test": args.meta_test, "meta_lr": args.meta_lr, "inner_lr": args.inner_lr, "beta": args.beta,
                "hidden": args.hidden, "blocks": args.blocks, "adapt_shots": shots, "adapt_steps": args.adapt_steps,
                "adapt_lr": args.adapt_lr, "adapt_params": args.adapt_params, "adapt_draws": args.adapt_draws,
                "eval_seed": args.eval_seed, "checkpoint_every": args.checkpoint_every,
                "data_options": {k: v for k, v in options.items() if k not in ("data_root", "download")}}
    if len(domains.domains) - 1 <= args.meta_test and any(m != "erm" for m in methods) and len(domains.domains) > 2:
        raise UsageError(f"--meta-test {args.meta_test} leaves no meta-train domain among "
                         f"{len(domains.domains) - 1} source domains")
    _writable_dir(args.out)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be a positive number, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    progress = not args.quiet and sys.stderr.isatty()
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    log(f"{domains.name}: {domains.num_classes} classes, domains {', '.join(domains.domains)}; "
        f"{len(methods) * len(held) * len(seeds)} runs")
    summary = sweep(domains, methods, held, seeds, settings, args.out, fresh=args.fresh, progress=progress, log=log)
    print(markdown(summary))
    print(f"wrote {os.path.join(args.out, 'results.md')} and results.json")
    return 0
