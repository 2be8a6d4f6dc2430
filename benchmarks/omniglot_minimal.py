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

from common import machine, write

# Lake et al. 2015 (Science), 20-way within-alphabet one-shot error with the minimal background sets
# small1 / small2, on the 20 evaluation alphabets (not the alphabets tested here).
LAKE = {"BPL": (4.3, 4.0), "deep convnet": (24.0, 22.3)}


def sh(cmd):
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default=os.path.join("..", "shared", "data", "omniglot"))
    ap.add_argument("--methods", nargs="+", default=["maml", "pixel-nn"])
    ap.add_argument("--ways", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    metaphi = os.path.join(os.path.dirname(sys.executable), "metaphi")
    rows = []
    for ways in args.ways:
        for method in args.methods:
            out = os.path.join("runs", "bench", "omniglot-small", f"{method}-{ways}w1s-seed{args.seed}")
            extra = ["--meta-batch", "4", "--query", "2"] if ways >= 20 else ["--meta-batch", "8"]
            if not os.path.exists(os.path.join(out, "result.json")):
                sh([metaphi, "run", method, "--benchmark", "omniglot-small", "--data-root", args.data_root,
                    "--ways", str(ways), "--shots", "1", "--iterations", str(args.iterations), "--eval-tasks",
                    str(args.eval_tasks), "--seed", str(args.seed), "--no-baselines", "--quiet", "--out", out, *extra])
            across = json.load(open(os.path.join(out, "result.json")))
            within_file = os.path.join(out, "within.json")
            if not os.path.exists(within_file):
                sh([metaphi, "eval", os.path.join(out, "checkpoint.pt"), "--within-alphabet", "--data-root",
                    args.data_root, "--quiet", "--out", within_file])
            within = json.load(open(within_file))
            rows.append({"method": method, "ways": ways, "across": across, "within": within})
    md = ["### Omniglot minimal splits: train on small1, test on small2's unseen alphabets", "",
          f"1-shot accuracy on {args.eval_tasks} fixed test tasks (eval seed 1234) drawn from Japanese (katakana), "
          f"Sanskrit and Tagalog, mean ± 95% CI; {args.iterations} meta-iterations, seed {args.seed}. Training: "
          "4 alphabets of small1 (1 held out for validation), no rotations; 5-way runs use meta-batch 8 and 5 "
          "query images per class, 20-way runs meta-batch 4 and 2; every test task has 15 query images per class; "
          "MAML adapts with 3 steps at α = 0.4 at test.", "",
          "| method | ways | across alphabets | within one alphabet | error within | meta-train s |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        a, w = r["across"], r["within"]
        md.append(f"| {r['method']} | {r['ways']} | {100 * a['mean']:.2f} ± {100 * a['ci95']:.2f} | "
                  f"{100 * w['mean']:.2f} ± {100 * w['ci95']:.2f} | {100 * (1 - w['mean']):.1f}% | "
                  f"{a['train_seconds']:.0f} |")
    md += ["", "Published (Lake et al. 2015), 20-way within-alphabet one-shot error with five background alphabets "
           "(small1 / small2), tested on the 20 evaluation alphabets: "
           + "; ".join(f"{k} {v[0]}% / {v[1]}%" for k, v in LAKE.items()) + ". Those test alphabets differ from "
           "the three tested here, so the figures are context, not a like-for-like comparison.", "",
           f"Command: `.venv/bin/python benchmarks/omniglot_minimal.py {' '.join(sys.argv[1:])}`"]
    write("omniglot_minimal", {"machine": machine(), "settings": vars(args), "lake2015_error": LAKE,
                               "results": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
