"""``metaphi compare``: several learners on the same fixed test episodes, side by side.

    metaphi compare protonet matching relation maml ssl-rotation maml@ssl-rotation pretrain \\
        --benchmark glyphs --ways 5 --shots 1 --out runs/compare

Each METHOD is ``[LABEL=]ALGO[@INIT][:key=value,...]``:

* ``ALGO`` an algorithm name (as for ``metaphi run``);
* ``@INIT`` starts its network's body from the body of an earlier method of the same command
  (``maml@ssl-rotation``: MAML from the self-supervised network trained just before) or from a
  checkpoint, ``[ssl:]PATH``;
* ``:key=value,...`` overrides a ``metaphi run`` setting for this method only, with the option's
  name in snake case (``maml:iterations=600,meta_batch=8``, ``protonet:train_ways=20``), an option
  of its family or estimator included (``imaml:lam=2``, ``maml:estimator=implicit,solver=neumann``);
* ``LABEL=`` names the method in the table (default: ``ALGO`` or ``ALGO@INIT``).

Every method is meta-trained with ``metaphi run``'s code and tested on the same tasks: the test
episodes come from the eval seed alone, and the settings that define them (benchmark, ways, test
shots and queries, number of tasks, eval seed) cannot be overridden per method. Each method's
settings are a :class:`~metaphi.experiments.fewshot.RunConfig`: the base config (the flags of
``metaphi run`` given here, or ``base:`` in a ``--config`` file) with the method's overrides. The
folder ``--out`` gets one sub-folder per method (checkpoint, result.json and the method's
config.yaml, which ``metaphi run --config`` reruns), ``compare.md`` (mean ± 95% CI, test steps,
iterations, wall time, parameters), ``compare.json``, ``compare.png`` (accuracy with error bars,
and accuracy against inner steps at test) and ``config.yaml`` (the whole comparison).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field

from metaphi.algorithms import ALGORITHMS
from metaphi.config import UsageError, check, fields, from_dict, option, to_dict, writable_dir
from metaphi.experiments.fewshot import RunConfig
from metaphi.experiments.report import machine, save_config, write_json

#: settings that define the test episodes: one value for all methods
SHARED = ("benchmark", "data_root", "download", "within_alphabet", "ways", "eval_shots", "eval_query", "eval_tasks",
          "eval_seed", "device", "quiet", "out")
#: settings of a run that compare decides for each method itself (the algorithm, where it starts, where it writes)
PER_METHOD = ("algorithm", "init", "out", "quiet", "resume", "baselines", "baseline_steps", "threads")


@dataclass
class CompareConfig:
    """``metaphi compare``: ``methods`` meta-trained from ``base`` (a run's config, without the algorithm)
    with their own overrides, all tested on the same episodes."""

    methods: list[str] = option(default_factory=list, help="[LABEL=]ALGO[@INIT][:key=value,...]", positional=True,
                                metavar="METHOD")
    base: RunConfig = option(default_factory=RunConfig, help="the run settings every method starts from (flags: "
                                                             "those of metaphi run)")
    out: str = option("runs/compare", "folder for compare.md, compare.json, compare.png, config.yaml and one "
                                      "sub-folder per method")
    reuse: bool = option(False, "keep the results of methods already run with the same settings")
    quiet: bool = option(False, "no progress output")


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


def method_config(method: Method, base: RunConfig) -> RunConfig:
    """The run config of ``method``: ``base``, then the method's own settings (a run option by its field
    name, or an option of its family or estimator, which goes to that mapping)."""
    from metaphi.experiments.fewshot import option_owners, route_options

    settings, family = {}, {}
    run_fields = {f.name for f in fields(RunConfig)} - {"algorithm_options", "estimator_options"}
    owners = option_owners()
    for key, value in method.options.items():
        if key in SHARED:
            raise UsageError(f"method '{method.label}': {key} is the same for every method (it defines the test "
                             f"tasks); set it with --{key.replace('_', '-')}")
        if key in run_fields and key not in PER_METHOD:
            settings[key] = value
        elif key in owners:
            family[key] = value
        else:
            valid = sorted((run_fields - set(SHARED) - set(PER_METHOD)) | set(owners))
            raise UsageError(f"method '{method.label}': unknown setting '{key}' (valid: {', '.join(valid)})")
    data = {**to_dict(base), **settings, "algorithm": method.algorithm}
    algorithm_options, estimator_options = route_options(family)
    data["algorithm_options"] = {**data["algorithm_options"], **algorithm_options}
    data["estimator_options"] = {**data["estimator_options"], **estimator_options}
    config = from_dict(RunConfig, data, where=f"method '{method.label}'")
    check(config)
    return config


def compare(config: CompareConfig, progress: bool = False, log=print) -> dict:
    """Run every method of ``config`` on ``config.base.benchmark`` and test all on the same episodes.

    With ``config.reuse``, a method whose folder already holds a result of the same settings is not run
    again. Returns the summary also written to ``config.out``/compare.json.
    """
    from metaphi.algorithms.ssl import load_body
    from metaphi.experiments.fewshot import complete, load_benchmark, settings, train_and_test

    if not config.methods:
        raise UsageError("name the methods to compare: metaphi compare METHOD [METHOD ...]")
    for key in PER_METHOD:
        if getattr(config.base, key) != getattr(RunConfig(), key):
            raise UsageError(f"base: {key} is decided per method by compare, not set for all")
    methods = [m if isinstance(m, Method) else parse_method(m) for m in config.methods]
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
        if m.init and m.init not in labels:  # a checkpoint file: read (safely) before anything trains
            load_body(m.init)
    writable_dir(config.out)
    base = dataclasses.replace(config.base, quiet=config.quiet, baselines=False)
    benchmark = load_benchmark(base)
    # every method's settings are checked before the first one trains
    runs = [complete(method_config(m, base), benchmark) for m in methods]
    save_config(config, config.out, "compare")
    results = {}
    for method, run in zip(methods, runs):
        init = method.init
        if init in results:
            init = results[init]["checkpoint"]
        folder = writable_dir(os.path.join(config.out, re.sub(r"[^\w.+@-]", "_", method.label)))
        run = dataclasses.replace(run, init=init, out=folder)
        s = settings(run)
        compared = {"algorithm": method.algorithm, "init": init, "estimator": run.estimator, "seed": run.seed,
                    "optimizer": run.optimizer, **s}
        done = os.path.join(folder, "result.json")
        if config.reuse and os.path.exists(done):
            previous = json.load(open(done))
            if previous.get("compare_settings") == compared:
                log(f"{method.label}: reusing {done}")
                results[method.label] = previous
                continue
        log(f"{method.label}: training {s['iterations']} iterations")
        save_config(run, folder, "run")
        result = train_and_test(run, benchmark, folder, progress=progress)
        result.update(label=method.label, compare_settings=compared)
        write_json(result, done)
        results[method.label] = result
        log(f"{method.label}: {100 * result['mean']:.2f} ± {100 * result['ci95']:.2f} % "
            f"({result['wall_seconds']:.0f} s)")
    first = runs[0]
    summary = {
        "benchmark": benchmark.name, "ways": first.ways, "eval_shots": first.eval_shots,
        "eval_query": first.eval_query, "eval_tasks": first.eval_tasks, "eval_seed": first.eval_seed,
        "metric": benchmark.problem.metric, "machine": machine(), "methods": labels,
        "results": {label: {k: results[label][k] for k in (
            "algorithm", "mean", "ci95", "per_step", "iterations", "wall_seconds", "train_seconds", "test_seconds",
            "parameters", "eval_steps", "inner_steps", "inner_lr", "meta_batch", "meta_lr", "shots", "query",
            "train_ways", "init", "estimator", "seed", "checkpoint") if k in results[label]} for label in labels},
    }
    write_json(summary, os.path.join(config.out, "compare.json"))
    with open(os.path.join(config.out, "compare.md"), "w") as f:
        f.write(markdown_table(summary) + "\n")
    plot(summary, os.path.join(config.out, "compare.png"))
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


def main(config: CompareConfig) -> int:
    """``metaphi compare``: the table to stdout, progress to stderr unless quiet."""
    progress = not config.quiet and sys.stderr.isatty()
    summary = compare(config, progress=progress,
                      log=(lambda *a: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr)))
    print(markdown_table(summary))
    print(f"wrote {os.path.join(config.out, 'compare.md')}, compare.json and compare.png")
    return 0
