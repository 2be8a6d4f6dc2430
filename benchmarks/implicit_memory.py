"""Peak memory and time of one meta-gradient against the number of inner steps: unrolled vs implicit.

Each configuration runs in a fresh subprocess, and memory is measured two ways:

* torch's allocator: the peak of live tensor memory during one meta-gradient, from the profiler's
  allocation records (``torch.profiler`` with ``profile_memory``);
* the process: after one warm-up meta-gradient (1 inner step) the peak resident set size is reset
  (``/proc/self/clear_refs``); the figure is the new peak (``VmHWM``) over the timed repeats minus the
  resident size at that moment. glibc is told to return freed tensors to the system at once, so an
  earlier peak cannot hide a later one; what it keeps of small blocks still blurs this figure.

Times are without the profiler.

The learner is iMAML's: the Omniglot Conv4 (64 filters, 28×28 inputs, 5 outputs), a 5-way 1-shot
task with 15 queries per class (random images: memory and time do not depend on pixel values),
inner gradient descent with α = 0.1 on the proximal support loss (λ = 2), float32, one thread.

* ``second-order``: backpropagation through all the inner steps (metaphi.outer.Unrolled)
* ``implicit``: the inner steps without a graph, then 5 CG steps on Hessian-vector products
* ``first-order``: for reference, no second derivatives at all

    python benchmarks/implicit_memory.py                      # all configurations, ~5 min on 2 cores
    python benchmarks/implicit_memory.py --steps 1 10 --repeats 2

Results are merged into benchmarks/results/implicit.json (key "memory") and implicit.md is rewritten.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("second-order", "implicit", "first-order")
STEPS = (1, 5, 10, 25, 50, 100)
# glibc keeps freed memory for reuse, which would hide a later, larger peak behind an earlier one:
# a fixed mmap threshold sends every tensor over 64 KiB straight back to the system when freed
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def machine() -> str:
    import platform

    import torch
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu or platform.machine()}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}"


def update(path: str, key: str, value) -> None:
    """Store ``value`` under ``key`` of the results JSON (written by both implicit benchmarks) and
    rewrite the Markdown next to it."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    md = os.path.splitext(path)[0] + ".md"
    with open(md + ".tmp", "w") as f:
        f.write(render(data))
    os.replace(md + ".tmp", md)


PUBLISHED = ("For context, iMAML's published Omniglot accuracies (Rajeswaran et al. 2019, Hessian-free version, Conv4, "
             "the standard Omniglot splits and tens of thousands of meta-iterations): 5-way 1-shot 99.16%, 5-way "
             "5-shot 99.67%, 20-way 1-shot 94.46%, 20-way 5-shot 98.69%; MAML's (Finn et al. 2017): 98.7 / 99.9 / "
             "95.8 / 98.9. The runs here are far smaller (minutes of CPU, a few hundred meta-iterations) and, on "
             "glyphs, on a different data set.")


