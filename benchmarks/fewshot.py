"""Few-shot classification with the MAML family and both baselines, through `metaphi run`.

Every method is run by the command line exactly as a user would run it, on the same fixed test
tasks (eval seed 1234), and the table reports mean ± 95% CI over the test tasks with the
meta-training and test wall time on this machine.

    .venv/bin/python benchmarks/fewshot.py --benchmark glyphs --shots 1 5 --iterations 300

writes benchmarks/results/fewshot-<benchmark>.{json,md}; the runs themselves go to runs/bench/.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import machine, write

METHODS = ("maml", "fomaml", "reptile", "anil", "metasgd", "scratch", "pretrain", "pixel-nn")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--benchmark", default="glyphs")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="more `metaphi run` options, quoted")
    ap.add_argument("--name", default=None, help="results file name (default fewshot-<benchmark>)")
    ap.add_argument("--out-tag", default="", help="suffix of the run folders, to keep settings apart")
    args = ap.parse_args()
    metaphi = os.path.join(os.path.dirname(sys.executable), "metaphi")
    results = []
    for shots in args.shots:
        for method in args.methods:
            out = os.path.join("runs", "bench", args.benchmark.replace(":", "_").replace("/", "_"),
                               f"{method}-{args.ways}w{shots}s-seed{args.seed}{args.out_tag}")
            cmd = [metaphi, "run", method, "--benchmark", args.benchmark, "--ways", str(args.ways), "--shots",
                   str(shots), "--iterations", str(args.iterations), "--eval-tasks", str(args.eval_tasks), "--seed",
                   str(args.seed), "--no-baselines", "--quiet", "--out", out, *args.extra.split()]
            if args.data_root:
                cmd += ["--data-root", args.data_root]
            if method in ("scratch", "pretrain"):
                cmd += ["--eval-steps", "10"]
            done = os.path.join(out, "result.json")
            r = json.load(open(done)) if os.path.exists(done) else None
            if r is None or r["iterations"] != (args.iterations if method not in ("scratch", "pixel-nn") else 0) \
                    or r["eval_tasks"] != args.eval_tasks:
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
                with open(done) as f:
                    r = json.load(f)
            else:
                print(f"reusing {done}", flush=True)
            r["command"] = " ".join(["metaphi"] + cmd[1:])
            results.append(r)
            print(f"  {method} {shots}-shot: {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}%  "
                  f"train {r['train_seconds']:.0f}s test {r['test_seconds']:.0f}s", flush=True)
    md = [f"### {args.benchmark}: {args.ways}-way few-shot classification", "",
          f"Accuracy on {args.eval_tasks} fixed test tasks (eval seed 1234), mean ± 95% CI; "
          f"{args.iterations} meta-iterations, seed {args.seed}; meta-train and test wall time in seconds on "
          f"{machine()['cores']} CPU cores.", "",
          "| method | " + " | ".join(f"{args.ways}-way {s}-shot | train s | test s" for s in args.shots) + " |",
          "|---|" + "---|---|---|" * len(args.shots)]
    for method in args.methods:
        cells = []
        for shots in args.shots:
            r = next(x for x in results if x["algorithm"] == method and x["shots"] == shots)
            cells.append(f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} | {r['train_seconds']:.0f} | "
                         f"{r['test_seconds']:.0f}")
        md.append(f"| {method} | " + " | ".join(cells) + " |")
    md += ["", "Inner steps at test: MAML family as configured (3 for glyphs and Omniglot), baselines 10 fine-tuning "
           "steps.", "", f"Command: `.venv/bin/python benchmarks/fewshot.py {' '.join(sys.argv[1:])}`"]
    write(args.name or f"fewshot-{args.benchmark.replace(':', '_').replace('/', '_')}",
          {"machine": machine(), "settings": vars(args), "results": results}, "\n".join(md))


if __name__ == "__main__":
    main()
