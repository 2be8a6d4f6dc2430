"""``metaphi compare``: several learners on the same fixed test episodes, side by side.

    metaphi compare protonet matching relation maml ssl-rotation maml@ssl-rotation pretrain \\
        --benchmark glyphs --ways 5 --shots 1 --out runs/compare

Each METHOD is ``[LABEL=]ALGO[@INIT][:key=value,...]``:

* ``ALGO`` an algorithm name (as for ``metaphi run``);
* ``@INIT`` starts its network's body from the body of an earlier method of the same command
  (``maml@ssl-rotation``: MAML from the self-supervised network trained just before) or from a
  checkpoint, ``[ssl:]PATH``;
* ``:key=value,...`` overrides a ``metaphi run`` setting for this method only, with the option's
  name in snake case (``maml:iterations=600,meta_batch=8``, ``protonet:train_ways=20``);
* ``LABEL=`` names the method in the table (default: ``ALGO`` or ``ALGO@INIT``).

Every method is meta-trained with ``metaphi run``'s code and tested on the same tasks: the test
episodes come from the eval seed alone, and the settings that define them (benchmark, ways, test
shots and queries, number of tasks, eval seed) cannot be overridden per method. The folder ``--out``
gets one sub-folder per method (checkpoint and result.json), ``compare.md`` (mean ± 95% CI, test
steps, iterations, wall time, parameters), ``compare.json`` and ``compare.png`` (accuracy with error
bars, and accuracy against inner steps at test).
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field

#: settings that define the test episodes: one value for all methods
SHARED = ("benchmark", "data_root", "download", "within_alphabet", "ways", "eval_shots", "eval_query", "eval_tasks",
          "eval_seed", "device", "quiet", "out")


@dataclass
class Method:
    label: str
    algorithm: str
    init: str | None = None           # a label of an earlier method, or [ssl:]PATH
    options: dict = field(default_factory=dict)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_method(text: str) -> Method:
    """``[LABEL=]ALGO[@INIT][:key=value,...]`` -> Method (see the module's docstring)."""
    from metaphi.config import UsageError

    label = None
    if "=" in text.split(":")[0]:  # options come after the first ":", so an "=" before it names the method
        label, text = text.split("=", 1)
    init = None
    if "@" in text:
        algorithm, rest = text.split("@", 1)
        prefix = "ssl:" if rest.startswith("ssl:") else ""
        init, _, tail = rest[len(prefix):].partition(":")
        init = prefix + init
    else:
        algorithm, _, tail = text.partition(":")
    options = {}
    for item in filter(None, tail.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"method '{text}': options are key=value, got '{item}'")
        options[key.replace("-", "_")] = _value(value)
    if not algorithm:
        raise UsageError(f"method '{text}' names no algorithm")
    return Method(label or (f"{algorithm}@{init}" if init else algorithm), algorithm, init or None, options)


def _run_args(method: Method, shared: dict):
    """A ``metaphi run`` argument namespace for ``method``: run's defaults, the shared settings, then
    the method's own options."""
    from metaphi.config import UsageError
    from metaphi.cli import build_parser

    args = build_parser().parse_args(["run", method.algorithm])
    for key, value in shared.items():
        setattr(args, key, value)
    for key, value in method.options.items():
        if key in SHARED:
            raise UsageError(f"method '{method.label}': {key} is the same for every method (it defines the test "
                             f"tasks); set it with --{key.replace('_', '-')}")
        if not hasattr(args, key) or key in ("algorithm", "func", "command"):
            valid = sorted(k for k in vars(args) if k not in SHARED + ("algorithm", "func", "command"))
            raise UsageError(f"method '{method.label}': unknown setting '{key}' (valid: {', '.join(valid)})")
        setattr(args, key, value)
    args.algorithm = method.algorithm
    return args


def compare(methods: list[str | Method], shared: dict, out_dir: str, progress: bool = False,
            reuse: bool = False, log=print) -> dict:
    """Run every method on ``shared["benchmark"]`` and test all on the same episodes.

    ``shared``: ``metaphi run`` settings by their snake-case name, common to all methods. With
    ``reuse``, a method whose folder already holds a result of the same settings is not run again.
    Returns the summary also written to ``out_dir/compare.json``.
    """
    from metaphi.algorithms import ALGORITHMS
    from metaphi.tasks.registry import build_benchmark
    from metaphi.config import UsageError, writable_dir as _writable_dir
    from metaphi.experiments.fewshot import benchmark_options, resolve_run_settings, train_and_test
    from metaphi.experiments.report import machine, write_json

    methods = [m if isinstance(m, Method) else parse_method(m) for m in methods]
    labels = [m.label for m in methods]
    for i, m in enumerate(methods):
        if m.algorithm not in ALGORITHMS:
            raise UsageError(f"unknown algorithm '{m.algorithm}' in '{m.label}' (valid: {', '.join(ALGORITHMS)})")
        if labels.count(m.label) > 1:
            raise UsageError(f"two methods are labelled '{m.label}'; name them apart with LABEL=ALGO...")
        if m.init and m.init in labels and labels.index(m.init) >= i:
            raise UsageError(f"'{m.label}' starts from '{m.init}', which must come before it")
        if m.init and m.init not in labels and not os.path.isfile(m.init.removeprefix("ssl:")):
            raise UsageError(f"'{m.label}' starts from '{m.init}', which is neither an earlier method nor a checkpoint")
    _writable_dir(out_dir)
    all_args = [_run_args(m, shared) for m in methods]
    first = all_args[0]
    benchmark = build_benchmark(first.benchmark, first.data_root, **benchmark_options(first))
    results, rows = {}, []
    for method, args in zip(methods, all_args):
        s = resolve_run_settings(args, benchmark)
        init = method.init
        if init in results:
            init = results[init]["checkpoint"]
        folder = _writable_dir(os.path.join(out_dir, re.sub(r"[^\w.+@-]", "_", method.label)))
        settings = {"algorithm": method.algorithm, "init": init, "estimator": args.estimator, "seed": args.seed,
                    "optimizer": args.optimizer, **s}
        done = os.path.join(folder, "result.json")
        if reuse and os.path.exists(done):
            previous = json.load(open(done))
            if previous.get("compare_settings") == settings:
                log(f"{method.label}: reusing {done}")
                results[method.label] = previous
                continue
        log(f"{method.label}: training {s['iterations']} iterations")
        result = train_and_test(method.algorithm, benchmark, s, args, folder, args.estimator, progress=progress,
                                init=init, train_ways=args.train_ways)
        result.update(label=method.label, compare_settings=settings)
        write_json(result, done)
        results[method.label] = result
        log(f"{method.label}: {100 * result['mean']:.2f} ± {100 * result['ci95']:.2f} % "
            f"({result['wall_seconds']:.0f} s)")
    s0 = resolve_run_settings(first, benchmark)
    summary = {
        "benchmark": benchmark.name, "ways": s0["ways"], "eval_shots": s0["eval_shots"],
        "eval_query": s0["eval_query"], "eval_tasks": s0["eval_tasks"], "eval_seed": first.eval_seed,
        "metric": benchmark.problem.metric, "machine": machine(), "methods": labels,
        "results": {label: {k: results[label][k] for k in (
            "algorithm", "mean", "ci95", "per_step", "iterations", "wall_seconds", "train_seconds", "test_seconds",
            "parameters", "eval_steps", "inner_steps", "inner_lr", "meta_batch", "meta_lr", "shots", "query",
            "train_ways", "init", "estimator", "seed", "checkpoint") if k in results[label]} for label in labels},
    }
    write_json(summary, os.path.join(out_dir, "compare.json"))
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(markdown_table(summary) + "\n")
    plot(summary, os.path.join(out_dir, "compare.png"))
    return summary


def markdown_table(summary: dict) -> str:
    """The comparison as a Markdown table; accuracies in %, ± the 95% CI half-width."""
    percent = summary["metric"] == "accuracy"
    scale, unit = (100.0, " (%)") if percent else (1.0, "")
    lines = [
        f"{summary['benchmark']}, {summary['ways']}-way {summary['eval_shots']}-shot, {summary['metric']} on the same "
        f"{summary['eval_tasks']} test tasks (eval seed {summary['eval_seed']}, {summary['eval_query']} queries per "
        f"class), mean ± 95% CI; {summary['machine']}.",
        "",
        f"| method | {summary['metric']}{unit} | test steps | train ways | iterations | meta-train s | test s | "
        f"wall s | parameters |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in summary["methods"]:
        r = summary["results"][label]
        steps = len(r["per_step"]) - 1
        lines.append(
            f"| {label} | {r['mean'] * scale:.2f} ± {r['ci95'] * scale:.2f} | {steps if steps else '–'} | "
            f"{r.get('train_ways') or summary['ways']} | {r['iterations']} | {r['train_seconds']:.0f} | "
            f"{r['test_seconds']:.0f} | {r['wall_seconds']:.0f} | {r['parameters']:,} |")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    """Accuracy with 95% error bars per method (left) and against inner steps at test (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.35 * len(summary["methods"]) + 3.5),
                                      gridspec_kw={"width_ratios": [1, 1.2]})
    plot_axes(summary, left, right)
    fig.suptitle(f"{summary['benchmark']} {summary['ways']}-way {summary['eval_shots']}-shot, "
                 f"{summary['eval_tasks']} test tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_axes(summary: dict, left, right) -> None:
    """Draw one comparison on two matplotlib axes (so that several can share a figure)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scale = 100.0 if summary["metric"] == "accuracy" else 1.0
    unit = " (%)" if scale == 100 else ""
    labels = summary["methods"]
    results = [summary["results"][k] for k in labels]
    colors = list(plt.get_cmap("tab10").colors) + ["black", "darkgoldenrod", "navy", "darkgreen", "maroon"]
    y = list(range(len(labels)))[::-1]
    for i, (yi, r) in enumerate(zip(y, results)):
        left.errorbar(r["mean"] * scale, yi, xerr=r["ci95"] * scale, fmt="o", capsize=4, color=colors[i % len(colors)])
    left.set_yticks(y, labels)
    left.set_xlabel(f"{summary['metric']}{unit}, mean ± 95% CI")
    left.grid(axis="x", alpha=0.3)
    most = max(len(r["per_step"]) for r in results)
    for i, (label, r) in enumerate(zip(labels, results)):
        color = colors[i % len(colors)]
        steps = [p["step"] for p in r["per_step"]]
        means = [p["mean"] * scale for p in r["per_step"]]
        cis = [p["ci95"] * scale for p in r["per_step"]]
        if len(steps) == 1:  # no inner loop: the same accuracy at every step
            right.axhline(means[0], color=color, linestyle="--", label=f"{label} (no inner loop)")
            right.axhspan(means[0] - cis[0], means[0] + cis[0], color=color, alpha=0.1)
        else:
            right.errorbar(steps, means, yerr=cis, marker="o", capsize=3, color=color, label=label)
    right.set_xlim(-0.3, max(most - 1, 1) + 0.3)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("inner steps at test")
    right.set_ylabel(f"{summary['metric']}{unit}")
    right.grid(alpha=0.3)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("compare", help="run several methods on the same fixed test tasks; table and plot",
                              description=__doc__.replace("``", ""),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+", metavar="METHOD", help="[LABEL=]ALGO[@INIT][:key=value,...]")
    p.add_argument("--benchmark", default="glyphs")
    p.add_argument("--data-root", default=None)
    p.add_argument("--download", action="store_true", help="download missing archives")
    p.add_argument("--within-alphabet", action="store_true", help="test tasks from one alphabet")
    for name, kind, text in (
            ("ways", int, "classes per test task"), ("train-ways", int, "classes per meta-training task, "
             "for learners that take any number"), ("shots", int, None), ("query", int, None),
            ("eval-shots", int, None), ("eval-query", int, None), ("inner-lr", float, None),
            ("inner-steps", int, None), ("eval-steps", int, None), ("meta-batch", int, None),
            ("meta-lr", float, None), ("iterations", int, None), ("eval-tasks", int, "test tasks (default 600)"),
            ("val-every", int, None), ("val-tasks", int, None)):
        p.add_argument(f"--{name}", type=kind, help=text)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--reuse", action="store_true", help="keep the results of methods already run with the same settings")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    shared = {k: v for k, v in vars(args).items() if k not in ("methods", "func", "command", "reuse")
              and v is not None}
    progress = not args.quiet and sys.stderr.isatty()
    summary = compare(args.methods, shared, args.out, progress=progress, reuse=args.reuse,
                      log=(lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)))
    print(markdown_table(summary))
    print(f"wrote {os.path.join(args.out, 'compare.md')}, compare.json and compare.png")
    return 0
