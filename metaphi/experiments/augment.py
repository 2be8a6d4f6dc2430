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

import os
import time
from dataclasses import dataclass

import torch

from metaphi.config import UsageError, option
from metaphi.tasks.registry import NAMED
from metaphi.tasks.registry import load_named as load_data

METHODS = ("none", "random", "start", "gradient", "reinforce", "es")


@dataclass
class AugmentConfig:
    """``metaphi augment``: the data, the methods and seeds, the searches' and the final training's settings."""

    data: str = option("digits", "digits (shipped), glyphs (built in) or omniglot (the small1 minimal split under "
                                 "--data-root)", choices=NAMED, positional=True)
    methods: list[str] = option(default_factory=lambda: ["none", "random", "start", "gradient", "reinforce"],
                                help=f"comma list of {', '.join(METHODS)}", choices=METHODS)
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2, 3, 4],
                              help="each seed: its own split, initializations and batches", check="nonneg")
    train_per_class: int = option(10, "training images per class", check="positive")
    val_per_class: int = option(10, "validation images per class, seen only by the searches", check="positive")
    classes: int | None = option(None, "keep this many classes (drawn with seed 0; none: all)", check="positive")
    search_steps: int = option(300, "policy updates, one model step each", check="positive")
    train_steps: int = option(300, "SGD steps of the final model", check="nonneg")
    batch: int = option(32, "training batch", check="positive")
    val_batch: int = option(100, "validation batch of the lookahead loss", check="positive")
    lr: float = option(0.05, "model SGD step size and lookahead step", check="positive")
    policy_lr: float = option(0.05, "Adam step size of the policy", check="positive")
    temperature: float = option(0.5, "relaxed gates' temperature", check="positive")
    straight_through: bool = option(False, "hard gates forward, relaxed gradient back")
    init_prob: float = option(0.2, "initial probability of every operation, in (0, 1)")
    init_magnitude: float = option(0.3, "initial magnitude of every operation, in (0, 1) (reinforce: the expected "
                                        "level)")
    samples: int = option(4, "REINFORCE: sampled policies per step", check="positive")
    population: int = option(8, "ES: antithetic pairs per step", check="positive")
    sigma: float = option(0.1, "ES: perturbation of φ", check="positive")
    hidden: int = option(32, "Conv4 channels", check="positive")
    data_root: str | None = option(None, "folder with the Omniglot archives (none: $METAPHI_DATA or "
                                         "~/.cache/metaphi/data)")
    threads: int = option(0, "torch threads (0: torch's choice)", check="nonneg")
    out: str = option("runs/augment", "folder for config.yaml, checkpoints, result.json, result.md")
    quiet: bool = option(False, "no progress bars")

    def search(self):
        """The ``SearchConfig`` of this study's searches (their method and seed are set per run)."""
        from metaphi.augment.search import SearchConfig
        return SearchConfig(steps=self.search_steps, batch=self.batch, val_batch=self.val_batch, lr=self.lr,
                            policy_lr=self.policy_lr, temperature=self.temperature,
                            straight_through=self.straight_through, init_prob=self.init_prob,
                            init_magnitude=self.init_magnitude, samples=self.samples, population=self.population,
                            sigma=self.sigma)


def main(config: AugmentConfig) -> int:
    run(config)
    return 0


