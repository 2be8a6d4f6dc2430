"""metaphi augment: learned data augmentation against no augmentation and a random policy, over seeds.

One data set is split, for every seed, into a few training and validation images per class and a
test part (the rest). Each method yields a policy (metaphi/augment/policy.py): ``none`` (no
augmentation), ``random`` (probabilities and magnitudes drawn uniformly), ``start`` (the policy every
search starts from, unsearched: the control that shows what a search adds), ``gradient`` (searched
through the relaxed augmentation and the lookahead step with the second-order estimator),
``reinforce`` (searched with REINFORCE over discrete choices) and ``es`` (evolution strategies on the
relaxed policy); see metaphi/augment/search.py. A searched policy is learned with the training part
and the validation part; then a fresh model, the same for every method of a seed, trains on the
training part alone with the policy, and its accuracy on the test part is reported.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from metaphi.config import int_list as _ints
from metaphi.tasks.registry import NAMED as DATASETS
from metaphi.tasks.registry import load_named as load_data

METHODS = ("none", "random", "start", "gradient", "reinforce", "es")


def split(data, train: int, val: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``train`` and ``val`` images per class by a seeded stratified split; the test part is the rest."""
    from metaphi.tasks.corrupt import stratified_split
    tr, va = stratified_split(data.targets, [train, val], torch.Generator().manual_seed(seed))
    rest = torch.ones(len(data.targets), dtype=torch.bool)
    rest[tr] = False
    rest[va] = False
    if not bool(rest.any()):
        raise ValueError(f"no images left for the test part after {train} training and {val} validation images "
                         "per class; use fewer")
    x = data.images.float() / 255.0
    return {name: (x[idx], data.targets[idx]) for name, idx in
            (("train", tr), ("val", va), ("test", rest.nonzero().squeeze(1)))}


def build_model(hidden: int, num_classes: int, image_shape, seed: int):
    """Conv4 (stride 2, task batch norm) whose initial weights come from ``seed`` and no global state."""
    from metaphi.models import Conv4
    c, h, _ = image_shape
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Conv4(c, num_classes, hidden=hidden, image_size=h)


