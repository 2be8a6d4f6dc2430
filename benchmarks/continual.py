"""Continual learning: finetune, EWC, replay, La-MAML, OML and its pre-training control on the same streams.

    .venv/bin/python benchmarks/continual.py [--data-root ../shared/data/omniglot] [--quick]

1. Tuning, on a stream of the glyphs *validation* alphabets (``glyphs-val``, seed 100), never on
   the test streams: each method's step size (and EWC's λ, La-MAML's α and its step size) from a
   small grid, by final average accuracy.
2. The benchmark, with the chosen settings, seeds 0-4, on three streams: ``glyphs`` (50 classes of
   the held-out glyph alphabets, 5 new per experience), ``omniglot`` (50 characters of the small2
   alphabets small1 lacks; meta-training on small1; skipped when the archives are missing) and
   ``rotated-glyphs`` (10 classes, 5 experiences at 0°-120°). Every class shows 15 images once and is
   tested on 5 others. The stream of a seed is the same for every method.

Writes benchmarks/results/continual.md, .json and .png; the runs, their checkpoints and the
meta-training runs go to benchmarks/results/tmp/continual/ (run again: finished runs are reused,
unfinished ones resume).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from benchmarks.common import RESULTS, machine  # noqa: E402
from metaphi import checkpoint  # noqa: E402

TMP = os.path.join(RESULTS, "tmp", "continual")
METHODS = ("finetune", "ewc", "replay", "lamaml", "pretrain", "oml")
# Shared by every run: the network, the stream's shape, the meta-training budget.
BASE = ["--hidden", "32", "--blocks", "4", "--batch", "10", "--epochs", "1", "--memory", "100",
        "--meta-iterations", "500", "--meta-batch", "4", "--meta-lr", "3e-3", "--inner-lr", "1.0",
        "--traj-classes", "2", "--traj-shots", "5", "--remember", "16", "--train-per-class", "15",
        "--test-per-class", "5", "--threads", "1", "--quiet"]
GRID = {  # method -> list of flag settings tried on glyphs-val
    "finetune": [["--lr", v] for v in ("0.003", "0.01", "0.03", "0.1")],
    "replay": [["--lr", v] for v in ("0.01", "0.03", "0.1", "0.3")],
    "ewc": [["--ewc-lambda", v] for v in ("1", "3", "10", "100", "1000", "10000")],  # at finetune's chosen lr
    "lamaml": [["--alpha", a, "--alpha-lr", b] for a in ("0.01", "0.03", "0.1", "0.3", "1.0") for b in ("0.1", "0.3")],
    "pretrain": [["--online-lr", v] for v in ("0.01", "0.03", "0.1", "0.3", "1.0")],
    "oml": [["--online-lr", v] for v in ("0.003", "0.01", "0.03", "0.1")],
}
PUBLISHED = ("Published context (class-incremental Omniglot, one pass, meta-training on the 963 background "
             "classes, a 6-conv + 2-fc network; numbers as quoted in this project's REFERENCES.md, "
             "unverified): ANML (Beaulieu et al. 2020) about 63.8% after 600 classes, OML (Javed & White "
             "2019) about 18%.")


def config_for(flags: list[str]):
    """The config of ``metaphi continual`` with BASE and ``flags``; BASE's method options that the run's
    methods do not have are dropped (BASE is shared by every method)."""
    from metaphi.cli import build_parser
    from metaphi.cli.continual import method_flags
    from metaphi.config import resolve
    from metaphi.experiments.continual import ContinualConfig, with_method_options

    args = build_parser().parse_args(["continual", *BASE, *flags])
    return with_method_options(resolve(ContinualConfig, args), method_flags(args), drop_unused=True)


def run(streams, method, seeds, flags, out, data_root):
    from metaphi.experiments.continual import sweep

    extra = ["--data-root", data_root] if data_root else []
    config = config_for(flags + extra + ["--stream", ",".join(streams), "--method", method,
                                         "--seeds", ",".join(map(str, seeds)), "--out", out])
    return sweep(config, log=lambda m: print(m, flush=True), workdir=os.path.join(TMP, "meta"))


def tune(quick: bool) -> dict:
    chosen, trials, seconds = {}, {}, 0.0
    seeds = [100]
    stream_flags = ["--experiences", "3"] if quick else []
    for method in ("finetune", "replay", "ewc", "lamaml", "pretrain", "oml"):
        best, rows = None, []
        for setting in GRID[method][:2] if quick else GRID[method]:
            flags = list(setting) + stream_flags
            if method == "ewc":
                flags += chosen["finetune"]
            tag = "_".join(s.lstrip("-") for s in setting)
            s = run(["glyphs-val"], method, seeds, flags, os.path.join(TMP, "tune", method, tag), None)
            acc = s["streams"]["glyphs-val"]["table"][method]["average_accuracy"]["mean"]
            seconds += s["streams"]["glyphs-val"]["table"][method]["train_seconds"]
            rows.append({"flags": setting, "average_accuracy": acc})
            if best is None or acc > best[0]:
                best = (acc, list(setting))
        chosen[method] = best[1]
        trials[method] = rows
    return {"chosen": chosen, "trials": trials, "stream_seconds": seconds}


def meta_seconds() -> dict:
    """Mean meta-training (or pre-training) seconds per run, by method and meta-training data."""
    out: dict = {}
    folder = os.path.join(TMP, "meta")
    # a run's train_seconds counts its steps only, also across a resumed run
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        ck = os.path.join(folder, name, "checkpoint.pt")
        if os.path.exists(ck):
            c = checkpoint.load(ck)
            key = f"{name.split('-')[0]} ({c['run'].get('meta_train_classes')} classes)"
            out.setdefault(key, []).append(c["train_seconds"])
    return {k: {"runs": len(v), "mean_seconds": sum(v) / len(v)} for k, v in out.items()}


def report(payload: dict) -> str:
    from metaphi.experiments.continual import markdown

    t = payload["tuning"]
    tried = "; ".join(f"{m}: " + ", ".join(f"{' '.join(r['flags'])} → {100 * r['average_accuracy']:.1f}"
                                           for r in t["trials"][m]) for m in t["trials"])
    meta = ", ".join(f"{k}: {v['mean_seconds']:.0f} s × {v['runs']}" for k, v in payload["meta_seconds"].items())
    lines = [
        "## Continual learning: finetune, EWC, replay, La-MAML, OML on class- and domain-incremental streams", "",
        "Each stream shows its experiences one after another, each class's 15 training images once (mini-batches "
        "of 10; OML's and pretrain's heads one image at a time), and tests on 5 held-out images per class of every "
        "experience after each one. One output head for all the stream's classes, no task labels at test. "
        "Network: 4 × (3×3 conv stride 2, 32 channels, ReLU), He-initialized, a linear head; no normalization. "
        "`oml` meta-trains the body (500 Adam steps, 4 trajectories of 2 classes × 5 images each, inner step 1.0 "
        "on the head, second-order) on the meta-training classes, which are disjoint from the stream's (glyph "
        "train alphabets; Omniglot small1), then freezes it and learns a fresh head online. `pretrain` trains the "
        "same body by plain cross-entropy on the same batches, then does the same. `finetune`, `ewc`, `replay` "
        "and `lamaml` start from pretrain's body (`--init pretrain`) and train the whole network; "
        "`finetune-scratch` starts from random weights. Replay and La-MAML keep 100 images (reservoir) and replay "
        "10 with each mini-batch. La-MAML looks ahead one image at a time through the mini-batch (second order), "
        "with meta-gradients and inner gradients rescaled to a norm of at most 2. EWC uses the exact "
        "per-experience Fisher and the proximal step of its penalty.", "",
        f"Chosen on the glyphs-val stream (validation alphabets, seed 100), by final average accuracy: "
        + "; ".join(f"{m} {' '.join(f)}" for m, f in t["chosen"].items()) + f". Tried (final average accuracy %): "
        f"{tried}.", "",
        "Final average accuracy = mean over experiences of the accuracy after the whole stream; backward transfer "
        "= mean of R[T-1, j] − R[j, j]; forgetting (Chaudhry et al. 2018) = mean of max_l R[l, j] − R[T-1, j]; "
        "forward transfer = mean of R[j-1, j] − (accuracy of the untrained learner on j).", "",
        markdown(payload["summary"]),
        "![accuracy over time](continual.png)", "",
        PUBLISHED, "",
        f"Machine: {payload['machine']['machine']}, {payload['machine']['cores']} cores shared with other jobs "
        f"(load {payload['machine']['load_average_at_start']:.1f} at start), torch {payload['machine']['torch']}, "
        f"one thread. Time recorded by the runs (each counted once, also when reused): learning the streams "
        f"(testing excluded) {payload['compute']['stream_minutes']:.1f} min (tuning "
        f"{payload['compute']['tuning_stream_minutes']:.1f} min of it), meta-training and pre-training "
        f"{payload['compute']['meta_minutes']:.1f} min; mean per meta-training run: {meta}. The last invocation of "
        f"the script took {payload['wall_seconds'] / 60:.1f} min of wall time and "
        f"{payload['cpu_seconds'] / 60:.1f} min of CPU time. Seeds {payload['seeds']}.", "",
        f"Command: `{payload['command']}`",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../shared/data/omniglot")))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--quick", action="store_true", help="a smoke test of the script (not a result)")
    a = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    started, cpu = time.perf_counter(), time.process_time()
    info = machine()
    if a.quick:
        global TMP, BASE
        TMP = os.path.join(TMP, "quick")
        BASE = [x if x != "500" else "3" for x in BASE]
        seeds = seeds[:2]
    tuning = tune(a.quick)
    streams = ["glyphs", "rotated-glyphs"]
    if os.path.exists(os.path.join(a.data_root, "images_background_small2.zip")):
        streams.insert(1, "omniglot")
    else:
        print(f"no Omniglot minimal archives in {a.data_root}: the omniglot stream is skipped", flush=True)
    stream_flags = ["--experiences", "3"] if a.quick else []
    summary = {"streams": {}, "seeds": seeds, "init": "pretrain", "methods": list(METHODS) + ["finetune-scratch"]}
    runs = []
    for stream in streams:
        table = {}
        for method in list(METHODS) + ["finetune-scratch"]:
            name = method.replace("-scratch", "")
            flags = tuning["chosen"][name] + stream_flags + (["--init", "scratch"] if method.endswith("scratch") else [])
            if name == "ewc":
                flags += tuning["chosen"]["finetune"]
            s = run([stream], name, seeds, flags, os.path.join(TMP, "main", method), a.data_root)
            table[method] = s["streams"][stream]["table"][name]
            summary["streams"].setdefault(stream, {"stream": s["streams"][stream]["stream"]})
            runs += [{**r, "method": method} for r in s["runs"]]
        summary["streams"][stream]["table"] = table
    metas = meta_seconds()
    compute = {"stream_minutes": (sum(r["train_seconds"] for r in runs) + tuning["stream_seconds"]) / 60,
               "tuning_stream_minutes": tuning["stream_seconds"] / 60,
               "meta_minutes": sum(v["mean_seconds"] * v["runs"] for v in metas.values()) / 60}
    payload = {"name": "continual", "machine": info, "compute": compute, "seeds": seeds, "streams": streams, "tuning": tuning,
               "base_flags": BASE, "summary": summary, "runs": runs, "meta_seconds": metas,
               "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
               "command": " ".join([".venv/bin/python", "benchmarks/continual.py"] + sys.argv[1:]),
               "published": PUBLISHED}
    from metaphi.experiments.continual import plot

    name = "continual-quick" if a.quick else "continual"
    out_dir = os.path.join(TMP, "report") if a.quick else RESULTS
    os.makedirs(out_dir, exist_ok=True)
    plot(summary, os.path.join(out_dir, f"{name}.png"))
    markdown = report(payload)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
