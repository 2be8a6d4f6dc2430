"""MAML's inner step size, inner step count and meta-batch tuned by ``metaphi tune`` on glyph validation
tasks, then tested once on the test tasks beside the default configuration.

Step 1 (validation tasks only): ``metaphi tune maml --benchmark glyphs`` with the budget below.
Step 2 (test tasks, once): ``metaphi run maml --benchmark glyphs`` with the default configuration and
with the tuned one (the command tune printed: the same number of training tasks as the default),
same seed, 600 fixed test tasks, mean ± 95% CI.

    .venv/bin/python benchmarks/tune_glyphs.py --budget 10 --trial-iterations 80
    .venv/bin/python benchmarks/tune_glyphs.py --skip-tune      # step 2 only, from the saved best.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=int, default=10)
    p.add_argument("--method", default="reinforce")
    p.add_argument("--trial-iterations", type=int, default=80)
    p.add_argument("--val-tasks", type=int, default=100)
    p.add_argument("--steps", default="1,2,3", help="inner step counts to search")
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="benchmarks/results/tmp/tune_glyphs")
    p.add_argument("--out", default="benchmarks/results/tune_glyphs.json")
    p.add_argument("--skip-tune", action="store_true")
    args = p.parse_args()
    metaphi = [sys.executable, "-m", "metaphi"]
    tune_dir = os.path.join(args.work, "tune")
    tune_cmd = metaphi + ["tune", "maml", "--benchmark", "glyphs", "--budget", str(args.budget), "--method",
                          args.method, "--iterations", str(args.trial_iterations), "--val-tasks", str(args.val_tasks),
                          "--steps", args.steps, "--seed", str(args.seed), "--out", tune_dir]
    tune_seconds = None
    if not args.skip_tune:
        tune_seconds = run(tune_cmd)
    best = json.load(open(os.path.join(ROOT, tune_dir, "best.json")))
    common = ["--benchmark", "glyphs", "--no-baselines", "--quiet", "--eval-tasks", str(args.eval_tasks), "--seed",
              str(args.seed)]
    tuned_args = shlex.split(best["command"])[5:]  # after "metaphi run maml --benchmark glyphs"
    rows = []
    for label, extra in (("default", []), ("tuned", tuned_args)):
        out = os.path.join(args.work, label)
        seconds = run(metaphi + ["run", "maml", *common, *extra, "--out", out])
        r = json.load(open(os.path.join(ROOT, out, "result.json")))
        rows.append({"configuration": label, "inner_lr": r["inner_lr"], "inner_steps": r["inner_steps"],
                     "eval_steps": r["eval_steps"], "meta_batch": r["meta_batch"], "iterations": r["iterations"],
                     "accuracy": r["mean"], "ci95": r["ci95"], "train_seconds": round(r["train_seconds"], 1),
                     "test_seconds": round(r["test_seconds"], 1), "wall_seconds": round(seconds, 1),
                     "command": "metaphi run maml " + " ".join(common + extra), "machine": r["machine"]})
    summary = {"tune_command": " ".join(tune_cmd[2:]), "tune_wall_seconds": tune_seconds or best.get("wall_seconds"),
               "tune": best, "test": rows}
    with open(os.path.join(ROOT, args.out), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"| configuration | inner lr | inner steps (train/test) | meta-batch | iterations | "
          f"val acc (tune) | test acc, {args.eval_tasks} tasks |")
    print("|---|---|---|---|---|---|---|")
    vals = {"default": best["default_val"], "tuned": best["val"]}
    for r in rows:
        print(f"| {r['configuration']} | {r['inner_lr']:.4g} | {r['inner_steps']}/{r['eval_steps']} | {r['meta_batch']} | "
              f"{r['iterations']} | {100 * vals[r['configuration']]:.2f}% | "
              f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}% |")


if __name__ == "__main__":
    main()
