"""Learned optimizers against tuned hand-designed ones (Andrychowicz et al. 2016, on glyphs).

Meta-trains, on CPU, the coordinatewise LSTM and the MLP rule on random 10-d quadratics and on a
one-hidden-layer (20 sigmoid units) MLP classifying 100 random glyph characters, plus the two simplest
learned rules (per-layer step sizes, a step-size schedule) on the glyph MLP. Then every optimizer
trains the same 20 test problems per family for 200 steps: SGD, Nesterov momentum, RMSprop and Adam
with the learning rate that was best on a grid (on 10 validation problems, for each horizon), and the
learned optimizers as they are. Families: the two training ones, and the paper's generalization
tests for the glyph-trained optimizers: 40 hidden units, two hidden layers, ReLU; horizon 200 is twice
the training horizon. Glyph problems are drawn from the test alphabets, tuning and validation problems
from the validation alphabets.

    python benchmarks/learned_optimizer.py                 # train (about 12-14 min) then evaluate
    python benchmarks/learned_optimizer.py --stage eval    # evaluate the optimizers already trained
    python benchmarks/learned_optimizer.py --quick         # a smoke run of a minute or two

Writes benchmarks/results/learned_optimizer.{md,json} and learned_optimizer_curves.png; the trained
optimizers stay in --work (default runs/l2o-benchmark), loadable with metaphi.inner.optim.LearnedOptimizer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from metaphi.experiments.report import machine, write_json  # noqa: E402
from metaphi.inner.learned import LSTMRule, MLPRule, PerLayerSGD, ScheduledSGD  # noqa: E402
from metaphi.experiments.l2o import L2OConfig, build_family, compare, format_rows, meta_train  # noqa: E402
from metaphi.inner.optim import load_learned  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
HORIZON = 100

# (label, family, rule, config): the budget of each meta-training run, in optimizee runs and seconds
TRAINING = [
    ("lstm", "quadratic", lambda: LSTMRule(seed=0),
     dict(iterations=400, problems=32, meta_lr=3e-3, val_every=50, val_problems=20, max_seconds=240)),
    ("mlp-rule", "quadratic", lambda: MLPRule(lr=0.1, seed=0),
     dict(iterations=300, problems=32, meta_lr=1e-2, val_every=50, val_problems=20, max_seconds=60)),
    ("lstm", "glyphs", lambda: LSTMRule(seed=0),
     dict(iterations=80, problems=1, meta_lr=3e-3, val_every=20, val_problems=5, max_seconds=330)),
    ("mlp-rule", "glyphs", lambda: MLPRule(lr=0.01, seed=0),
     dict(iterations=80, problems=1, meta_lr=1e-2, val_every=20, val_problems=5, max_seconds=150)),
    ("per-layer-sgd", "glyphs", lambda: PerLayerSGD(0.5),
     dict(iterations=150, problems=1, meta_lr=0.1, val_every=50, val_problems=5, max_seconds=60)),
    ("schedule-sgd", "glyphs", lambda: ScheduledSGD(0.5, steps=HORIZON),
     dict(iterations=150, problems=1, meta_lr=0.1, val_every=50, val_problems=5, max_seconds=60)),
]
EVALUATION = [("quadratic", "quadratic"), ("glyphs", "glyphs"), ("glyphs-wide", "glyphs"),
              ("glyphs-2layer", "glyphs"), ("glyphs-relu", "glyphs")]
TRAINED_ON = {"quadratic", "glyphs"}


def train_all(work: str, quick: bool, only: list[str] | None = None) -> dict:
    path = os.path.join(work, "training.json")
    out = json.load(open(path)) if only and os.path.exists(path) else {}
    for label, family_name, make_rule, cfg in TRAINING:
        if only and f"{label}@{family_name}" not in only:
            continue
        cfg = dict(cfg)
        if quick:
            cfg.update(iterations=2, val_every=2, val_problems=2, max_seconds=None)
        folder = os.path.join(work, f"{label}-{family_name}")
        config = L2OConfig(horizon=HORIZON, unroll=20, seed=0, **cfg)
        started = time.perf_counter()
        state = meta_train(make_rule(), build_family(family_name, split="train"), config, out_dir=folder,
                           val_family=build_family(family_name, split="val"), progress=sys.stderr.isatty())
        out[f"{label}@{family_name}"] = {
            "rule": label, "family": family_name, "config": {k: v for k, v in vars(config).items()},
            "runs": state.iteration, "truncations": state.truncations, "stopped_by_time": state.stopped_early,
            "train_seconds": round(state.seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
            "best_val": state.best_val, "optimizer": os.path.join(folder, "optimizer.pt")}
        print(f"trained {label} on {family_name}: {state.iteration} runs ({state.truncations} meta-updates) in "
              f"{state.seconds:.0f} s training, {time.perf_counter() - started:.0f} s wall; best val {state.best_val:.4g}",
              flush=True)
        write_json(out, path)
    return out


def evaluate_all(work: str, quick: bool) -> dict:
    training = json.load(open(os.path.join(work, "training.json")))
    horizons = [HORIZON, 2 * HORIZON] if not quick else [5, 10]
    problems, tune_problems = (20, 10) if not quick else (3, 2)
    grid = None if not quick else [0.01, 0.1]
    out = {}
    for family_name, trained_on in EVALUATION:
        learned = {}
        for key, t in training.items():
            if t["family"] == trained_on:
                rule, meta, _ = load_learned(t["optimizer"])
                learned[f"{t['rule']}"] = (rule, meta)
        started = time.perf_counter()
        res = compare(family_name, learned, horizons, problems, 1234, ["sgd", "nesterov", "rmsprop", "adam"], grid,
                      tune_problems, 77, progress=sys.stderr.isatty())
        res["wall_seconds"] = time.perf_counter() - started
        res["trained_on"] = trained_on
        out[family_name] = res
        print(format_rows(f"{family_name} (learned optimizers trained on {trained_on}, horizon {HORIZON})",
                          res["rows"], horizons), flush=True)
        print(f"  {res['wall_seconds']:.0f} s", flush=True)
    return {"horizons": horizons, "problems": problems, "tune_problems": tune_problems, "families": out}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = results["families"]
    cols = 3
    rows = (len(families) + cols) // cols  # one panel more, for the legend
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows))
    axes = axes.flatten()
    styles = {"sgd": (":", "tab:blue"), "nesterov": (":", "tab:orange"), "rmsprop": ("--", "tab:green"),
              "adam": ("--", "tab:red"), "lstm": ("-", "black"), "mlp-rule": ("-", "tab:purple"),
              "per-layer-sgd": ("-", "tab:olive"), "schedule-sgd": ("-", "tab:cyan")}
    for ax, (name, res) in zip(axes, families.items()):
        for label, curve in res["curves"].items():
            line, color = styles.get(label, ("-", None))
            ax.plot(curve, line, color=color, label=label, linewidth=1.1 if line != "-" else 1.6)
        ax.axvline(results["horizons"][0], color="grey", linewidth=0.6)
        ax.set_yscale("log")
        ax.set_title(f"{name}" + (" (training distribution)" if name in TRAINED_ON else " (generalization)"),
                     fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"mean loss, {results['problems']} test problems", fontsize=8)
    handles = {}
    for ax in axes[:len(families)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    for ax in axes[len(families):]:
        ax.axis("off")
    axes[len(families)].legend(handles.values(), handles.keys(), loc="center", fontsize=10,
                               title=f"grey line: training horizon {results['horizons'][0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cell(r: dict) -> str:
    if "error" in r:
        return "n/a"
    if r["diverged"]:
        return f"diverged on {r['diverged']}"
    text = f"{r['mean']:.4g} ± {r['ci95']:.2g}"
    return text + (f" (lr {r['lr']:g})" if "lr" in r else "")


def paired(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """Mean of a − b over the same problems, the 95% CI half-width of that mean, and how often a < b."""
    from metaphi.evaluate import mean_ci95
    d = [x - y for x, y in zip(a, b)]
    mean, half = mean_ci95(d)
    return mean, half, sum(v < 0 for v in d)


def verdicts(results: dict) -> list[str]:
    """One line per (family, horizon, learned optimizer): is it better than tuned Adam on the same problems?

    All optimizers train the same problems, so the comparison is paired: the mean of the per-problem
    differences (learned − Adam) with its 95% CI, and on how many problems the learned one ends lower.
    """
    lines = []
    for name, res in results["families"].items():
        rows = res["rows"]
        for h in results["horizons"]:
            adam = rows["adam"][str(h)]
            for label, row in rows.items():
                if label in ("sgd", "nesterov", "rmsprop", "adam") or "error" in row:
                    continue
                r = row[str(h)]
                n = len(r["values"])
                if r["diverged"] or adam["diverged"]:
                    lines.append(f"- {name}, T={h}: {label} {cell(r)} vs tuned Adam {cell(adam)}")
                    continue
                diff, half, wins = paired(r["values"], adam["values"])
                if diff + half < 0:
                    verdict = "better than"
                elif diff - half > 0:
                    verdict = "worse than"
                else:
                    verdict = "not distinguishable from"
                lines.append(f"- {name}, T={h}: {label} is **{verdict}** tuned Adam: {cell(r)} vs {cell(adam)}; "
                             f"paired difference {diff:+.3g} ± {half:.2g}, lower on {wins}/{n} problems")
    return lines


def write_markdown(results: dict, training: dict, path: str, command: str, wall: float) -> None:
    h = results["horizons"]
    lines = ["## Learned optimizers (Andrychowicz et al. 2016) against tuned SGD, Nesterov, RMSprop and Adam", "",
             f"Mean final loss ± 95% CI over {results['problems']} test problems (seeds) after T steps; lower is "
             f"better. Every optimizer trains the same problems from the same starting points on the same "
             f"minibatches. Hand-designed optimizers get, for each T, the learning rate that was best on a grid "
             f"(1e-4 … 10 in half-decades) on {results['tune_problems']} validation problems. Learned optimizers "
             f"were meta-trained with horizon {HORIZON} (so T = {2 * HORIZON} is twice the training horizon) and "
             f"are used as they are on every family. Glyph problems: a 14×14-pixel MLP classifying 100 random "
             f"characters of the test alphabets (20 drawings each), minibatches of 128, loss on all 2,000 images.",
             ""]
    for name, res in results["families"].items():
        tag = "training distribution" if name in TRAINED_ON else f"generalization, optimizers trained on {res['trained_on']}"
        lines += [f"### {name} ({tag})", "", "| optimizer | " + " | ".join(f"T = {t}" for t in h) + " |",
                  "|---|" + "---|" * len(h)]
        for label, row in res["rows"].items():
            lines.append(f"| {label} | " + " | ".join(cell(row) if "error" in row else cell(row[str(t)]) for t in h) + " |")
        lines.append("")
    lines += ["### Against tuned Adam (paired over the same test problems)", ""] + verdicts(results) + [""]
    lines += ["### Meta-training (CPU)", "", "| learned optimizer | family | runs | meta-updates | problems per run | "
              "meta lr | training s | stopped by time budget |", "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for t in training.values():
        c = t["config"]
        total += t["wall_seconds"]
        lines.append(f"| {t['rule']} | {t['family']} | {t['runs']} | {t['truncations']} | {c['problems']} | "
                     f"{c['meta_lr']:g} | {t['train_seconds']:.0f} | {'yes' if t['stopped_by_time'] else 'no'} |")
    lines += ["", f"Horizon {HORIZON}, truncations of 20 steps (one meta-update of Adam each), first-order "
              f"meta-gradients as in the paper, meta-gradient norm clipped at 1; the optimizer kept is the one "
              f"best on validation problems.", "",
              "![loss curves](learned_optimizer_curves.png)", "",
              f"Curves: mean full-data loss over the test problems after each step; hand-designed optimizers with "
              f"the rate tuned for T = {h[-1]}.", "",
              f"Commands: `python benchmarks/learned_optimizer.py --stage train` ({total:.0f} s of wall time for "
              f"meta-training in all), then `{command}` ({wall / 60:.1f} min). Machine: {machine()}, 1 torch "
              f"thread, shared with other jobs.", ""]
    notes = ""
    if os.path.exists(path):  # hand-written notes at the end survive a rewrite of the tables
        old = open(path).read()
        if "\n### Notes" in old:
            notes = old[old.index("\n### Notes") + 1:]
    with open(path, "w") as f:
        f.write("\n".join(lines) + ("\n" + notes if notes else ""))


def refresh_intervals(tree) -> None:
    """Recompute every saved interval from its per-problem values (Student t, as ``l2o.summarize``)."""
    from metaphi.evaluate import mean_ci95
    if isinstance(tree, dict):
        if "values" in tree and "ci95" in tree and all(math.isfinite(v) for v in tree["values"]):
            tree["ci95"] = mean_ci95(tree["values"])[1]
        for v in tree.values():
            refresh_intervals(v)
    elif isinstance(tree, list):
        for v in tree:
            refresh_intervals(v)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", "train", "eval", "report"], default="all",
                        help="report: rewrite the Markdown and the plot from the saved JSON")
    parser.add_argument("--work", default=os.path.join("runs", "l2o-benchmark"))
    parser.add_argument("--quick", action="store_true", help="tiny budgets, to check the script runs")
    parser.add_argument("--only", nargs="+", help="train only these, e.g. lstm@glyphs (the others are kept)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # with the cores shared, one thread is much faster than contended threads
    started = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)
    if args.stage in ("all", "train"):
        train_all(args.work, args.quick, args.only)
    if args.stage in ("all", "eval"):
        results = evaluate_all(args.work, args.quick)
        training = json.load(open(os.path.join(args.work, "training.json")))
        wall = time.perf_counter() - started
        os.makedirs(args.out, exist_ok=True)
        command = "python benchmarks/learned_optimizer.py " + " ".join(sys.argv[1:])
        write_json({"results": results, "training": training, "machine": machine(), "command": command.strip(),
                    "eval_wall_seconds": wall}, os.path.join(args.out, "learned_optimizer.json"))
        plot(results, os.path.join(args.out, "learned_optimizer_curves.png"))
        write_markdown(results, training, os.path.join(args.out, "learned_optimizer.md"), command.strip(), wall)
        print("\n".join(verdicts(results)))
    if args.stage == "report":
        saved = json.load(open(os.path.join(args.out, "learned_optimizer.json")))
        refresh_intervals(saved["results"])
        write_json(saved, os.path.join(args.out, "learned_optimizer.json"))
        plot(saved["results"], os.path.join(args.out, "learned_optimizer_curves.png"))
        write_markdown(saved["results"], saved["training"], os.path.join(args.out, "learned_optimizer.md"),
                       saved["command"], saved["eval_wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
