"""How `metaphi run protonet --benchmark folder:DIR` chose its recipe: on validation classes only.

small1 (Omniglot's minimal background set 1) is written out as a user's folder, one subfolder per
character (``omniglot_lake_format.write_training_folder``). Every variant is ``metaphi run protonet
--benchmark folder:DIR --deploy``: the folder's classes split 80/20 (seed 0) into training and
validation classes, no test split. Each variant is scored on one-shot problems in Lake et al.'s
format built from the validation characters (support drawn by one person, queries by another; 20-way,
the validation characters of all alphabets pooled, since each alphabet has only a few of them), with
the prediction path of ``metaphi predict`` (``metaphi.experiments.predict.class_probabilities``), and
the same for ``predict``'s test-time augmentation (``--tta``) and fine-tuning (``--finetune-steps``)
on the best variant. Nothing of small2, nor any test alphabet, is read.

The variants change one thing at a time from ``base`` (max-pooling Conv4, 60-way training episodes,
5 queries per class, rotations as new classes, constant step size, no augmentation, equal iterations).

    .venv/bin/python benchmarks/omniglot_recipe_choice.py --data-root ../shared/data/omniglot   # about an hour
    .venv/bin/python benchmarks/omniglot_recipe_choice.py --quick --out /tmp/choice             # a minute

Writes benchmarks/results/omniglot_recipe_choice.{json,md}; runs go to ``--work`` (reused when a run
with the same command has finished there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, run_all, shell, write  # noqa: E402
from omniglot_lake_format import class_folder, metaphi_bin, write_training_folder  # noqa: E402

from metaphi.evaluate import mean_ci95  # noqa: E402
from metaphi.experiments.report import markdown_table, pm  # noqa: E402
from metaphi.tasks import lake, omniglot  # noqa: E402

NAME = "omniglot_recipe_choice"

BASE = ["--pool", "max", "--rotations", "--no-augment", "--lr-schedule", "constant"]
VARIANTS = {
    "base": ("max pooling, rotations, constant step size", BASE),
    "stride": ("stride-2 convolutions instead of max pooling", ["--pool", "stride"] + BASE[2:]),
    "no-rotations": ("no rotations", ["--pool", "max", "--no-rotations", "--no-augment", "--lr-schedule", "constant"]),
    "cosine": ("cosine step size", BASE[:-1] + ["cosine"]),
    "augment": ("random affine augmentation", ["--pool", "max", "--rotations", "--augment", "--lr-schedule",
                                               "constant"]),
}
#: the least fall of the validation error (a fraction) for which a change is taken
MARGIN = 0.005
# predict's options, tried on the chosen variant's best.pt: (label, class_probabilities keywords)
PREDICT = [("plain", {}), ("--tta 8", {"tta": 8}), ("--tta 16", {"tta": 16}),
           ("--finetune-steps 10", {"finetune_steps": 10}), ("--finetune-steps 30", {"finetune_steps": 30})]


def validation_problems(data_root: str, folder: str, per_group: int, seed: int) -> list[lake.LakeProblem]:
    """Lake-format problems over the deploy run's validation characters (the folder split, seed 0)."""
    from metaphi.tasks.folder import folder_splits
    from metaphi.tasks.registry import DEPLOY_FRACTIONS

    val = set(folder_splits(folder, fractions=DEPLOY_FRACTIONS, seed=0, channels=1, image_size=28,
                            invert=True)["val"].classes)
    data = lake.read(data_root, "small1")
    store = data.store
    chosen = [i for i, c in enumerate(store.classes) if class_folder(c) in val]
    pooled = dataclasses.replace(store.subset(chosen), groups=["validation"] * len(chosen))
    drawers = data.drawers[torch.cat([store.indices_of(c) for c in chosen])]  # in subset's image order
    return lake.lake_problems(lake.DrawnCharacters(pooled, drawers), None, per_group,
                              torch.Generator().manual_seed(seed))