def render(data: dict) -> str:
    out = ["## Implicit meta-gradients: iMAML, conjugate gradient and Neumann solvers", ""]
    mem = data.get("memory")
    if mem:
        out += ["### Memory and time of one meta-gradient against the number of inner steps", "",
                "One 5-way 1-shot task (15 queries per class), Omniglot Conv4 (64 filters, 28×28, "
                f"{mem['rows'][0]['parameters']:,} parameters), iMAML's proximal inner loss (λ = 2, α = 0.1), float32, "
                f"{mem['threads']} thread, {mem['rows'][0]['repeats']} timed repeats (the fastest is shown). *tensors*: the "
                "peak of live tensor memory in torch's CPU allocator during one meta-gradient (profiler allocation "
                "records); *process*: the peak resident set size of a fresh process over the meta-gradients minus its "
                "size just before them (after a warm-up; see the script). The implicit estimator runs the inner "
                "steps without a graph and then 5 conjugate-gradient steps. The machine was shared with other jobs (load "
                "average 6 to 16 on 2 cores), so the times carry noise of tens of percent; the memory figures do not.",
                ""]
        methods = list(dict.fromkeys(r["method"] for r in mem["rows"]))
        steps = sorted({r["inner_steps"] for r in mem["rows"]})
        by = {(r["method"], r["inner_steps"]): r for r in mem["rows"]}
        head = "| inner steps | " + " | ".join(f"{m}: tensors MiB / process MiB / s" for m in methods) + " |"
        out += [head, "|---:|" + "---:|" * len(methods)]
        for s in steps:
            cells = []
            for m in methods:
                r = by.get((m, s))
                cells.append(f"{r.get('torch_peak_mib', float('nan')):.1f} / {r['extra_mib']:.0f} / {r['seconds']:.2f}" if r else "–")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out += [""]
        so = sorted((r for r in mem["rows"] if r["method"] == "second-order"), key=lambda r: r["inner_steps"])
        im = [r["torch_peak_mib"] for r in mem["rows"] if r["method"] == "implicit" and "torch_peak_mib" in r]
        if len(so) > 1 and im and "torch_peak_mib" in so[0]:
            span = f"{min(im):.1f}" if min(im) == max(im) else f"{min(im):.1f}-{max(im):.1f}"
            slope = (so[-1]["torch_peak_mib"] - so[0]["torch_peak_mib"]) / (so[-1]["inner_steps"] - so[0]["inner_steps"])
            out += [f"Backpropagating through the inner loop holds about {slope:.1f} MiB more tensor memory per inner "
                    f"step; the implicit meta-gradient holds {span} MiB whatever the number of "
                    "steps, as first-order MAML does.", ""]
        out += [f"Command: `{mem['command']}`  ", f"Machine: {mem['machine']}; wall time {mem['wall_seconds']:.0f} s.",
                ""]
    acc = data.get("accuracy")
    if acc:
        out += ["### Accuracy beside MAML (mean ± 95% CI over the test tasks)", "",
                "| benchmark | method | estimator | inner steps (train/test) | α | iterations × tasks | accuracy | "
                "final residual | train s | test s |",
                "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in acc["rows"]:
            residual = f"{r['final_residual']:.2g}" if "final_residual" in r else "–"
            out.append(f"| {r['benchmark']} {r['ways']}w{r['shots']}s | {r['algorithm']} | {r['estimator']} | "
                       f"{r['inner_steps']}/{r['eval_steps']} | {r['inner_lr']:g} | {r['iterations']} × {r['meta_batch']} | "
                       f"{100 * r['mean']:.2f} ± {100 * r['ci95']:.2f}% | {residual} | {r['train_seconds']:.0f} | "
                       f"{r['test_seconds']:.0f} |")
        out += [""]
        for note in acc.get("notes", []):
            out += [note, ""]
        out += ["Commands:", ""] + [f"    {c}" for c in acc["commands"]] + [""]
        out += [f"Machine: {acc['machine']}; wall time {acc['wall_seconds']:.0f} s in all.", ""]
    out += [PUBLISHED, ""]
    return "\n".join(out)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def torch_peak_mib(estimator, algo, phi, task) -> float:
    """The most memory torch's CPU allocator holds at once during one meta-gradient, from the
    profiler's allocation records: each op's own allocations net of its own frees, and the frees
    made outside any op, in time order. (A temporary allocated and freed inside one op is not seen.)"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grads, _ = estimator(algo, phi, task)
        del grads
    changes = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                     for e in prof.events())
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak / 2**20


def worker(method: str, steps: int, repeats: int) -> dict:
    import torch

    from metaphi.algorithms import CLASSIFICATION
    from metaphi.algorithms.imaml import IMAML, IMAMLOptions
    from metaphi.models import Conv4
    from metaphi.outer import build_estimator
    from metaphi.tasks import Task

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Conv4(1, 5, hidden=64, image_size=28)
    make = lambda k: IMAML(model, CLASSIFICATION, inner_lr=0.1, inner_steps=k, options=IMAMLOptions(reg=2.0))
    algo = make(steps)
    phi = algo.init_meta_params()
    g = torch.Generator().manual_seed(0)
    ways, shots, query = 5, 1, 15
    task = Task((torch.rand(1, ways * shots, 1, 28, 28, generator=g), torch.arange(ways).repeat_interleave(shots)[None]),
                (torch.rand(1, ways * query, 1, 28, 28, generator=g), torch.arange(ways).repeat_interleave(query)[None]))
    solver = {"solver": "cg", "solver_steps": 5, "solver_tol": 0.0} if method == "implicit" else {}
    estimator = build_estimator(method, {"loop": True, **solver})
    # one-time costs (kernel selection, thread pools, lazy imports) stay out of both figures
    estimator(make(1), phi, task)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current size
    before = _status_mib("VmRSS")
    seconds, metrics = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        grads, metrics = estimator(algo, phi, task)
        seconds.append(time.perf_counter() - start)
        del grads
    peak = _status_mib("VmHWM")
    return {"method": method, "inner_steps": steps, "peak_rss_mib": round(peak, 1), "base_rss_mib": round(before, 1),
            "extra_mib": round(peak - before, 1), "torch_peak_mib": round(torch_peak_mib(estimator, algo, phi, task), 1),
            "seconds": round(min(seconds), 4), "repeats": repeats,
            "parameters": sum(v.numel() for v in phi.values()),
            **{k: metrics[k] for k in ("residual", "inner_grad_norm") if k in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3, help="timed meta-gradients per configuration (min is kept)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "implicit.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return

    started = time.perf_counter()
    rows = []
    for steps in args.steps:
        for method in args.methods:
            proc = subprocess.run([sys.executable, __file__, "--worker", method, str(steps), "--repeats",
                                   str(args.repeats)], capture_output=True, text=True, cwd=os.path.dirname(HERE),
                                  env={**os.environ, **MALLOC_ENV})
            if proc.returncode != 0:
                raise SystemExit(f"{method} with {steps} steps failed:\n{proc.stderr}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method:>12} {steps:>4} steps: {row['torch_peak_mib']:8.1f} MiB tensors, +{row['extra_mib']:8.1f} MiB process, "
                  f"{row['seconds']:.3f} s", flush=True)

    update(args.out, "memory", {"rows": rows, "machine": machine(), "threads": 1,
                                "command": "python benchmarks/implicit_memory.py " + " ".join(sys.argv[1:]),
                                "wall_seconds": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
