"""Metric learners, self-supervised initializations and MAML on the same test tasks, via `metaphi compare`.

Methods: Prototypical Networks (trained with 20-way episodes), Matching Networks, Relation
Networks, MAML, rotation-prediction pre-training then fine-tuning ("ssl-rotation"), MAML started
from that self-supervised body ("maml@ssl-rotation"), SimCLR pre-training then fine-tuning
("ssl-simclr"), and supervised pre-training on all training classes then fine-tuning
("pretrain"). Rows "X+proto" use the pre-trained body of X as it is, as the embedding of a
Prototypical Network (nearest class mean; no fine-tuning, no meta-training). Every method of a
setting is tested on the same 600 fixed test tasks (eval seed 1234).

The budgets are deliberately small (a few CPU minutes per method, see BUDGETS) so the whole table
can be rerun on a laptop; the published numbers are for 60,000 iterations on full Omniglot.
Label-free and supervised pre-training do not depend on the number of ways or shots, so each is
trained once per benchmark (in its 5-way 1-shot setting) and the other settings fine-tune the
same checkpoint (their rows say ``iterations 0`` and name the source).

    .venv/bin/python benchmarks/metric_learners.py glyphs-5w1s glyphs-5w5s [--methods protonet ...]
    .venv/bin/python benchmarks/metric_learners.py --report

Runs go to runs/metric_learners/<setting>/ and are reused when run again with the same settings;
``--report`` writes benchmarks/results/metric_learners.{md,json,png} from the finished ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metaphi.experiments.compare import CompareConfig, compare, markdown_table, parse_method, plot_axes  # noqa: E402
from metaphi.experiments.fewshot import RunConfig  # noqa: E402

from common import RESULTS, machine  # noqa: E402

RUNS = os.path.join("runs", "metric_learners")
OMNIGLOT_ROOT = os.environ.get("OMNIGLOT_ROOT", os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../shared/data/omniglot")))

SETTINGS = {
    "glyphs-5w1s": dict(benchmark="glyphs", ways=5, shots=1),
    "glyphs-5w5s": dict(benchmark="glyphs", ways=5, shots=5),
    "glyphs-20w1s": dict(benchmark="glyphs", ways=20, shots=1),
    "glyphs-20w5s": dict(benchmark="glyphs", ways=20, shots=5),
    "omniglot-small-5w1s": dict(benchmark="omniglot-small", ways=5, shots=1, data_root=OMNIGLOT_ROOT),
    "omniglot-small-5w5s": dict(benchmark="omniglot-small", ways=5, shots=5, data_root=OMNIGLOT_ROOT),
    "omniglot-small-20w1s": dict(benchmark="omniglot-small", ways=20, shots=1, data_root=OMNIGLOT_ROOT),
    "omniglot-small-20w5s": dict(benchmark="omniglot-small", ways=20, shots=5, data_root=OMNIGLOT_ROOT),
}
#: the setting of each benchmark where the way- and shot-free pre-training runs
PRETRAIN_IN = {"glyphs": "glyphs-5w1s", "omniglot-small": "omniglot-small-5w1s"}

# Shared by every setting: 5 query images per class in training, 15 at test, 600 test tasks,
# Adam at 1e-3, one validation at the end of training.
COMMON = dict(query=5, eval_query=15, eval_tasks=600, meta_lr=1e-3, val_every=100000, val_tasks=100, seed=0,
              eval_seed=1234)
_MAML = dict(inner_lr=0.4, inner_steps=1, eval_steps=3)  # MAML's Omniglot inner loop: 1 step of 0.4, 3 at test
BUDGETS = {
    "glyphs": {
        # 5-way episodes, 16 per meta-batch (4 at 20 ways: the same images per step)
        "episodic": dict(iterations=200, meta_batch=16),
        "maml": _MAML,
        # 64 label-free images (×4 rotations, or ×2 augmented views) per step; fine-tuned at test
        # like the pretrain baseline
        "ssl-rotation": dict(iterations=600, meta_batch=1, inner_lr=0.4, eval_steps=5),
        "ssl-simclr": dict(iterations=600, meta_batch=1, inner_lr=0.4, eval_steps=5),
        # 64 labelled images per step, a head over all training classes
        "pretrain": dict(iterations=1500, meta_batch=1, inner_lr=0.4, eval_steps=5),
    },
    # the backbone is twice as wide (64 channels, about 4x the work per image) and there are only
    # 2,200 training images, so fewer tasks per step and fewer pre-training steps
    "omniglot-small": {
        "episodic": dict(iterations=200, meta_batch=8),
        "maml": _MAML,
        "ssl-rotation": dict(iterations=300, meta_batch=1, inner_lr=0.4, eval_steps=5),
        "ssl-simclr": dict(iterations=300, meta_batch=1, inner_lr=0.4, eval_steps=5),
        "pretrain": dict(iterations=600, meta_batch=1, inner_lr=0.4, eval_steps=5),
    },
}
#: ProtoNets train with more ways than they test (Snell et al.): 20-way episodes, with as many
#: images per step as the others' (fewer tasks per meta-batch)
PROTONET_TRAIN_WAYS = 20
ORDER = ("protonet", "matching", "relation", "maml", "ssl-rotation", "maml@ssl-rotation", "ssl-simclr", "pretrain",
         "ssl-rotation+proto", "ssl-simclr+proto", "pretrain+proto")
# Full Omniglot, Conv4, from the papers (see ../shared/REFERENCES.md); Relation Net's figures unverified there.
PUBLISHED = {
    "protonet": ("Snell et al. 2017", [98.8, 99.7, 96.0, 98.9]),
    "matching": ("Vinyals et al. 2016", [98.1, 98.9, 93.8, 98.5]),
    "relation": ("Sung et al. 2018 (unverified)", [99.6, 99.8, 97.6, 99.1]),
    "maml": ("Finn et al. 2017", [98.7, 99.9, 95.8, 98.9]),
}
#: trained once per benchmark, fine-tuned in every setting
PRETRAINED = ("ssl-rotation", "ssl-simclr", "pretrain")


def options(items: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in items.items())


def methods_for(setting: str) -> list[str]:
    """The ``metaphi compare`` method specifications of one setting."""
    spec = SETTINGS[setting]
    budget = BUDGETS[spec["benchmark"]]
    five_way_batch = budget["episodic"]["meta_batch"]
    episodic = dict(budget["episodic"], meta_batch=five_way_batch * 5 // spec["ways"])
    source = PRETRAIN_IN[spec["benchmark"]]
    shared_ck = {name: os.path.join(RUNS, source, name, "checkpoint.pt") for name in PRETRAINED}
    train_ways = max(PROTONET_TRAIN_WAYS, spec["ways"])
    protonet = {**episodic, "meta_batch": max(1, five_way_batch * 5 // train_ways), "train_ways": train_ways}
    out = {
        "protonet": f"protonet:{options(protonet)}",
        "matching": f"matching:{options(episodic)}",
        "relation": f"relation:{options(episodic)}",
        "maml": f"maml:{options({**episodic, **budget['maml']})}",
    }
    if setting == source:
        out["ssl-rotation"] = f"ssl-rotation:{options(budget['ssl-rotation'])}"
        out["maml@ssl-rotation"] = f"maml@ssl-rotation:{options({**episodic, **budget['maml']})}"
        out["ssl-simclr"] = f"ssl-simclr:{options(budget['ssl-simclr'])}"
        out["pretrain"] = f"pretrain:{options(budget['pretrain'])}"
    else:
        for name in PRETRAINED:
            out[name] = f"{name}={name}@{shared_ck[name]}:{options({**budget[name], 'iterations': 0})}"
        out["maml@ssl-rotation"] = (f"maml@ssl-rotation=maml@{shared_ck['ssl-rotation']}:"
                                    f"{options({**episodic, **budget['maml']})}")
    # the pre-trained bodies used as they are, as a Prototypical Network's embedding (no training):
    # what the features are worth without the fine-tuning's few noisy steps
    for name in PRETRAINED:
        source_ref = name if setting == source else shared_ck[name]
        out[f"{name}+proto"] = f"{name}+proto=protonet@{source_ref}:iterations=0"
    return [out[name] for name in ORDER]


def shared_settings(setting: str) -> dict:
    spec = SETTINGS[setting]
    return {**COMMON, **{k: v for k, v in spec.items() if k != "shots"}, "shots": spec["shots"],
            "eval_shots": spec["shots"]}


def run(setting: str, only: list[str] | None) -> dict:
    methods = methods_for(setting)
    if only:
        parsed = {parse_method(m).label: parse_method(m) for m in methods}
        wanted = set(only) | {parsed[name].init for name in only if parsed[name].init in parsed}
        methods = [m for m in methods if parse_method(m).label in wanted]
    started = time.perf_counter()
    summary = compare(CompareConfig(methods, RunConfig(**shared_settings(setting)), os.path.join(RUNS, setting),
                                    reuse=True), log=lambda msg: print(f"[{setting}] {msg}", flush=True))
    print(f"[{setting}] {time.perf_counter() - started:.0f} s", flush=True)
    return summary


def finished(setting: str) -> bool:
    return all(os.path.exists(os.path.join(RUNS, setting, parse_method(m).label, "result.json"))
               for m in methods_for(setting))


def report(machine_info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in SETTINGS if finished(s)]
    summaries = {s: compare(CompareConfig(methods_for(s), RunConfig(**shared_settings(s)), os.path.join(RUNS, s),
                                          reuse=True), log=lambda msg: None) for s in done}
    # iterations and wall time of a reused pre-training are its source run's
    for s, summary in summaries.items():
        source = PRETRAIN_IN[SETTINGS[s]["benchmark"]]
        for name in PRETRAINED:
            if s != source and source in summaries:
                r, src = summary["results"][name], summaries[source]["results"][name]
                r["pretrained_in"] = source
                r["pretrain_iterations"], r["pretrain_seconds"] = src["iterations"], src["train_seconds"]

    lines = ["## Metric learners, self-supervised initializations and MAML", "",
             "Accuracy (%) on 600 fixed test tasks per setting (eval seed 1234, 15 queries per class), "
             "mean ± 95% CI; every method of a column is tested on the same tasks. "
             f"Machine: {machine_info['machine']}, {machine_info['cores']} cores shared with other jobs "
             f"(load average {machine_info['load_average_at_start']:.0f} at the start), torch "
             f"{machine_info['torch']}, {machine_info['threads']} thread.", ""]
    header = "| method | " + " | ".join(done) + " | published, full Omniglot (5w1s / 5w5s / 20w1s / 20w5s) |"
    lines += [header, "|---" * (len(done) + 2) + "|"]
    for name in ORDER:
        cells = []
        for s in done:
            r = summaries[s]["results"][name]
            cells.append(f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}")
        paper = PUBLISHED.get(name)
        anchor = f"{' / '.join(f'{v:.1f}' for v in paper[1])} ({paper[0]})" if paper else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {anchor} |")
    lines += ["", "Budgets (per method and setting; a few CPU minutes each, against the papers' 60,000 "
              "iterations): " + " ".join(
                  f"{b}: " + "; ".join(f"{k}: {options(v)}" for k, v in BUDGETS[b].items()) + "."
                  for b in BUDGETS) +
              f" ProtoNets train on {PROTONET_TRAIN_WAYS}-way episodes with as many images per step "
              f"(fewer tasks per meta-batch); 20-way settings use a quarter of the 5-way meta-batch. "
              f"Shared: {options(COMMON)}.", ""]
    for s in done:
        lines += [f"### {s}", "", markdown_table(summaries[s]), ""]
        notes = [f"{n} fine-tunes the network pre-trained in {summaries[s]['results'][n]['pretrained_in']} "
                 f"({summaries[s]['results'][n]['pretrain_iterations']} iterations, "
                 f"{summaries[s]['results'][n]['pretrain_seconds']:.0f} s)"
                 for n in PRETRAINED if "pretrained_in" in summaries[s]["results"][n]]
        if notes:
            lines += ["Reused pre-training: " + "; ".join(notes) + ".", ""]
    lines += ["![accuracy with 95% CI, and against inner steps at test](metric_learners.png)", "",
              "Commands (each setting's runs are reused when present):", "", "```",
              f".venv/bin/python benchmarks/metric_learners.py {' '.join(done)}",
              ".venv/bin/python benchmarks/metric_learners.py --report", "```"]
    markdown = "\n".join(lines)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "metric_learners.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(RESULTS, "metric_learners.json"), "w") as f:
        json.dump({"machine": machine_info, "budgets": BUDGETS, "common": COMMON, "settings": summaries}, f, indent=2)
        f.write("\n")
    fig, axes = plt.subplots(len(done), 2, figsize=(15, 3.8 * len(done)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.2]})
    for (left, right), s in zip(axes, done):
        plot_axes(summaries[s], left, right)
        left.set_title(s, fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "metric_learners.png"), dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(markdown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", nargs="*", metavar="SETTING", help=f"any of {', '.join(SETTINGS)}")
    ap.add_argument("--methods", nargs="+", choices=ORDER, help="only these methods (default: all)")
    ap.add_argument("--report", action="store_true", help="write the results files from the finished runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a busy machine)")
    args = ap.parse_args()
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {', '.join(unknown)} (valid: {', '.join(SETTINGS)})")
    torch.set_num_threads(args.threads)
    info = machine()
    for setting in args.settings:
        run(setting, args.methods)
    if args.report:
        report(info)


if __name__ == "__main__":
    main()