def score(run_dir: str, problems, options: dict) -> tuple[list[float], float]:
    """Accuracy of the run's best.pt on each problem through predict's path; CPU seconds it took."""
    from metaphi.experiments.predict import class_probabilities, load_for_prediction
    from metaphi.train import choose_checkpoint

    ck, algorithm, spec = load_for_prediction(choose_checkpoint(run_dir))
    started = time.process_time()
    accuracies = []
    for p in problems:
        (xs, ys), (xq, yq) = p.task.support, p.task.query
        probs = class_probabilities(algorithm, ck["phi"], (xs, ys), xq, p.ways, invert=spec["invert"], **options)
        accuracies.append(float((probs.argmax(-1) == yq).float().mean()))
    return accuracies, time.process_time() - started


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join("..", "shared", "data", "omniglot"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--val-tasks", type=int, default=200)
    ap.add_argument("--problems", type=int, default=100, help="validation problems (20-way)")
    ap.add_argument("--problem-seed", type=int, default=7)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 10 iterations, 5 problems")
    ap.add_argument("--report", action="store_true", help="rewrite the .md from the .json in --out, running nothing")
    ap.add_argument("--work", default=os.path.join("runs", "bench", "omniglot-recipe-choice"))
    ap.add_argument("--out", default=None, help=f"folder for {NAME}.{{json,md}} (default: benchmarks/results)")
    args = ap.parse_args(argv)
    if args.report:
        with open(os.path.join(args.out or RESULTS, f"{NAME}.json")) as f:
            payload = json.load(f)
        saved = argparse.Namespace(**payload["settings"])
        rows, predict_rows = payload["variants"], payload["predict"]
        best = next(r for r in rows if r["variant"] == payload["chosen_variant"])
        write(NAME, payload, report(saved, rows, best, predict_rows, payload["problems"],
                                    payload["total_wall_minutes"], payload.get("command")), args.out or RESULTS)
        return
    if args.quick:
        args.iterations, args.val_every, args.val_tasks, args.problems = 10, 5, 5, 5
    started = time.perf_counter()
    torch.set_num_threads(1)
    work = os.path.abspath(args.work)
    folder = os.path.join(work, "small1-folder")
    os.makedirs(work, exist_ok=True)
    write_training_folder(str(omniglot.find(args.data_root, "small1")), folder)
    shared = ["--benchmark", f"folder:{folder}", "--deploy", "--ways", "20", "--shots", "1", "--train-ways", "60",
              "--query", "5", "--meta-batch", "1", "--iterations", str(args.iterations), "--val-every",
              str(args.val_every), "--val-tasks", str(args.val_tasks), "--threads", "1", "--quiet"]
    jobs = [(v, [metaphi_bin(), "run", "protonet", *shared, *VARIANTS[v][1], "--out", os.path.join(work, v)],
             os.path.join(work, v)) for v in args.variants]
    costs = run_all(jobs, args.jobs)
    problems = validation_problems(args.data_root, folder, args.problems, args.problem_seed)
    rows = []
    for name, cmd, out in jobs:
        accuracies, _ = score(out, problems, {})
        result = json.load(open(os.path.join(out, "result.json")))
        errors = [1 - a for a in accuracies]
        mean, ci = mean_ci95(errors)
        rows.append({"variant": name, "what": VARIANTS[name][0], "error": mean, "ci95": ci,
                     "run_val_accuracy": result["val"]["best"], "best_iteration": result["val"]["best_iteration"],
                     "train_cpu_minutes": costs[name][0] / 60, "command": shell(cmd)})
        print(f"{name}: validation error {100 * mean:.1f} ± {100 * ci:.1f}%", flush=True)
    best = min(rows, key=lambda r: r["error"])
    predict_rows = []
    for label, options in PREDICT:
        accuracies, cpu = score(os.path.join(work, best["variant"]), problems, options)
        mean, ci = mean_ci95([1 - a for a in accuracies])
        predict_rows.append({"predict": label, "error": mean, "ci95": ci, "cpu_seconds_per_problem": cpu / len(problems)})
        print(f"{best['variant']} + predict {label}: validation error {100 * mean:.1f} ± {100 * ci:.1f}%", flush=True)
    minutes = (time.perf_counter() - started) / 60
    payload = {"machine": machine(), "settings": vars(args), "problems": len(problems),
               "ways": sorted({p.ways for p in problems}), "variants": rows, "chosen_variant": best["variant"],
               "predict": predict_rows, "total_wall_minutes": minutes, "command": " ".join(sys.argv[1:])}
    write(NAME, payload, report(args, rows, best, predict_rows, len(problems), minutes, payload["command"]),
          args.out or RESULTS)


def report(args, rows, best, predict_rows, n_problems, minutes, command: str) -> str:
    lines = ["### Choosing the folder recipe for ProtoNet on validation characters (small1 only)", "",
             f"`metaphi run protonet --benchmark folder:small1 --deploy`: 109 training and 27 validation characters "
             f"(the folder's 80/20 split, seed 0). Error on {n_problems} 20-way one-shot problems in Lake et al.'s "
             f"format over the validation characters (support and queries by different people; problem seed "
             f"{args.problem_seed}), mean ± 95% CI over problems, through predict's path on each run's best.pt; "
             f"{args.iterations} iterations each, seed 0, one thread.", ""]
    lines.append(markdown_table(["variant", "what changes from base", "validation error %", "run's own val acc %",
                                 "best at", "train CPU min"],
                                [[r["variant"], r["what"], pm(r["error"], r["ci95"], digits=1),
                                  f"{100 * r['run_val_accuracy']:.1f}", str(r["best_iteration"]),
                                  f"{r['train_cpu_minutes']:.1f}"] for r in rows]))
    lines += ["", f"predict's options on the lowest-error variant ({best['variant']}):", ""]
    lines.append(markdown_table(["predict", "validation error %", "CPU s per problem"],
                                [[r["predict"], pm(r["error"], r["ci95"], digits=1),
                                  f"{r['cpu_seconds_per_problem']:.2f}"] for r in predict_rows]))
    lines += ["", conclusions(rows, predict_rows), "",
              f"Command: `.venv/bin/python benchmarks/omniglot_recipe_choice.py {command}` "
              f"({minutes:.0f} minutes wall clock)"]
    return "\n".join(lines)


def conclusions(rows, predict_rows) -> str:
    """What the table decides: each change from base is kept only where it lowered the validation
    error by at least ``MARGIN`` (a variant that undoes part of base keeps that part where undoing it
    raised the error by as much)."""
    base = next((r for r in rows if r["variant"] == "base"), None)
    if base is None:
        return "Without the base variant there is nothing to compare with."
    say = lambda r: f"{r['what']} ({100 * r['error']:.1f}% against base's {100 * base['error']:.1f}%)"
    undo = {"stride", "no-rotations"}
    kept = [say(r) for r in rows if r["variant"] in undo and r["error"] >= base["error"] + MARGIN]
    added = [say(r) for r in rows if r["variant"] not in undo | {"base"} and r["error"] <= base["error"] - MARGIN]
    dropped = [say(r) for r in rows if r["variant"] not in undo | {"base"} and r["error"] > base["error"] - MARGIN]
    plain = predict_rows[0]["error"] if predict_rows else None
    worse = [f"{r['predict']} ({100 * r['error']:.1f}%)" for r in predict_rows[1:] if r["error"] > plain - MARGIN]
    better = [f"{r['predict']} ({100 * r['error']:.1f}%)" for r in predict_rows[1:] if r["error"] <= plain - MARGIN]
    parts = []
    if kept:
        parts.append("Base's choices stay, since undoing them raised the error: " + "; ".join(kept) + ".")
    if added:
        parts.append("Added to the recipe, since they lowered it: " + "; ".join(added) + ".")
    if dropped:
        parts.append(f"Not taken, since they did not lower it by {100 * MARGIN:.1f} points or more: "
                     + "; ".join(dropped) + ".")
    if worse:
        parts.append(f"predict's options did not lower the error of plain prediction ({100 * plain:.1f}%): "
                     + ", ".join(worse) + "; they stay off by default.")
    if better:
        parts.append("predict's options that lowered it: " + ", ".join(better) + ".")
    return " ".join(parts)


if __name__ == "__main__":
    main()
