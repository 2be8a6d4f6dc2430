"""Architecture search on digits: DARTS (first and second order), REINFORCE, regularized evolution and
random search at the same search budget, each result retrained from scratch; over seeds.

Every searcher gets the same budget in model evaluations (minibatch gradient evaluations of a network:
a DARTS iteration costs 2 (first order) or 5 (second order, finite differences), a black-box candidate
its training steps + 1). Each run is ``metaphi search-arch`` in-process; its result.json is kept under
benchmarks/results/tmp/arch_search/ and reused when the script is run again. The found genotype is
retrained for the same number of steps from the same seed for every searcher, so accuracies are paired
by seed. A side measurement compares DARTS's finite-difference second-order term with the exact one
(autograd) on the search network at its initialization.

    .venv/bin/python benchmarks/arch_search.py            # 5 seeds x 5 searchers, about 30-40 CPU minutes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, write  # noqa: E402

METHODS = ("darts-1", "darts-2", "reinforce", "evolution", "random")


def fd_vs_exact(seeds, channels: int, batches: int = 3) -> dict:
    """Cosine similarity to the exact second-order α gradient of DARTS's finite-difference one (ε = 0.01)
    and of the first-order one, on digits batches at the search network's initialization (float64)."""
    from metaphi.functional import with_prefix
    from metaphi.nas import darts
    from metaphi.nas.child import batch_of, split_data
    from metaphi.nas.space import Network, NetworkConfig, alpha_init, init_params
    from metaphi.outer import build_estimator
    from metaphi.outer.es import derived_seed
    from metaphi.tasks import Task
    from metaphi.tasks.digits import load_digits

    data = split_data(load_digits(), seed=0, dtype=torch.float64)
    config = NetworkConfig(channels=channels)
    net = Network(config)
    rows = []
    for seed in seeds:
        w = init_params(net, torch.Generator().manual_seed(derived_seed(seed, -1)), torch.float64)
        alpha = alpha_init(config, torch.Generator().manual_seed(derived_seed(seed, -2)), dtype=torch.float64)
        for b in range(batches):
            g = torch.Generator().manual_seed(derived_seed(seed, b))
            task = Task.stack([Task(batch_of(data["train"], 64, g), batch_of(data["val"], 64, g))])
            phi = {**with_prefix({k: v.clone().requires_grad_() for k, v in alpha.items()}, "alpha"),
                   **with_prefix(w, "w")}
            xi = darts.DartsSettings().w_lr
            flat = {}
            for name, est, x in (("exact", build_estimator("second-order", {"loop": True}), xi),
                                 ("fd", darts.FiniteDifference(0.01), xi),
                                 ("first", build_estimator("first-order", {"loop": True}), 0.0)):
                grads, _ = est(darts.SearchProblem(net, x), phi, task)
                flat[name] = torch.cat([grads["alpha." + k].flatten() for k in ("normal", "reduce")])
            cos = torch.nn.functional.cosine_similarity
            term = flat["exact"] - flat["first"]
            rows.append({"seed": seed, "batch": b, "cos_fd_exact": float(cos(flat["fd"], flat["exact"], 0)),
                         "cos_first_exact": float(cos(flat["first"], flat["exact"], 0)),
                         "fd_term_error": float((flat["fd"] - flat["exact"]).norm() / term.norm())})
    return {"rows": rows}


