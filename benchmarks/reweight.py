"""Sample reweighting on digits: plain training vs Learning to Reweight Examples (Ren et al. 2018) vs
Meta-Weight-Net (Shu et al. 2019) under label noise and class imbalance, over seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reweight.py [--seeds 10] [--settings uniform40,...]
        [--lr-check] [--omniglot DIR] [--timing]

Per seed: digits is split per class into 50 clean test images, 10 clean meta images (the papers' "few
clean images per class held out from training") and the rest for training (about 120 per class);
the training split is then corrupted by metaphi/tasks/corrupt.py (seeded by the same seed). Every
method starts from the same MLP 64-100-10 and trains with SGD (momentum 0.9, lr 0.03, ×0.1 at 60% and
80%, weight decay 5e-4, batch 100) for the same number of steps, 1200, whatever the size of the
training split (epochs = 1200 / batches per epoch). "plain-meta" is plain training on the training
split plus the clean meta images, the fair baseline for methods that see those labels.
``--lr-check`` reruns two settings at lr 0.1 (the papers' step size) on 5 seeds.
``--omniglot DIR`` adds a many-class setting on the Omniglot small1 minimal split (skipped when absent).

Writes benchmarks/results/reweight.{md,json}; runs are checkpointed under runs/bench-reweight/.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, write  # noqa: E402

STEPS = 1200
METHODS = ("plain", "plain-meta", "l2rw", "mwnet")
SETTINGS = {
    "uniform40": dict(noise="uniform", noise_rate=0.4, imbalance=1.0),
    "flip40": dict(noise="flip", noise_rate=0.4, imbalance=1.0),
    "imbalance10": dict(noise="none", noise_rate=0.0, imbalance=10.0),
    "imbalance50": dict(noise="none", noise_rate=0.0, imbalance=50.0),
    "imbalance100": dict(noise="none", noise_rate=0.0, imbalance=100.0),
}
PUBLISHED = (  # from ../shared/REFERENCES.md
    "L2RW (Ren et al. 2018), CIFAR-10 / CIFAR-100 with 40% uniform label noise, WRN-28-10: baseline "
    "67.97 ± 0.62 / 50.66 ± 0.24, L2RW 86.92 ± 0.19 / 61.34 ± 2.06",
    "Meta-Weight-Net (Shu et al. 2019), long-tailed CIFAR-10, imbalance 200 / 100 / 50: 68.91 / 75.21 / 80.06",
)
META_PER_CLASS, TEST_PER_CLASS, BATCH = 10, 50, 100


def epochs_for(store, corruption, seed: int = 0) -> int:
    from metaphi.experiments.reweight import make_splits
    n = len(make_splits(store, META_PER_CLASS, TEST_PER_CLASS, corruption, seed)["train"][1])
    return max(1, round(STEPS / math.ceil(n / BATCH)))


def paired_delta(rows, method: str, base: str = "plain"):
    from metaphi.evaluate import mean_ci95
    by = {(r["seed"], r["method"]): r["test_acc"] for r in rows}
    d = [by[(s, method)] - by[(s, base)] for (s, m) in by if m == method and (s, base) in by]
    return mean_ci95(d) if len(d) > 1 else (float("nan"), float("nan"))


def run_setting(name: str, corruption_kw: dict, seeds, lr: float, data: str = "digits", data_root=None,
                model=None, meta_per_class=META_PER_CLASS, test_per_class=TEST_PER_CLASS, classes=None) -> dict:
    from metaphi.experiments.reweight import Corruption, TrainConfig, load_data, run_experiment
    corruption = Corruption(**corruption_kw)
    store = load_data(data, data_root, classes)
    if data == "digits":
        epochs = epochs_for(store, corruption)
    else:
        from metaphi.experiments.reweight import make_splits
        n = len(make_splits(store, meta_per_class, test_per_class, corruption, 0)["train"][1])
        epochs = max(1, round(STEPS / math.ceil(n / BATCH)))
    cfg = TrainConfig(epochs=epochs, batch=BATCH, lr=lr)
    ck = os.path.join("runs", "bench-reweight", f"{name}-lr{lr:g}.pt")
    os.makedirs(os.path.dirname(ck), exist_ok=True)
    t0 = time.perf_counter()
    result = run_experiment(data, METHODS, seeds, corruption, model or {"name": "mlp", "hidden": [100]}, cfg,
                            meta_per_class, test_per_class, classes, data_root, checkpoint=ck, progress=True,
                            log=print)
    result["wall_s"] = time.perf_counter() - t0
    result["name"], result["lr"], result["epochs"] = name, lr, epochs
    result["deltas"] = {m: paired_delta(result["rows"], m) for m in METHODS if m != "plain"}
    for r in result["rows"]:  # keep the json small: the last epoch of each history
        r["history"] = {k: v[-1] for k, v in r["history"].items()}
    return result


def step_timing(reps: int = 30) -> dict:
    """Median seconds of one training step of each method on the digits MLP (batch 100, meta 100), and
    of L2RW's scores by forward-mode product (jvp) and through the lookahead (double backward)."""
    import statistics

    import torch
    from metaphi.functional import params_of
    from metaphi.algorithms.reweight import l2rw_scores
    from metaphi.experiments.reweight import Corruption, TrainConfig, build_model, load_data, make_splits, train
    split = make_splits(load_data("digits"), META_PER_CLASS, TEST_PER_CLASS, Corruption("uniform", 0.4), 0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model({"name": "mlp", "hidden": [100]}, 10, (1, 8, 8))
    params = params_of(model, False)
    batch = (split["train"][0][:BATCH], split["train"][1][:BATCH])
    out = {}
    for mode in ("jvp", "lookahead"):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            l2rw_scores(model, params, batch, split["meta"], 0.03, mode)
            times.append(time.perf_counter() - t0)
        out[f"l2rw scores ({mode})"] = statistics.median(times)
    one_batch = (split["train"][0][:BATCH], split["train"][1][:BATCH])
    for method in ("plain", "l2rw", "mwnet"):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            train(method, model, params, one_batch, split["meta"], TrainConfig(epochs=reps, batch=BATCH),
                  torch.Generator().manual_seed(0))
            times.append((time.perf_counter() - t0) / reps)
        out[f"{method} training step"] = statistics.median(times)
    return out


def fmt(m: float, ci: float, scale: float = 100.0) -> str:
    return f"{scale * m:.2f} ± {scale * ci:.2f}"


def table(results: list[dict]) -> str:
    lines = ["| setting | lr | epochs | train images | " + " | ".join(METHODS) + " |",
             "|---|---|---|---|" + "---|" * len(METHODS)]
    for res in results:
        by = {e["method"]: e for e in res["summary"]}
        n = sum(r["train_size"] for r in res["rows"] if r["method"] == "plain") / max(
            1, sum(1 for r in res["rows"] if r["method"] == "plain"))
        cells = [fmt(by[m]["test_acc"], by[m]["test_ci95"]) if m in by else "—" for m in METHODS]
        lines.append(f"| {res['name']} | {res['lr']:g} | {res['epochs']} | {n:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Paired difference to plain over the same seeds (same split, corruption and initial weights), "
              "percentage points, mean ± 95% t-interval:", "",
              "| setting | lr | " + " | ".join(f"{m} − plain" for m in METHODS[1:]) + " |",
              "|---|---|" + "---|" * (len(METHODS) - 1)]
    for res in results:
        lines.append(f"| {res['name']} | {res['lr']:g} | "
                     + " | ".join(fmt(*res["deltas"][m]) for m in METHODS[1:]) + " |")
    noisy = [res for res in results if res["config"]["corruption"]["noise"] != "none"]
    if noisy:
        lines += ["", "Share of the batch weight on wrongly labelled training images in the last epoch "
                  "(plain: the share of wrong labels itself), mean ± 95% t-interval:", "",
                  "| setting | lr | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
        for res in noisy:
            by = {e["method"]: e for e in res["summary"]}
            lines.append(f"| {res['name']} | {res['lr']:g} | " + " | ".join(
                fmt(by[m]["noisy_weight_share"], by[m]["noisy_weight_share_ci95"]) + "%" if m in by and
                "noisy_weight_share" in by[m] else "—" for m in METHODS) + " |")
    return "\n".join(lines)


def main() -> int:
    import torch
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--lr-check", action="store_true", help="also uniform40 and imbalance100 at lr 0.1, 5 seeds")
    p.add_argument("--omniglot", metavar="DIR", help="folder with images_background_small1.zip")
    p.add_argument("--timing", action="store_true", help="also time one step of each method")
    args = p.parse_args()
    seeds = tuple(range(args.seeds))
    started = time.perf_counter()
    results = []
    for name in args.settings.split(","):
        results.append(run_setting(name, SETTINGS[name], seeds, args.lr))
    if args.lr_check:
        for name in ("uniform40", "imbalance100"):
            results.append(run_setting(name, SETTINGS[name], tuple(range(5)), 0.1))
    omniglot = None
    if args.omniglot:
        if os.path.exists(os.path.join(args.omniglot, "images_background_small1.zip")):
            omniglot = run_setting("omniglot-uniform40", SETTINGS["uniform40"], tuple(range(5)), args.lr,
                                   data="omniglot", data_root=args.omniglot, model={"name": "mlp", "hidden": [256]},
                                   meta_per_class=2, test_per_class=5)
        else:
            print(f"no images_background_small1.zip under {args.omniglot}: the Omniglot setting is skipped")
    timing = step_timing() if args.timing else None
    wall = time.perf_counter() - started
    compute = sum(r["wall_s"] for res in results + ([omniglot] if omniglot else []) for r in res["rows"])
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reweight.py " + " ".join(sys.argv[1:])
    m = machine()
    md = [f"# Sample reweighting on digits: plain vs L2RW vs Meta-Weight-Net", "",
          f"Machine: {m['machine']}, {m['cores']} cores, {m['system']}, Python {m['python']}, torch {m['torch']}, "
          f"1 thread; load average at start {m['load_average_at_start']}; {m['date']}. Training time of all runs "
          f"{compute / 60:.1f} min (this invocation's wall time {wall / 60:.1f} min; finished runs are reused "
          f"from their checkpoints).", "", f"Command: `{command}`", "",
          f"Seeds {', '.join(map(str, seeds))} (lr-check rows: 0-4); each seed draws its own split, corruption and "
          f"initial weights, shared by all methods. Digits, per class {META_PER_CLASS} clean meta and "
          f"{TEST_PER_CLASS} clean test images, the rest (≈120) for training; MLP 64-100-10; SGD momentum 0.9, "
          f"batch {BATCH}, {STEPS} steps (epochs = {STEPS} / batches per epoch), lr ×0.1 at 60% and 80%, weight "
          f"decay 5e-4; MW-Net 1-100-1, Adam 1e-3, weight decay 1e-4. Final test accuracy (%), mean ± 95% "
          f"t-interval over seeds.", "", table(results)]
    if omniglot is not None:
        md += ["", "## Omniglot small1, many classes (5 seeds)", "",
               f"{len(omniglot['rows'][0]['train_counts'])} classes; per class 2 meta / 5 test / 13 train images; "
               f"MLP 784-256-C; {omniglot['epochs']} epochs.", "", table([omniglot])]
    if timing is not None:
        md += ["", "Median seconds per step on this machine (digits MLP, batch 100, meta set 100, 1 thread):", "",
               "| what | ms |", "|---|---|"] + [f"| {k} | {1000 * v:.2f} |" for k, v in timing.items()]
    md += ["", "Published, for context (other data, networks and budgets):", ""]
    md += [f"- {text}" for text in PUBLISHED]
    per_setting = [{"name": r["name"], "lr": r["lr"], "epochs": r["epochs"], "wall_s": r["wall_s"],
                    "config": r["config"], "summary": r["summary"], "deltas": r["deltas"], "rows": r["rows"]}
                   for r in results + ([omniglot] if omniglot else [])]
    write("reweight", {"machine": m, "command": command, "seeds": list(seeds), "steps": STEPS, "wall_s": wall,
                       "training_s": compute, "step_timing_s": timing, "settings": per_setting}, "\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
