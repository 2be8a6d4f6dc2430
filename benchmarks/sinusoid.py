"""Sinusoid regression as in the MAML paper (Finn et al. 2017, §5.1 and Figure 2).

MAML: MLP 1-40-40-1 (ReLU), K = 10 points per task for meta-training, one inner step with
α = 0.01, meta-batch 25, Adam 1e-3. The "pretrained" baseline trains the same network on all tasks
at once and fine-tunes it on each test task with a step size tuned on validation tasks.
Both are tested on the same 600 fixed tasks with K = 5 (and 10) support points and 100 query points,
MSE after 1, 5 and 10 gradient steps (step size α = 0.01 for MAML, as in training).

    .venv/bin/python benchmarks/sinusoid.py --iterations 20000

writes benchmarks/results/sinusoid.{json,md}. The paper trains 70,000 iterations.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import machine, write
from metaphi.algorithms import create_algorithm
from metaphi.tasks.registry import build_benchmark
from metaphi.evaluate import evaluate
from metaphi.outer import build_estimator
from metaphi.train import TrainConfig, meta_train

PAPER = {"maml": {1: 0.67, 5: 0.38, 10: 0.35}, "pretrain": {1: 2.41, 5: 2.23, 10: 2.19}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--eval-seed", type=int, default=1234)
    args = ap.parse_args()
    bench = build_benchmark("sinusoid")
    rows, payload = [], {"settings": vars(args), "machine": machine(), "paper_5shot": PAPER, "results": {}}
    for name in ("maml", "pretrain"):
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            algo = create_algorithm(name, bench, 1, 0.01, 1, 10)
        sample = algo.training_tasks(bench, 1, 10, 10)
        est = build_estimator("second-order" if name == "maml" else "first-order")
        started = time.perf_counter()
        state = meta_train(algo, est, sample, TrainConfig(iterations=args.iterations, meta_batch=25, seed=args.seed),
                           progress=False)
        train_s = time.perf_counter() - started
        lr = 0.01
        if name == "pretrain":  # its fine-tuning step size, tuned on validation tasks (never the test tasks)
            val = bench.episodes("val", 1, 5, 100)
            scores = {}
            for candidate in (0.001, 0.003, 0.01, 0.02, 0.05, 0.1):
                algo.rule.lr = candidate
                scores[candidate] = evaluate(algo, state.phi, val, 200, seed=args.eval_seed + 1)["mean"]
            lr = min(scores, key=scores.get)
            algo.rule.lr = lr
        for k in (5, 10):
            test = evaluate(algo, state.phi, bench.episodes("test", 1, k, 100), args.eval_tasks, args.eval_seed)
            steps = {s: test["per_step"][s] for s in (0, 1, 5, 10)}
            payload["results"][f"{name}-{k}shot"] = {"per_step": test["per_step"], "train_seconds": train_s,
                                                      "test_seconds": test["seconds"], "step_size": lr}
            rows.append((name, k, lr, steps, train_s))
    md = ["### Sinusoid regression (MAML paper §5.1)", "",
          f"MSE on {args.eval_tasks} fixed test tasks (eval seed {args.eval_seed}), mean ± 95% CI; "
          f"{args.iterations} meta-iterations (the paper: 70,000), seed {args.seed}. "
          f"Machine: {payload['machine']['cores']} cores, torch {payload['machine']['torch']}.", "",
          "| method | K | step size | 0 steps | 1 step | 5 steps | 10 steps | paper 1 / 5 / 10 (K=5) | train s |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, k, lr, steps, train_s in rows:
        cells = " | ".join(f"{steps[s]['mean']:.3f} ± {steps[s]['ci95']:.3f}" for s in (0, 1, 5, 10))
        paper = " / ".join(str(PAPER[name][s]) for s in (1, 5, 10)) if k == 5 else ""
        md.append(f"| {name} | {k} | {lr} | {cells} | {paper} | {train_s:.0f} |")
    md += ["", "Command: `.venv/bin/python benchmarks/sinusoid.py --iterations "
           f"{args.iterations}` (writes benchmarks/results/sinusoid.json)."]
    write("sinusoid", payload, "\n".join(md))


if __name__ == "__main__":
    main()
