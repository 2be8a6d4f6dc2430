"""Learned data augmentation in a low-data regime: policies searched by the relaxed gradient through a
lookahead step and by REINFORCE, against no augmentation and a random policy; final test accuracy of
a fresh model trained with each policy, over seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/augment.py [--only digits-10,digits-20,glyphs] [--seeds 0,1,...]

Writes benchmarks/results/augment.{md,json}. Every configuration runs in this one process, one
thread; finished runs are kept under --checkpoints and a rerun resumes from them.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, write  # noqa: E402

METHODS = ("none", "random", "start", "gradient", "reinforce")
CONFIGS = {
    # scikit-learn's 8x8 digits, 10 (or 20) training + 10 validation images per class, the rest (~1600) for test
    "digits-10": dict(data="digits", train_per_class=10, val_per_class=10, classes=None, hidden=32,
                      search_steps=300, train_steps=300, seeds=list(range(10))),
    "digits-20": dict(data="digits", train_per_class=20, val_per_class=10, classes=None, hidden=32,
                      search_steps=300, train_steps=300, seeds=list(range(5))),
    # built-in glyphs as 50-way classification (28x28), 5 training + 5 validation images per class, 10 for test
    "glyphs": dict(data="glyphs", train_per_class=5, val_per_class=5, classes=50, hidden=16,
                   search_steps=200, train_steps=300, seeds=list(range(5))),
}


def run_config(name: str, seeds: list[int] | None, checkpoints: str) -> dict:
    import torch
    from metaphi.augment.search import SearchConfig
    from metaphi.experiments.augment import run_experiment
    torch.set_num_threads(1)
    c = CONFIGS[name]
    search = SearchConfig(steps=c["search_steps"])
    t0 = time.perf_counter()
    result = run_experiment(c["data"], METHODS, seeds or c["seeds"], c["train_per_class"], c["val_per_class"], c["classes"],
                            search, c["train_steps"], c["hidden"], out=os.path.join(checkpoints, name),
                            progress=sys.stderr.isatty(), log=lambda *a: None)
    result["wall_s"] = time.perf_counter() - t0
    result["name"] = name
    return result


def main() -> None:
    from metaphi.experiments.augment import markdown
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--seeds", help="comma list of seeds for every configuration (default: each one's own)")
    p.add_argument("--checkpoints", default="/tmp/metaphi-augment-bench",
                   help="folder of per-configuration checkpoints; a rerun resumes from them")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    info = machine()
    t0 = time.perf_counter()
    results = {}
    for n in names:
        results[n] = run_config(n, seeds, args.checkpoints)
    wall = time.perf_counter() - t0
    command = f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/augment.py --only {','.join(names)}" + \
        (f" --seeds {','.join(map(str, seeds))}" if seeds else "")
    parts = ["## Learned data augmentation: gradient and REINFORCE search vs none and a random policy", "",
             f"Command: `{command}`  ",
             f"Machine: {info['cores']} cores ({info['machine']}), load average {info['load_average_at_start']:.1f} "
             f"at start, torch {info['torch']}, 1 thread, one process; "
             f"wall time of this invocation {wall / 60:.1f} min (runs resumed from checkpoints are not rerun; each "
             "configuration's heading gives the search and training time of all its runs).", "",
             "Each seed draws its own stratified split, model initializations and batches; within a seed every "
             "policy trains the same fresh model (Conv4 with task batch norm, SGD with momentum 0.9, step 0.05, "
             "batch 32) from the same initialization on the same batches, so the paired difference to `none` "
             "removes the split-to-split spread. The searches use the training and the validation images; the "
             "final models see only the training images. Search: one policy update (Adam, step 0.05) and one "
             "model step per iteration; the lookahead is one SGD step of 0.05 on a 32-image batch, judged on "
             "100 validation images; relaxed gates at temperature 0.5; REINFORCE with 4 sampled sub-policies "
             "per step and a moving-average baseline. `start` is the policy both searches start from (every "
             "operation with probability 0.2 and magnitude 0.3), unsearched.", ""]
    for n in names:
        r = results[n]
        compute = sum(row["search_s"] + row["train_s"] for row in r["rows"])
        parts += [f"### {n} ({len(r['rows'])} runs, {compute / 60:.1f} min of search and training in all)", "",
                  markdown(r), ""]
    write("augment", {"machine": info, "command": command, "seeds": {n: results[n]["config"]["seeds"] for n in names},
                      "wall_s": wall,
                      "configs": {n: CONFIGS[n] for n in names}, "results": results}, "\n".join(parts))


if __name__ == "__main__":
    main()