def run_experiment(data: str = "digits", methods=("none", "random", "start", "gradient", "reinforce"),
                   seeds=(0, 1, 2, 3, 4),
                   train_per_class: int = 10, val_per_class: int = 10, classes: int | None = None,
                   search=None, train_steps: int = 300, hidden: int = 32, data_root: str | None = None,
                   out: str | None = None, progress: bool = False, log=print) -> dict:
    """Every (seed, method) run; with ``out`` the finished runs (``out/checkpoint.pt``) and the
    searches in progress (``out/search-SEED-METHOD.pt``) are saved, and a rerun with the same settings
    resumes (and reuses the finished runs when it asks for more seeds or methods). ``search``: a ``SearchConfig`` whose method and seed are set per run. Returns
    {"config", "rows", "summary"}."""
    from dataclasses import replace

    from metaphi.augment import policy as P
    from metaphi.augment.search import SearchConfig, accuracy, search as run_search, train_model
    from metaphi.functional import params_of
    from metaphi.tasks import atomic_save

    search = search or SearchConfig()
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method {', '.join(bad)} (valid: {', '.join(METHODS)})")
    settings = {"data": data, "train_per_class": train_per_class, "val_per_class": val_per_class,
                "classes": classes, "train_steps": train_steps, "hidden": hidden,
                "search": {k: v for k, v in search.to_dict().items() if k not in ("method", "seed")}}
    config = {**settings, "methods": list(methods), "seeds": list(seeds)}
    rows: list[dict] = []
    ck = os.path.join(out, "checkpoint.pt") if out else None
    if ck and os.path.exists(ck):
        saved = torch.load(ck, weights_only=False)
        if saved.get("settings") != settings:
            raise ValueError(f"{ck} holds runs with other settings; use another --out or delete it")
        rows = saved["rows"]
        log(f"resuming: {len(rows)} runs done")
    done = {(r["seed"], r["method"]) for r in rows}
    store = load_data(data, data_root, classes, seed=0)
    plan = [(s, m) for s in seeds for m in methods]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), initial=sum(1 for p in plan if p in done), desc=f"augment {data}")
    for seed, method in plan:
        if (seed, method) in done:
            continue
        parts = split(store, train_per_class, val_per_class, seed)
        shape = tuple(parts["train"][0].shape[1:])
        t0 = time.perf_counter()
        history = None
        if method == "none":
            policy = P.no_policy()
        elif method == "start":
            policy = P.policy_of(P.init_relaxed(search.init_prob, search.init_magnitude))
        elif method == "random":
            policy = P.random_policy(torch.Generator().manual_seed(20_000 + seed))
        else:
            cfg = replace(search, method=method, seed=seed)
            model = build_model(hidden, store.num_classes, shape, seed)
            inner = None
            if progress:
                from tqdm import tqdm
                inner = tqdm(total=cfg.steps, desc=f"  search {method} seed {seed}", leave=False)
            found = run_search(model, params_of(model, False), parts["train"], parts["val"], cfg,
                               checkpoint=os.path.join(out, f"search-{seed}-{method}.pt") if out else None,
                               on_step=(lambda step, rec: (inner.update(step - inner.n),
                                                           inner.set_postfix(val_loss=f"{rec['val_loss']:.3f}")))
                               if inner is not None else None)
            if inner is not None:
                inner.close()
            policy, history = found["policy"], found["history"]
        search_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        model = build_model(hidden, store.num_classes, shape, 10_000 + seed)
        params = train_model(model, params_of(model, False), parts["train"], policy, train_steps, search.batch,
                             search.lr, torch.Generator().manual_seed(30_000 + seed), search.momentum,
                             search.weight_decay, P.Space(**search.space))
        row = {"seed": seed, "method": method, "test_acc": accuracy(model, params, *parts["test"]),
               "policy": policy.to_dict(), "search_s": search_s, "train_s": time.perf_counter() - t1,
               "test_images": len(parts["test"][1])}
        if history:
            tail = history[-max(1, len(history) // 10):]
            row["search_val_loss_end"] = sum(h["val_loss"] for h in tail) / len(tail)
            row["search_val_loss_start"] = history[0]["val_loss"]
        rows.append(row)
        if ck:
            atomic_save({"settings": settings, "rows": rows}, ck)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(seed=seed, method=method, acc=f"{row['test_acc']:.3f}")
    if bar is not None:
        bar.close()
    rows = [r for r in rows if r["seed"] in set(seeds) and r["method"] in set(methods)]
    return {"config": config, "rows": rows, "summary": summarize(rows, list(methods))}


def summarize(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: test accuracy mean ± 95% t-interval over seeds, the paired differences to ``none``
    and to ``start`` (same split, initialization and batches), mean search and training time, the
    mean policy."""
    from metaphi.augment.policy import OPS
    from metaphi.evaluate import mean_ci95 as mean_ci
    by = {m: {r["seed"]: r for r in rows if r["method"] == m} for m in methods}
    out = []
    for m in methods:
        rs = by[m]
        if not rs:
            continue
        acc, ci = mean_ci([r["test_acc"] for r in rs.values()])
        entry = {"method": m, "seeds": len(rs), "test_acc": acc, "test_ci": ci,
                 "search_s": sum(r["search_s"] for r in rs.values()) / len(rs),
                 "train_s": sum(r["train_s"] for r in rs.values()) / len(rs),
                 "policy": {op: {k: sum(r["policy"][op][k] for r in rs.values()) / len(rs)
                                 for k in ("prob", "magnitude")} for op in OPS}}
        for ref in ("none", "start"):
            common = [s for s in rs if s in by.get(ref, {})]
            if m != ref and common:
                entry[f"diff_vs_{ref}"], entry[f"diff_{ref}_ci"] = mean_ci(
                    [rs[s]["test_acc"] - by[ref][s]["test_acc"] for s in common])
        out.append(entry)
    return out


def _pm(mean: float, ci: float, signed: bool = False) -> str:
    """Percent, ± the CI's half-width (omitted with one seed, where it is undefined)."""
    text = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    return text if ci != ci else f"{text} ± {100 * ci:.2f}"


def markdown(result: dict) -> str:
    from metaphi.augment.policy import OPS
    c = result["config"]
    lines = [f"**{c['data']}** ({c['classes'] or 'all'} classes; {c['train_per_class']} training and "
             f"{c['val_per_class']} validation images per class, the rest for test; search "
             f"{c['search']['steps']} steps; final training {c['train_steps']} steps; {len(c['seeds'])} seeds; "
             "test accuracy mean ± 95% CI, t-interval)", "",
             "| policy | test accuracy % | paired Δ vs none | paired Δ vs start | search s | train s |",
             "|---|---|---|---|---|---|"]
    for e in result["summary"]:
        diffs = [_pm(e[f"diff_vs_{ref}"], e[f"diff_{ref}_ci"], signed=True) if f"diff_vs_{ref}" in e else "—"
                 for ref in ("none", "start")]
        lines.append(f"| {e['method']} | {_pm(e['test_acc'], e['test_ci'])} | {diffs[0]} | {diffs[1]} | "
                     f"{e['search_s']:.1f} | {e['train_s']:.1f} |")
    lines += ["", "Mean policy over seeds (probability / magnitude):", "",
              "| policy | " + " | ".join(OPS) + " |", "|---|" + "---|" * len(OPS)]
    for e in result["summary"]:
        lines.append(f"| {e['method']} | " + " | ".join(f"{e['policy'][op]['prob']:.2f} / "
                                                       f"{e['policy'][op]['magnitude']:.2f}" for op in OPS) + " |")
    return "\n".join(lines)


def cmd_augment(args) -> int:
    from metaphi.augment.policy import LEVELS
    from metaphi.augment.search import SearchConfig
    from metaphi.config import UsageError, positive as _positive, writable_dir as _writable_dir, name_list
    from metaphi.experiments.report import write_result
    methods = name_list(args.methods, METHODS)
    for name in ("train_per_class", "val_per_class", "search_steps", "batch", "val_batch", "hidden", "samples",
                 "population", "classes"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _positive("train-steps", args.train_steps, allow_zero=True)
    for name in ("lr", "policy_lr", "temperature", "sigma"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    for name in ("init_prob", "init_magnitude"):
        if not 0 < getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be strictly between 0 and 1, got {getattr(args, name)}")
    if "reinforce" in methods and not 1 / LEVELS < args.init_magnitude < 1:
        raise UsageError(f"--init-magnitude must lie strictly between {1 / LEVELS:g} and 1 with reinforce (the "
                         f"expected level of its {LEVELS} magnitude levels), got {args.init_magnitude}")
    out = _writable_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    search = SearchConfig(steps=args.search_steps, batch=args.batch, val_batch=args.val_batch, lr=args.lr,
                          policy_lr=args.policy_lr, temperature=args.temperature,
                          straight_through=args.straight_through, init_prob=args.init_prob,
                          init_magnitude=args.init_magnitude, samples=args.samples, population=args.population,
                          sigma=args.sigma)
    t0 = time.perf_counter()
    try:
        result = run_experiment(args.data, methods, _ints(args.seeds, "seeds"), args.train_per_class,
                                args.val_per_class, args.classes, search, args.train_steps, args.hidden,
                                args.data_root, out, not args.quiet, (lambda *a: None) if args.quiet else print)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    result["wall_s"] = time.perf_counter() - t0
    write_result(result, out, markdown(result), args.quiet)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("augment", help="learned data augmentation vs none and a random policy, over seeds",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default="digits", choices=DATASETS,
                   help="digits (shipped), glyphs (built in) or omniglot (the small1 minimal split under --data-root)")
    p.add_argument("--methods", default="none,random,start,gradient,reinforce",
                   help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2,3,4", help="each seed: its own split, initializations and batches")
    p.add_argument("--train-per-class", type=int, default=10, help="training images per class (default 10)")
    p.add_argument("--val-per-class", type=int, default=10,
                   help="validation images per class, seen only by the searches (default 10)")
    p.add_argument("--classes", type=int, help="keep this many classes (drawn with seed 0; default all)")
    p.add_argument("--search-steps", type=int, default=300, help="policy updates, one model step each (default 300)")
    p.add_argument("--train-steps", type=int, default=300, help="SGD steps of the final model (default 300)")
    p.add_argument("--batch", type=int, default=32, help="training batch (default 32)")
    p.add_argument("--val-batch", type=int, default=100, help="validation batch of the lookahead loss (default 100)")
    p.add_argument("--lr", type=float, default=0.05, help="model SGD step size and lookahead step (default 0.05)")
    p.add_argument("--policy-lr", type=float, default=0.05, help="Adam step size of the policy (default 0.05)")
    p.add_argument("--temperature", type=float, default=0.5, help="relaxed gates' temperature (default 0.5)")
    p.add_argument("--straight-through", action="store_true", help="hard gates forward, relaxed gradient back")
    p.add_argument("--init-prob", type=float, default=0.2, help="initial probability of every operation")
    p.add_argument("--init-magnitude", type=float, default=0.3,
                   help="initial magnitude of every operation (reinforce: the expected level)")
    p.add_argument("--samples", type=int, default=4, help="REINFORCE: sampled policies per step (default 4)")
    p.add_argument("--population", type=int, default=8, help="ES: antithetic pairs per step (default 8)")
    p.add_argument("--sigma", type=float, default=0.1, help="ES: perturbation of φ (default 0.1)")
    p.add_argument("--hidden", type=int, default=32, help="Conv4 channels (default 32)")
    p.add_argument("--data-root", help="folder with the Omniglot archives (default: $METAPHI_DATA or "
                   "~/.cache/metaphi/data)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/augment", help="folder for checkpoints, result.json, result.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_augment)
