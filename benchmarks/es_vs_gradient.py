"""ES-trained MAML against gradient-trained MAML on sinusoid regression, at equal meta-training wall time.

Both start from the same initialization and see tasks from the same seed. Training runs in short
alternating chunks (gradient, ES, gradient, ...) until each has spent ``--seconds`` of meta-training
time, so both see the same machine load; each chunk resumes from the run's checkpoint, so the ES
estimator's own generator state goes through a checkpoint at every chunk. After every chunk the
validation MSE (fixed validation tasks) is logged; at the end both are tested once on the same 600
test tasks (5-shot, MSE after 1 and 10 inner steps, mean ± 95% CI).

    .venv/bin/python benchmarks/es_vs_gradient.py --seconds 240 --es-meta-lr 0.03

``--pilot`` instead runs the short sweep that chose ES's meta learning rate, σ and population: 150
ES iterations per setting, scored by the query loss (one inner step) on 100 fixed validation tasks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from metaphi.algorithms import create_algorithm  # noqa: E402
from metaphi.tasks.registry import build_benchmark  # noqa: E402
from metaphi.evaluate import evaluate  # noqa: E402
from metaphi.outer import build_estimator  # noqa: E402
from metaphi.train import TrainConfig, meta_train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=300, help="meta-training wall time of each method")
    p.add_argument("--chunk", type=float, default=15, help="seconds per alternating chunk")
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--sigma", type=float, default=0.02)
    p.add_argument("--es-meta-lr", type=float, default=1e-3)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--val-tasks", type=int, default=100)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="benchmarks/results/tmp/es_vs_gradient")
    p.add_argument("--out", default="benchmarks/results/es_vs_gradient.json")
    p.add_argument("--pilot", action="store_true", help="the validation sweep of ES settings, then stop")
    p.add_argument("--diagnose", action="store_true",
                   help="per-task test scores of the final checkpoints in --work: diverged tasks and medians")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.pilot:
        return pilot()
    if args.diagnose:
        return diagnose(args)

    bench = build_benchmark("sinusoid")
    d = bench.defaults
    val_sampler = bench.episodes("val", 1, d["eval_shots"], d["eval_query"])
    test_sampler = bench.episodes("test", 1, d["eval_shots"], d["eval_query"])
    methods = {
        "gradient (second-order)": dict(estimator=build_estimator("second-order"), meta_lr=args.meta_lr),
        f"ES (pop {args.population}, σ {args.sigma})": dict(
            estimator=build_estimator("es", {"population": args.population, "sigma": args.sigma}), meta_lr=args.es_meta_lr),
    }
    runs = {}
    for i, (name, m) in enumerate(methods.items()):
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            algo = create_algorithm("maml", bench, 1, d["inner_lr"], d["inner_steps"], d["eval_steps"])
        runs[name] = dict(m, algo=algo, dir=os.path.join(args.work, f"m{i}"), iterations=0, seconds=0.0,
                          per_iteration=None, curve=[], state=None)
        os.makedirs(runs[name]["dir"], exist_ok=True)
        ck = os.path.join(runs[name]["dir"], "checkpoint.pt")
        if os.path.exists(ck):
            os.remove(ck)
    started = time.perf_counter()
    while any(r["seconds"] < args.seconds for r in runs.values()):
        for name, r in runs.items():
            if r["seconds"] >= args.seconds:
                continue
            left = args.seconds - r["seconds"]
            n = 2 if r["per_iteration"] is None else max(1, int(min(args.chunk, left) / r["per_iteration"]))
            config = TrainConfig(iterations=r["iterations"] + n, meta_batch=args.meta_batch, meta_lr=r["meta_lr"],
                                 seed=args.seed, checkpoint_every=10 ** 9)
            state = meta_train(r["algo"], r["estimator"], r["algo"].training_tasks(bench, 1, d["shots"], d["query"]),
                               config, out_dir=r["dir"], resume=r["iterations"] > 0, progress=False)
            r["state"], r["iterations"], r["seconds"] = state, state.iteration, state.train_seconds
            r["per_iteration"] = state.train_seconds / state.iteration
            val = evaluate(r["algo"], state.phi, val_sampler, args.val_tasks, args.eval_seed + 1)
            r["curve"].append({"iteration": state.iteration, "seconds": round(state.train_seconds, 2),
                               "val_mse": val["mean"]})
            print(f"{name}: {state.iteration} it, {state.train_seconds:.0f} s, val mse {val['mean']:.3f}", flush=True)
    results = []
    for name, r in runs.items():
        test = evaluate(r["algo"], r["state"].phi, test_sampler, args.eval_tasks, args.eval_seed)
        step1 = test["per_step"][1]
        results.append({"method": name, "iterations": r["iterations"], "train_seconds": round(r["seconds"], 1),
                        "seconds_per_iteration": round(r["per_iteration"], 4),
                        "mse_1_step": step1["mean"], "ci95_1_step": step1["ci95"],
                        "mse_10_steps": test["mean"], "ci95_10_steps": test["ci95"],
                        "mse_0_steps": test["per_step"][0]["mean"], "curve": r["curve"]})
    out = {"benchmark": "sinusoid", "shots_train": d["shots"], "eval_shots": d["eval_shots"],
           "eval_query": d["eval_query"], "eval_tasks": args.eval_tasks, "eval_seed": args.eval_seed,
           "seed": args.seed, "meta_batch": args.meta_batch, "seconds_each": args.seconds, "threads": args.threads,
           "population": args.population, "sigma": args.sigma, "es_meta_lr": args.es_meta_lr, "meta_lr": args.meta_lr,
           "wall_seconds": round(time.perf_counter() - started, 1),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}", "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    plot(out, os.path.splitext(args.out)[0] + ".png")
    print(f"{'method':<28} {'it':>6} {'train s':>8} {'MSE 1 step':>16} {'MSE 10 steps':>16}")
    for r in results:
        print(f"{r['method']:<28} {r['iterations']:>6} {r['train_seconds']:>8.0f} "
              f"{r['mse_1_step']:>8.3f} ± {r['ci95_1_step']:.3f} {r['mse_10_steps']:>8.3f} ± {r['ci95_10_steps']:.3f}")


PILOT = [(1e-3, 0.02, 64), (3e-4, 0.02, 64), (1e-2, 0.02, 64), (1e-3, 0.05, 64), (3e-2, 0.02, 64), (1e-2, 0.05, 64),
         (1e-2, 0.02, 32), (1e-2, 0.02, 128), (1e-1, 0.02, 64), (3e-2, 0.02, 32)]


def pilot() -> None:
    from metaphi.inner import FIRST_ORDER
    from metaphi.outer.estimators import _mean_task_loss

    bench = build_benchmark("sinusoid")
    fixed = bench.episodes("val", 1, 10, 10).sample_batch(100, torch.Generator().manual_seed(99))

    def val_loss(algo, phi):
        with torch.no_grad():
            return float(_mean_task_loss(algo, {k: v.detach() for k, v in phi.items()}, fixed, FIRST_ORDER, True)[0])

    torch.manual_seed(0)
    algo = create_algorithm("maml", bench, 1, 0.01, 1, 10)
    print(f"initial φ: validation query loss {val_loss(algo, algo.init_meta_params()):.3f}")
    print("meta_lr sigma population  val loss after 150 ES iterations  seconds")
    for lr, sigma, population in PILOT:
        torch.manual_seed(0)
        algo = create_algorithm("maml", bench, 1, 0.01, 1, 10)
        started = time.perf_counter()
        state = meta_train(algo, build_estimator("es", {"population": population, "sigma": sigma}),
                           algo.training_tasks(bench, 1, 10, 10), TrainConfig(iterations=150, meta_batch=25, meta_lr=lr),
                           progress=False)
        print(f"{lr:<7g} {sigma:<5g} {population:<10d} {val_loss(algo, state.phi):.3f} "
              f"{time.perf_counter() - started:.0f}", flush=True)


def diagnose(args) -> None:
    from metaphi.algorithms import build_algorithm
    from metaphi.evaluate import confidence95, fixed_tasks
    from metaphi.train import load_checkpoint

    bench = build_benchmark("sinusoid")
    d = bench.defaults
    for i in range(2):
        ck = load_checkpoint(os.path.join(args.work, f"m{i}", "checkpoint.pt"))
        algo = build_algorithm(ck["algorithm"])
        tasks = fixed_tasks(bench.episodes("test", 1, d["eval_shots"], d["eval_query"]), args.eval_tasks, args.eval_seed)
        rows = torch.stack([algo.evaluate(ck["phi"], t, d["eval_steps"]) for t in tasks]).double()
        finite = torch.isfinite(rows)
        print(f"m{i} ({ck['iteration']} it): tasks with a non-finite MSE per step {(~finite).sum(0).tolist()}")
        print(f"   median MSE per step {[round(float(x), 3) for x in rows.nanmedian(0).values]}")
        for step in range(rows.shape[1]):
            if finite[:, step].all():
                last = step
        print(f"   last step finite on every task: {last}, mean {float(rows[:, last].mean()):.3f} ± "
              f"{confidence95(rows[:, last]):.3f}")


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in out["results"]:
        ax.plot([c["seconds"] for c in r["curve"]], [c["val_mse"] for c in r["curve"]], marker="o", ms=3,
                label=r["method"])
    ax.set_xlabel("meta-training seconds")
    ax.set_ylabel("validation MSE (5-shot, 10 steps)")
    ax.set_yscale("log")
    ax.set_title("MAML on sinusoid: ES vs gradient at equal wall time", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
