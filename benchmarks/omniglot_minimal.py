"""The Omniglot minimal splits: meta-train on images_background_small1, test on the alphabets of
images_background_small2 that small1 lacks (Japanese (katakana), Sanskrit, Tagalog), 5-way and
20-way 1-shot, with test tasks across alphabets and within one alphabet (the Omniglot challenge's
harder setting), beside a pixel-space nearest-neighbour classifier and Lake et al. 2015's published
errors for five background alphabets.

    .venv/bin/python benchmarks/omniglot_minimal.py --data-root ../shared/data/omniglot

Every run goes through `metaphi run` / `metaphi eval`; writes benchmarks/results/omniglot_minimal.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

from common import machine, run_all, write

# Lake et al. 2015 (Science), 20-way within-alphabet one-shot error with the minimal background sets
# small1 / small2, on the 20 evaluation alphabets (not the alphabets tested here).
LAKE = {"BPL": (4.3, 4.0), "deep convnet": (24.0, 22.3)}


#: iterations of each method where --iterations-of does not say (ProtoNet's episodes are 60-way)
ITERATIONS = {"protonet": 1000, "maml": 300, "pixel-nn": 1}


def sh(cmd):
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def described(config: dict) -> str:
    """What a run's config.yaml says of its training, in a few words."""
    words = [f"{config['iterations']} it", f"meta-batch {config['meta_batch']}", f"{config['query']} q/class"]
    if config.get("train_ways") and config["train_ways"] != config["ways"]:
        words.append(f"{config['train_ways']}-way episodes")
    words.append("rotations" if config.get("rotations") else "no rotations")
    if config.get("pool"):
        words.append(f"{config['pool']} pooling")
    return ", ".join(words)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default=os.path.join("..", "shared", "data", "omniglot"))
    ap.add_argument("--methods", nargs="+", default=["protonet", "maml", "pixel-nn"])
    ap.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--iterations-of", nargs="*", default=[], metavar="METHOD=N",
                    help=f"meta-iterations of some methods (default: {ITERATIONS})")
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--work", default=os.path.join("runs", "bench", "omniglot-small-recipes"))
    args = ap.parse_args()
    iterations = dict(ITERATIONS, **{k: int(v) for k, v in (a.split("=") for a in args.iterations_of)})
    started = time.perf_counter()
    metaphi = os.path.join(os.path.dirname(sys.executable), "metaphi")
    jobs = []
    for ways in args.ways:
        for method in args.methods:
            out = os.path.abspath(os.path.join(args.work, f"{method}-{ways}w1s-seed{args.seed}"))
            # nothing but the sizes and the budget: each family's recipe decides the rest (run prints it)
            jobs.append((f"{method}-{ways}", [metaphi, "run", method, "--benchmark", "omniglot-small", "--data-root",
                                              args.data_root, "--ways", str(ways), "--shots", "1", "--iterations",
                                              str(iterations.get(method, 300)), "--eval-tasks", str(args.eval_tasks),
                                              "--seed", str(args.seed), "--no-baselines", "--quiet", "--threads", "1",
                                              "--out", out], out))
    done = run_all(jobs, args.jobs)
    rows = []
    for (name, cmd, out), (method, ways) in zip(jobs, [(m, w) for w in args.ways for m in args.methods]):
        across = json.load(open(os.path.join(out, "result.json")))
        within_file = os.path.join(out, "within.json")
        if not os.path.exists(within_file):  # eval takes the run's best.pt, as predict does
            sh([metaphi, "eval", out, "--within-alphabet", "--data-root", args.data_root, "--quiet", "--threads", "1",
                "--out", within_file])
        within = json.load(open(within_file))
        config = yaml.safe_load(open(os.path.join(out, "config.yaml")))
        training = "none (no parameters)" if method == "pixel-nn" else described(config)
        rows.append({"method": method, "ways": ways, "across": across, "within": within, "training": training,
                     "cpu_minutes": done[name][0] / 60, "command": " ".join(cmd[1:])})
    minutes = (time.perf_counter() - started) / 60
    md = ["### Omniglot minimal splits: train on small1, test on small2's unseen alphabets", "",
          f"1-shot accuracy on {args.eval_tasks} fixed test tasks (eval seed 1234) drawn from Japanese (katakana), "
          f"Sanskrit and Tagalog, mean ± 95% CI, seed {args.seed}, one thread. Training: 4 alphabets of small1 "
          "(1 held out for validation; the best-validation φ is tested), each family with its own recipe (what "
          "`metaphi run` chooses where only the sizes and iterations are given; the training column says what it "
          "chose); every test task has 15 query images per class. \"Across\" is the run's own test (classes of any "
          "of the three alphabets), \"within\" `metaphi eval --within-alphabet` (all classes of a task from one).", "",
          "| method | ways | training | across alphabets | within one alphabet | error within | train CPU min |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, w = r["across"], r["within"]
        md.append(f"| {r['method']} | {r['ways']} | {r['training']} | {100 * a['mean']:.2f} ± {100 * a['ci95']:.2f} | "
                  f"{100 * w['mean']:.2f} ± {100 * w['ci95']:.2f} | {100 * (1 - w['mean']):.1f}% | "
                  f"{r['cpu_minutes']:.1f} |")
    md += ["", "Published (Lake et al. 2015), 20-way within-alphabet one-shot error with five background alphabets "
           "(small1 / small2), tested on the 20 evaluation alphabets: "
           + "; ".join(f"{k} {v[0]}% / {v[1]}%" for k, v in LAKE.items()) + ". Those test alphabets differ from "
           "the three tested here, so the figures are context, not a like-for-like comparison.", "",
           "Commands: " + "; ".join(f"`metaphi {r['command']}`" for r in rows), "",
           f"Benchmark: `.venv/bin/python benchmarks/omniglot_minimal.py {' '.join(sys.argv[1:])}` "
           f"({minutes:.0f} minutes wall clock, finished runs reused)"]
    write("omniglot_minimal", {"machine": machine(), "settings": vars(args), "iterations": iterations,
                               "lake2015_error": LAKE, "results": rows, "wall_minutes": minutes}, "\n".join(md))


if __name__ == "__main__":
    main()