def run(config: AugmentConfig) -> dict:
    """The study of ``config``: writes config.yaml, result.json and result.md (and the checkpoints) into
    ``config.out`` and returns the result."""
    from metaphi.augment.policy import LEVELS
    from metaphi.config import writable_dir
    from metaphi.experiments.report import save_config, write_result

    for name in ("init_prob", "init_magnitude"):
        if not 0 < getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be strictly between 0 and 1, got {getattr(config, name)}")
    if "reinforce" in config.methods and not 1 / LEVELS < config.init_magnitude < 1:
        raise UsageError(f"--init-magnitude must lie strictly between {1 / LEVELS:g} and 1 with reinforce (the "
                         f"expected level of its {LEVELS} magnitude levels), got {config.init_magnitude}")
    if not config.methods or not config.seeds:
        raise UsageError("--methods and --seeds need at least one entry each")
    out = writable_dir(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    save_config(config, out, "augment")
    t0 = time.perf_counter()
    try:
        result = run_experiment(config.data, config.methods, config.seeds, config.train_per_class,
                                config.val_per_class, config.classes, config.search(), config.train_steps,
                                config.hidden, config.data_root, out, not config.quiet,
                                (lambda *a: None) if config.quiet else print)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    result["wall_s"] = time.perf_counter() - t0
    write_result(result, out, markdown(result), config.quiet, also=", config.yaml")
    return result


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
    resumes (and reuses the finished runs when it asks for more seeds or methods). ``search``: a
    ``SearchConfig`` whose method and seed are set per run. Returns {"config", "rows", "summary"}."""
    from dataclasses import replace

    from metaphi.augment import policy as P
    from metaphi.augment.search import SearchConfig, accuracy, search as run_search, train_model
    from metaphi.experiments.report import sweep
    from metaphi.functional import params_of

    search = search or SearchConfig()
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method {', '.join(bad)} (valid: {', '.join(METHODS)})")
    settings = {"data": data, "train_per_class": train_per_class, "val_per_class": val_per_class,
                "classes": classes, "train_steps": train_steps, "hidden": hidden,
                "search": {k: v for k, v in search.to_dict().items() if k not in ("method", "seed")}}
    config = {**settings, "methods": list(methods), "seeds": list(seeds)}
    store = load_data(data, data_root, classes, seed=0)

    def run_cell(cell: tuple[int, str]) -> dict:
        seed, method = cell
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
        return row

    # the checkpoint matches on the settings alone: a rerun asking for more seeds or methods reuses its rows
    rows = sweep([(s, m) for s in seeds for m in methods], run_cell, key=lambda r: (r["seed"], r["method"]),
                 checkpoint=os.path.join(out, "checkpoint.pt") if out else None, identity=settings,
                 desc=f"augment {data}", progress=progress, log=log,
                 postfix=lambda r: {"seed": r["seed"], "method": r["method"], "acc": f"{r['test_acc']:.3f}"},
                 stored_as="settings", other="runs with other settings")
    rows = [r for r in rows if r["seed"] in set(seeds) and r["method"] in set(methods)]
    return {"config": config, "rows": rows, "summary": summarize(rows, list(methods))}


def summarize(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: test accuracy mean ± 95% t-interval over seeds, the paired differences to ``none``
    and to ``start`` (same split, initialization and batches), mean search and training time, the
    mean policy."""
    from metaphi.augment.policy import OPS
    from metaphi.experiments.report import over_seeds, paired_difference

    out = []
    for group in over_seeds(rows, ("method",), ("test_acc", "search_s", "train_s"), order=list(methods)):
        m = group["method"]
        rs = [r for r in rows if r["method"] == m]
        entry = {"method": m, "seeds": group["seeds"], "test_acc": group["test_acc"], "test_ci": group["test_acc_ci"],
                 "search_s": group["search_s"], "train_s": group["train_s"],
                 "policy": {op: {k: sum(r["policy"][op][k] for r in rs) / len(rs) for k in ("prob", "magnitude")}
                            for op in OPS}}
        for ref in ("none", "start"):
            diff = paired_difference(rows, "test_acc", m, ref) if m != ref else None
            if diff is not None:
                entry[f"diff_vs_{ref}"], entry[f"diff_{ref}_ci"] = diff[0], diff[1]
        out.append(entry)
    return out


def _pm(mean: float, ci: float, signed: bool = False) -> str:
    """Percent, ± the CI's half-width (omitted with one seed, where it is undefined)."""
    from metaphi.experiments.report import pm
    return pm(mean, None if ci != ci else ci, signed=signed)


def markdown(result: dict) -> str:
    from metaphi.augment.policy import OPS
    from metaphi.experiments.report import markdown_table

    c = result["config"]
    title = (f"**{c['data']}** ({c['classes'] or 'all'} classes; {c['train_per_class']} training and "
             f"{c['val_per_class']} validation images per class, the rest for test; search "
             f"{c['search']['steps']} steps; final training {c['train_steps']} steps; {len(c['seeds'])} seeds; "
             "test accuracy mean ± 95% CI, t-interval)")
    table = markdown_table(
        ["policy", "test accuracy %", "paired Δ vs none", "paired Δ vs start", "search s", "train s"],
        [[e["method"], _pm(e["test_acc"], e["test_ci"]),
          *[_pm(e[f"diff_vs_{ref}"], e[f"diff_{ref}_ci"], signed=True) if f"diff_vs_{ref}" in e else "—"
            for ref in ("none", "start")], f"{e['search_s']:.1f}", f"{e['train_s']:.1f}"]
         for e in result["summary"]])
    policies = markdown_table(
        ["policy", *OPS],
        [[e["method"], *(f"{e['policy'][op]['prob']:.2f} / {e['policy'][op]['magnitude']:.2f}" for op in OPS)]
         for e in result["summary"]])
    return "\n".join([title, "", table, "", "Mean policy over seeds (probability / magnitude):", "", policies])
