"""What ResNet-12 buys over Conv4 at equal CPU time: ProtoNet on the built-in glyphs.

Each backbone gets the same budget of training seconds on one thread: a 10-iteration pilot measures
its seconds per iteration, and the run gets as many iterations as fit in ``--budget`` seconds. Both are
``metaphi run protonet --benchmark glyphs --model M`` (the recipe's episodes otherwise) and are tested on
the same 600 test tasks (5-way 1-shot; mean ± 95% CI).

    .venv/bin/python benchmarks/backbones.py --budget 600      # about 25 minutes on 2 cores

Writes benchmarks/results/backbones.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, run_all, write  # noqa: E402
from omniglot_lake_format import metaphi_bin  # noqa: E402

NAME = "backbones"
MODELS = ("conv4", "resnet12")


def command(model: str, iterations: int, out: str, eval_tasks: int) -> list[str]:
    return [metaphi_bin(), "run", "protonet", "--benchmark", "glyphs", "--model", model, "--iterations",
            str(iterations), "--eval-tasks", str(eval_tasks), "--no-baselines", "--threads", "1", "--quiet",
            "--seed", "0", "--out", out]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds per backbone")
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--work", default=os.path.join("runs", "bench", "backbones"))
    ap.add_argument("--out", default=None, help=f"folder for {NAME}.{{json,md}} (default: benchmarks/results)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    work = os.path.abspath(args.work)
    pilots = [(m, command(m, 10, os.path.join(work, f"pilot-{m}"), 2), os.path.join(work, f"pilot-{m}"))
              for m in MODELS]
    run_all(pilots, 2)
    per_iteration = {m: json.load(open(os.path.join(out, "result.json")))["train_seconds"] / 10
                     for m, _, out in pilots}
    jobs = []
    for m in MODELS:
        iterations = max(1, int(args.budget / per_iteration[m]))
        out = os.path.join(work, m)
        jobs.append((m, command(m, iterations, out, args.eval_tasks), out))
    run_all(jobs, 2)
    rows = []
    for m, cmd, out in jobs:
        r = json.load(open(os.path.join(out, "result.json")))
        rows.append({"model": m, "mean": r["mean"], "ci95": r["ci95"], "iterations": r["iterations"],
                     "train_seconds": r["train_seconds"], "parameters": r["parameters"],
                     "seconds_per_iteration": per_iteration[m], "command": " ".join(cmd[1:])})
    minutes = (time.perf_counter() - started) / 60
    payload = {"machine": machine(), "settings": vars(args), "rows": rows, "wall_minutes": minutes,
               "command": " ".join(sys.argv[1:])}
    lines = ["### Backbones at equal CPU time: ProtoNet on glyphs (`benchmarks/backbones.py`)", "",
             f"Each backbone trained for about {args.budget:.0f} s on one thread, then tested on the same "
             f"{args.eval_tasks} 5-way 1-shot tasks (seed 1234), mean ± 95% CI.", "",
             "| backbone | weights | s per iteration | iterations | train s | accuracy % |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['seconds_per_iteration']:.2f} | "
                     f"{r['iterations']} | {r['train_seconds']:.0f} | {100 * r['mean']:.2f} ± {100 * r['ci95']:.2f} |")
    lines += ["", f"Command: `.venv/bin/python benchmarks/backbones.py {payload['command']}` ({minutes:.0f} minutes "
              "wall clock)"]
    write(NAME, payload, "\n".join(lines), args.out or RESULTS)


if __name__ == "__main__":
    main()