def main() -> None:
    from metaphi.cli import main as cli
    from metaphi.evaluate import mean_ci95 as mean_ci

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget", type=int, default=500)
    p.add_argument("--child-steps", type=int, default=24)
    p.add_argument("--retrain-steps", type=int, default=300)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--name", default="arch_search")
    p.add_argument("--work", default=os.path.join(RESULTS, "tmp", "arch_search"))
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    info = machine()
    started = time.perf_counter()
    common = ["--data", "digits", "--budget", str(args.budget), "--child-steps", str(args.child_steps),
              "--retrain-steps", str(args.retrain_steps), "--channels", str(args.channels), "--threads", "1",
              "--quiet"]
    runs = []
    for seed in seeds:
        for method in methods:
            out = os.path.join(args.work, f"b{args.budget}-c{args.child_steps}-r{args.retrain_steps}-"
                                          f"ch{args.channels}", f"{method}-seed{seed}")
            path = os.path.join(out, "result.json")
            if not os.path.exists(path):
                t0 = time.perf_counter()
                resume = ["--resume"] if os.path.exists(os.path.join(out, "checkpoint.pt")) else []
                rc = cli(["search-arch", method, "--seed", str(seed), "--out", out, *common, *resume])
                if rc != 0:
                    raise SystemExit(f"search-arch {method} seed {seed} failed with exit code {rc}")
                print(f"{method} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            with open(path) as f:
                r = json.load(f)
            runs.append({k: r[k] for k in ("method", "seed", "test_acc", "val_acc", "search_seconds", "grad_evals",
                                           "architectures_evaluated", "search_val_acc", "parameters",
                                           "retrain_seconds", "wall_seconds", "genotype_text")})
    diag = fd_vs_exact(seeds, args.channels)
    summary = []
    random_by_seed = {r["seed"]: r["test_acc"] for r in runs if r["method"] == "random"}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        acc, ci = mean_ci([100 * r["test_acc"] for r in rs])
        row = {"method": method, "seeds": len(rs), "test_acc": acc, "test_ci95": ci,
               "val_acc": mean_ci([100 * r["val_acc"] for r in rs])[0],
               "search_seconds": mean_ci([r["search_seconds"] for r in rs])[0],
               "search_seconds_ci95": mean_ci([r["search_seconds"] for r in rs])[1],
               "grad_evals": rs[0]["grad_evals"], "architectures": rs[0]["architectures_evaluated"],
               "parameters": mean_ci([r["parameters"] for r in rs])[0],
               "retrain_seconds": mean_ci([r["retrain_seconds"] for r in rs])[0]}
        if method != "random" and all(r["seed"] in random_by_seed for r in rs):
            row["minus_random"], row["minus_random_ci95"] = mean_ci(
                [100 * (r["test_acc"] - random_by_seed[r["seed"]]) for r in rs])
        summary.append(row)
    wall = time.perf_counter() - started
    command = " ".join(["OMP_NUM_THREADS=1 .venv/bin/python benchmarks/arch_search.py", *sys.argv[1:]])
    runs_wall = sum(r["wall_seconds"] for r in runs)
    lines = [f"**Architecture search on digits** (8x8, 10 classes; stratified split 898 / 450 / 449 train / val / "
             f"test, split seed 0). Search network: 3 cells (normal, reduction, reduction) of 3 nodes, "
             f"{args.channels} channels, 7 operations. Budget {args.budget} model evaluations per search "
             f"(minibatch gradient evaluations, batch 64); black-box candidates trained {args.child_steps} steps each; "
             f"every found genotype retrained from scratch for {args.retrain_steps} steps (momentum SGD, cosine, "
             f"same seed as the search). Test accuracy mean ± 95% t-interval over seeds {args.seeds}.", "",
             "| searcher | test acc % | − random (paired) | search s | model evals | architectures scored | "
             "parameters |", "|---|---|---|---|---|---|---|"]
    for r in summary:
        diff = f"{r['minus_random']:+.2f} ± {r['minus_random_ci95']:.2f}" if "minus_random" in r else "—"
        lines.append(f"| {r['method']} | {r['test_acc']:.2f} ± {r['test_ci95']:.2f} | {diff} | "
                     f"{r['search_seconds']:.0f} ± {r['search_seconds_ci95']:.0f} | {r['grad_evals']} | "
                     f"{r['architectures'] or '— (one, derived)'} | {r['parameters']:.0f} |")
    d = diag["rows"]
    lines += ["", f"DARTS's finite-difference second-order gradient (ε = 0.01) vs the exact one by autograd, on "
              f"{len(d)} digits batches at the search network's initialization (float64): cosine similarity "
              f"{mean_ci([r['cos_fd_exact'] for r in d])[0]:.3f} (first order vs exact: "
              f"{mean_ci([r['cos_first_exact'] for r in d])[0]:.3f}); error of the finite-difference "
              f"second-order term relative to the exact term: {mean_ci([r['fd_term_error'] for r in d])[0]:.2f}.",
              "", f"Command: `{command}`", "",
              f"Machine: {info['machine']}, {info['cores']} cores shared with other jobs (load average "
              f"{info['load_average_at_start']:.1f} at the start of this invocation), torch {info['torch']}, one "
              f"thread. The {len(runs)} runs (search + retraining) took {runs_wall / 60:.1f} min of wall time in "
              f"all; this invocation {wall / 60:.1f} min (finished runs in {os.path.relpath(args.work)} are "
              f"reused)."]
    payload = {"machine": info, "command": command, "seeds": seeds, "methods": methods, "budget": args.budget,
               "child_steps": args.child_steps, "retrain_steps": args.retrain_steps, "channels": args.channels,
               "wall_seconds": wall, "runs_wall_seconds": runs_wall, "summary": summary, "runs": runs, "fd_vs_exact": diag}
    write(args.name, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
