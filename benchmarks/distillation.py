"""Knowledge distillation: student alone, plain KD (Hinton et al. 2015) and a meta-learned teacher
(MetaDistil), over seeds, on glyphs and the Omniglot small1 minimal split as many-class
classification; and teacher accuracy vs the accuracy of the student it teaches.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distillation.py [--workers 4] [--data-root DIR]

Writes benchmarks/results/distillation.{md,json}. The configurations are sized for a loaded
2-core machine (small models, few epochs); each runs in its own process.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, write  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)
CONFIGS = {
    "glyphs-mlp": dict(data="glyphs", pair="mlp", classes=136, teacher_epochs=[1, 3, 10], epochs=5, batch=64,
                       methods=["alone", "kd", "meta", "meta-fo"]),
    "omniglot-mlp": dict(data="omniglot", pair="mlp", classes=None, teacher_epochs=[1, 3, 10], epochs=5, batch=64,
                         methods=["alone", "kd", "meta", "meta-fo"]),
    "glyphs-conv": dict(data="glyphs", pair="conv", classes=40, teacher_epochs=[5, 20], epochs=15, batch=32,
                        methods=["alone", "kd", "meta"]),
    "omniglot-conv": dict(data="omniglot", pair="conv", classes=40, teacher_epochs=[5, 20], epochs=15, batch=32,
                          methods=["alone", "kd", "meta"]),
}


def run_one(name: str, data_root: str | None, teacher_ce_weight: float, checkpoints: str) -> dict:
    import torch
    from metaphi.experiments.distill import DistillConfig, study
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    config = DistillConfig(**CONFIGS[name], seeds=list(SEEDS), data_root=data_root,
                           teacher_ce_weight=teacher_ce_weight, quiet=True)
    result = study(config, os.path.join(checkpoints, f"{name}.pt"), log=lambda *a: None)
    result["wall_s"] = time.perf_counter() - t0
    result["name"] = name
    return result


def collect(name: str, checkpoints: str) -> dict:
    from metaphi.checkpoint import load
    from metaphi.experiments.distill import summarize
    saved = load(os.path.join(checkpoints, f"{name}.pt"))
    rows = saved["rows"]
    return {"config": saved["config"], "rows": rows, "summary": summarize(rows), "name": name,
            "wall_s": sum(r["wall_s"] for r in rows), "partial": True}


def best_teacher_table(result: dict) -> str:
    """Per seed: is the teacher with the best test accuracy the one whose KD student is best?"""
    rows = result["rows"]
    seeds = sorted({r["seed"] for r in rows if r["method"] == "kd"})
    agree, lines = 0, ["| seed | teacher acc by epochs | KD student acc by teacher epochs | best-scoring teacher "
                       "| best teacher (KD) |", "|---|---|---|---|---|"]
    for s in seeds:
        kd = {r["teacher_epochs"]: r for r in rows if r["seed"] == s and r["method"] == "kd"}
        top_t = max(kd, key=lambda e: kd[e]["teacher_acc"])
        top_s = max(kd, key=lambda e: kd[e]["student_acc"])
        agree += top_t == top_s
        lines.append(f"| {s} | " + ", ".join(f"{e}: {100 * kd[e]['teacher_acc']:.1f}" for e in sorted(kd)) + " | "
                     + ", ".join(f"{e}: {100 * kd[e]['student_acc']:.1f}" for e in sorted(kd))
                     + f" | {top_t} | {top_s} |")
    lines.append(f"\nThe best-scoring teacher was also the best teacher in {agree} of {len(seeds)} seeds.")
    return "\n".join(lines)


def main() -> None:
    from metaphi.experiments.distill import markdown
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--data-root", default=os.environ.get("METAPHI_DATA", os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../shared/data/omniglot"))))
    p.add_argument("--teacher-ce-weight", type=float, default=0.0)
    p.add_argument("--checkpoints", default="/tmp/metaphi-distill-bench",
                   help="folder of per-configuration checkpoints; a rerun resumes from them")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: write the report from the runs the checkpoints hold so far")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n]
    info = machine()
    os.makedirs(args.checkpoints, exist_ok=True)
    t0 = time.perf_counter()
    if args.collect:
        results = {n: collect(n, args.checkpoints) for n in names
                   if os.path.exists(os.path.join(args.checkpoints, f"{n}.pt"))}
        names = list(results)
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            futures = {n: pool.submit(run_one, n, args.data_root, args.teacher_ce_weight, args.checkpoints)
                       for n in names}
            results = {n: f.result() for n, f in futures.items()}
    wall = time.perf_counter() - t0
    parts = ["## Knowledge distillation: alone, plain KD, meta-learned teacher", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distillation.py --only {','.join(names)} "
             f"--workers {args.workers} --teacher-ce-weight {args.teacher_ce_weight}`  ",
             f"Machine: {info['cores']} cores ({info['machine']}), load average {info['load_average_at_start']:.0f} "
             f"at start, torch {info['torch']}, 1 thread per worker; {len(names)} configurations in "
             f"{args.workers} processes, total wall time {wall / 60:.1f} min.", ""]
    for n in names:
        r = results[n]
        title = (f"### {n} (collected from checkpoints: {len(r['rows'])} runs; student training wall "
                 f"{r['wall_s'] / 60:.1f} min)" if r.get("partial") else f"### {n} (wall {r['wall_s'] / 60:.1f} min)")
        parts += [title, "", markdown(r), "", best_teacher_table(r), ""]
    write("distillation", {"machine": info, "wall_s": wall, "results": results}, "\n".join(parts))


if __name__ == "__main__":
    main()
