"""Domain generalization on rotated Omniglot: ERM ("Deep-All") against MLDG (second and first order).

    .venv/bin/python benchmarks/domain_generalization.py [--data-root ../shared/data/omniglot]

Ten characters of the Greek alphabet of Omniglot's minimal set small1, each rotated by 0°, 15°, 30°,
45°, 60° and 75° (the Rotated-MNIST protocol: six domains). Every domain is held out in turn; the
network trains on the other five and is scored on the held-out domain's test drawings, which are
never seen in training at any angle. Then its head is fine-tuned on K = 1 and K = 5 labelled
drawings per class of the held-out domain (few-shot adaptation). Five seeds; mean ± 95% CI over
seeds (Student t). Writes benchmarks/results/domain_generalization.md and .json; the runs and
their checkpoints go to runs/domain_generalization/ (run again, finished runs are reused).

Sized for about 15 minutes of CPU time on one core: a 4-block convnet with 16 channels, 300
iterations of 8 images per source domain. MLDG's hyperparameters (α = 0.1, β = 1) are fixed
beforehand, not tuned on the held-out domains.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from metaphi.experiments.report import machine, write_json  # noqa: E402

from metaphi.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
PACS = {"source": "Li et al. 2018 (PACS, AlexNet, leave-one-domain-out)",
        "mldg": {"art": 66.23, "cartoon": 66.88, "photo": 88.00, "sketch": 58.96, "average": 70.01}}


def command(data_root: str, out: str, quick: bool) -> list[str]:
    argv = ["domaingen", "rotated-omniglot", "--data-root", data_root, "--alphabets", "Greek", "--classes", "10",
            "--methods", "erm,mldg,mldg-fo", "--seeds", "0,1,2,3,4", "--iterations", "300", "--batch", "8",
            "--meta-lr", "3e-3", "--inner-lr", "0.1", "--beta", "1", "--hidden", "16", "--blocks", "4",
            "--test-per-class", "6", "--adapt-per-class", "5", "--adapt-shots", "1,5", "--adapt-steps", "30",
            "--adapt-lr", "0.1", "--adapt-draws", "5", "--threads", "1", "--out", out]
    if quick:  # a smoke test of the script, not a result
        argv[argv.index("--seeds") + 1] = "0"
        argv[argv.index("--iterations") + 1] = "5"
        argv += ["--held-out", "0,75"]
    return argv


def compact(runs: list[dict]) -> list[dict]:
    """One row per run: what it was and what it scored (the settings are in the summary)."""
    return [{**{k: r["run"][k] for k in ("method", "held_out", "seed")}, "accuracy": r["accuracy"],
             "adapted": {k: v["mean"] for k, v in r["adapted"].items()}, "final_loss": r["final_loss"],
             "train_seconds": round(r["train_seconds"], 1), "wall_seconds": round(r["wall_seconds"], 1)}
            for r in runs]


def report(summary: dict, argv: list[str], wall: float, cpu: float, quick: bool) -> str:
    from metaphi.experiments.domaingen import markdown

    s = summary["settings"]
    lines = [
        "## Domain generalization: MLDG vs ERM on rotated Omniglot",
        "",
        f"{summary['classes']} characters of Omniglot's Greek alphabet (minimal set small1), each rotated by "
        f"{', '.join(summary['domains'])}: six domains, as in the Rotated-MNIST protocol. Leave-one-domain-out: "
        f"every domain is held out in turn, the network trains on the other five and is scored on the held-out "
        f"domain's {s['data_options']['test_per_class']} test drawings per class; those drawings never appear in "
        f"training at any angle (each class's 20 drawings are split once into "
        f"{20 - s['data_options']['adapt_per_class'] - s['data_options']['test_per_class']} to train on, "
        f"{s['data_options']['adapt_per_class']} to adapt with, {s['data_options']['test_per_class']} to test on). "
        f"Few-shot adaptation fine-tunes the head on K labelled drawings per class of the held-out domain.",
        "",
        f"Network: 4 × (3×3 conv stride 2, {s['hidden']} channels, group norm, ReLU), a linear head; no batch "
        f"statistics, so nothing is adapted to the held-out domain unless labelled examples are given. Both "
        f"methods: {s['iterations']} Adam steps (lr {s['meta_lr']}), each on {s['batch']} images of every "
        f"source domain, the same batches for both. MLDG splits the five sources at every step into four "
        f"meta-train domains and one meta-test domain, virtual SGD step α = {s['inner_lr']}, β = {s['beta']}, "
        f"exact (second-order) gradient for `mldg`, the Hessian term dropped for `mldg-fo`. Hyperparameters "
        f"were fixed beforehand, not tuned on held-out domains. "
        f"Mean ± 95% CI over seeds {summary['seeds']} (Student t, {len(summary['seeds'])} seeds).",
        "",
    ]
    if quick:
        lines += ["**Quick smoke run (1 seed, 5 iterations): not a result.**", ""]
    lines += [markdown(summary), ""]
    mldg = PACS["mldg"]
    lines += [
        "For context, MLDG's published PACS numbers (Li et al. 2018, AlexNet, leave-one-domain-out): "
        f"art {mldg['art']:.2f}, cartoon {mldg['cartoon']:.2f}, photo {mldg['photo']:.2f}, sketch "
        f"{mldg['sketch']:.2f}, average **{mldg['average']:.2f}** %. A different data set, network and scale: "
        "not comparable with the table above, only the protocol is the same.",
        "",
        f"Command: `.venv/bin/python benchmarks/domain_generalization.py`, which runs "
        f"`metaphi {' '.join(argv)}`.",
        f"Machine: {machine()}, one torch thread, shared with other jobs. Wall time {wall / 60:.1f} min, "
        f"CPU time of the process {cpu / 60:.1f} min.",
    ]
    return "\n".join(lines)


def run(argv_in=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../shared/data/omniglot")))
    parser.add_argument("--out", default="runs/domain_generalization")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true", help="a few iterations only, to check the script")
    args = parser.parse_args(argv_in)
    argv = command(args.data_root, args.out, args.quick)
    wall, cpu = time.perf_counter(), time.process_time()
    code = main(argv)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if code:
        return code
    with open(os.path.join(args.out, "results.json")) as f:
        summary = json.load(f)
    stem = "domain_generalization" + ("_quick" if args.quick else "")
    os.makedirs(args.results, exist_ok=True)
    text = report(summary, argv, wall, cpu, args.quick)
    with open(os.path.join(args.results, stem + ".md"), "w") as f:
        f.write(text + "\n")
    write_json({"summary": {k: v for k, v in summary.items() if k != "runs"}, "runs": compact(summary["runs"]),
                "published_pacs": PACS, "command": ["metaphi", *argv], "wall_seconds": wall, "cpu_seconds": cpu,
                "machine": machine()}, os.path.join(args.results, stem + ".json"))
    print(f"wrote {os.path.join(args.results, stem + '.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(run())
