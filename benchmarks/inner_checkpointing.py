"""Peak memory and time of a second-order MAML meta-gradient against the number of inner steps,
with and without gradient checkpointing of the inner loop.

    .venv/bin/python benchmarks/inner_checkpointing.py [--steps 1 5 10 20 50] [--repeats 3]

Workload: Conv4 (64 filters, 28x28, stride 2), 5-way 5-shot with 15 queries per class, inner step
size 0.1, one task per meta-gradient (the looped estimator holds one task's graph at a time, so a
meta-batch of B takes B times as long and the same memory). Memory is the peak of the bytes held by
tensors created during the meta-gradient (``metaphi.memory.PeakTensorMemory``: the autograd
graph counts, inputs and kernels' scratch do not); time is the median of ``--repeats`` calls.
The float64 agreement of the two is a test (tests/inner/test_checkpoint.py); here the float32
meta-gradients are compared as well and the largest difference is reported.

Writes benchmarks/results/inner_checkpointing.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from speed import load_average, machine  # noqa: E402
from metaphi.memory import PeakTensorMemory  # noqa: E402

from metaphi.algorithms import CLASSIFICATION  # noqa: E402
from metaphi.algorithms.maml import MAML  # noqa: E402
from metaphi.inner import SGD  # noqa: E402
from metaphi.models import Conv4  # noqa: E402
from metaphi.outer import Unrolled  # noqa: E402
from metaphi.tasks import Task  # noqa: E402

HERE = Path(__file__).resolve().parent
WAYS, SHOTS, QUERY, LR = 5, 5, 15, 0.1


def one_task() -> Task:
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(1, WAYS * SHOTS, 1, 28, 28, generator=g)
    xq = torch.rand(1, WAYS * QUERY, 1, 28, 28, generator=g)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).unsqueeze(0)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).unsqueeze(0)
    return Task((xs, ys), (xq, yq))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "inner_checkpointing"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = one_task()
    started, load_before = time.perf_counter(), load_average()
    rows = []
    for steps in args.steps:
        torch.manual_seed(0)
        algo = MAML(Conv4(1, WAYS, 64, 28), CLASSIFICATION, SGD(LR), steps)
        phi = algo.init_meta_params()
        grads = {}
        for checkpoint in (False, True):
            estimator = Unrolled(checkpoint=checkpoint)
            with PeakTensorMemory() as memory:
                grads[checkpoint], _ = estimator(algo, phi, tasks)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                estimator(algo, phi, tasks)
                times.append(time.perf_counter() - t)
            rows.append({"steps": steps, "checkpoint": checkpoint, "peak_bytes": memory.peak,
                         "median_seconds": statistics.median(times), "seconds": times})
            print(f"steps {steps:3d} checkpoint {checkpoint!s:5}: peak {memory.peak / 2**20:8.1f} MB, "
                  f"{statistics.median(times):7.2f} s", flush=True)
        rows[-1]["float32_max_abs_diff"] = max(float((grads[True][k] - grads[False][k]).abs().max()) for k in phi)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": f"{os.path.relpath(sys.executable)} benchmarks/inner_checkpointing.py {command}",
               "machine": machine(torch.device("cpu")), "threads": args.threads, "load_before": load_before,
               "load_after": load_average(), "wall_seconds": time.perf_counter() - started, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["## Checkpointed inner loops: memory and time against inner steps", "",
             f"Command: `{summary['command']}`  ",
             f"Machine: {summary['machine']}, {args.threads} thread(s), shared with other work (load average "
             f"{load_before} before, {summary['load_after']} after); wall time {summary['wall_seconds'] / 60:.1f} min.  ",
             f"Second-order MAML, Conv4-64 on 28x28, {WAYS}-way {SHOTS}-shot, {QUERY} queries per class, step {LR}, "
             "one task per meta-gradient; peak = bytes held by tensors created during the meta-gradient.", "",
             "| inner steps | peak MB plain | peak MB checkpointed | memory ratio | s plain | s checkpointed | "
             "time ratio | max abs diff (float32) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for plain, checked in zip(rows[0::2], rows[1::2]):
        lines.append(f"| {plain['steps']} | {plain['peak_bytes'] / 2**20:.1f} | {checked['peak_bytes'] / 2**20:.1f} | "
                     f"{checked['peak_bytes'] / plain['peak_bytes']:.2f} | {plain['median_seconds']:.2f} | "
                     f"{checked['median_seconds']:.2f} | {checked['median_seconds'] / plain['median_seconds']:.2f} | "
                     f"{checked['float32_max_abs_diff']:.1e} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
