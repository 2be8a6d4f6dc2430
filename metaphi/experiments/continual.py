"""``metaphi continual``: lifelong learning on a stream of experiences, methods side by side over seeds.

    metaphi continual --method finetune,ewc,replay,oml,lamaml --stream glyphs --seeds 0,1,2,3,4 --out runs/continual

For every stream, seed and method, the method learns the stream's experiences one after another,
one pass over each, and is tested on every experience after each one (the accuracy matrix R of
``metaphi.continual.metrics``). The stream of a seed (which classes, their order, which images are
shown and held out) is the same for every method. Each run has a checkpoint after every experience
in ``--out/<stream>/<method>/seed-<n>/``, so a killed command run again resumes where it stopped and
reuses finished runs (``--fresh`` starts over); meta-training (OML's representation, the
pre-trained body) is kept in ``--out/meta/`` and shared by the streams over the same classes.

Streams (``--stream``, a comma list): ``glyphs`` (built in, class-incremental over held-out
alphabets), ``glyphs-val`` (the same over the validation alphabets, for tuning), ``omniglot``
(class-incremental over the alphabets of Omniglot's small2 set that small1 lacks; meta-training on
small1; needs the two archives under ``--data-root``), ``rotated-glyphs``, ``permuted-glyphs``
(domain-incremental) and ``folder:PATH`` (``PATH/<experience>/<class>/<image>``).

``--init pretrain`` (default) starts the methods that train the whole network (finetune, ewc,
replay, lamaml) from the body that ``pretrain`` learns on the meta-training classes, so every method
starts with the same data behind it; ``--init scratch`` starts them from random weights.

Each method's options are declared beside it (``Method.Options`` in ``metaphi.continual``) and are
flags of this command; a flag of a method that the run does not use is refused. The resolved
options of every method in use are ``method_options`` of the config (``--out/config.yaml``).

``--out`` gets ``results.json`` (every run's R and the summary), ``results.md`` (final average
accuracy, backward transfer, forgetting and forward transfer, mean ± 95% CI over seeds, Student t),
``accuracy.png`` (accuracy on all experiences seen so far after each experience) and ``config.yaml``
(``metaphi continual --config OUT/config.yaml --out NEW`` runs the same study again).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass

from metaphi.config import UsageError, check, fields, flag_of, from_dict, option, to_dict
from metaphi.continual import METHODS, build_method, options_class

#: the methods that train the whole network (and start from ``--init``'s body)
WHOLE_NETWORK = ("finetune", "ewc", "replay", "lamaml")
METRICS = ("average_accuracy", "backward_transfer", "forgetting", "forward_transfer")


@dataclass
class ContinualConfig:
    method: list[str] = option(default_factory=lambda: list(METHODS),
                               help=f"comma list of {', '.join(METHODS)} (default: all)")
    stream: list[str] = option(default_factory=lambda: ["glyphs"],
                               help="comma list of glyphs (built in), glyphs-val, omniglot, rotated-glyphs, "
                                    "permuted-glyphs, folder:PATH")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2, 3, 4], help="comma list of seeds")
    out: str = option("runs/continual", "folder for results.json, results.md, accuracy.png, config.yaml and the runs")
    init: str = option("pretrain", "start of finetune/ewc/replay/lamaml: the pre-trained body or random weights",
                       choices=("pretrain", "scratch"))
    # the stream
    experiences: int | None = option(None, "experiences (none: 10 class-incremental, 5 domain-incremental)",
                                     check="positive")
    classes_per_experience: int = option(5, "class-incremental: new classes each", check="positive")
    classes: int = option(10, "rotated/permuted: classes in every experience", check="positive")
    angles: list[float] = option(default_factory=lambda: [0.0, 30.0, 60.0, 90.0, 120.0],
                                 help="rotated-glyphs: the angles, one per experience")
    train_per_class: int = option(15, "images per class shown once", check="positive")
    test_per_class: int = option(5, "held-out test images per class", check="positive")
    data_root: str | None = option(None, "folder with the Omniglot archives (none: $METAPHI_DATA or "
                                         "~/.cache/metaphi/data)")
    image_size: int = option(28, "folder:PATH: resize to this size", check="positive")
    channels: int = option(1, "folder:PATH: 1 (grey) or 3 (RGB)", choices=(1, 3))
    invert: bool = option(False, "folder:PATH: dark ink on light paper becomes high")
    # the network
    hidden: int = option(32, "channels of the convnet", check="positive")
    blocks: int = option(4, "stride-2 conv blocks", check="positive")
    fresh: bool = option(False, "rerun runs already in --out instead of reusing/resuming")
    threads: int | None = option(None, "torch CPU threads (1 is fastest for these small networks)", check="positive")
    quiet: bool = option(False, "no progress")
    method_options: dict = option(default_factory=dict, cli=False,
                                  help="method -> its options (the fields of its Options dataclass); the methods' "
                                       "flags set them")


# -- the options of the methods ------------------------------------------------------------------------

def options_in_use(config: ContinualConfig) -> dict[str, type]:
    """The options class of every method the run builds: the methods, and ``pretrain``'s meta-training
    options when its body is where the whole-network methods start (``init: pretrain``)."""
    from metaphi.continual.oml import BodyOptions

    check_methods(config)
    classes = {m: options_class(m) for m in config.method}
    if config.init == "pretrain" and set(config.method) & set(WHOLE_NETWORK) and "pretrain" not in classes:
        classes["pretrain"] = BodyOptions
    return classes


def check_methods(config: ContinualConfig) -> None:
    bad = [m for m in config.method if m not in METHODS]
    if not config.method or bad:
        raise UsageError(f"--method: unknown method '{bad[0] if bad else ''}' (valid: {', '.join(METHODS)})")


def owners(name: str) -> list[str]:
    """The methods that have an option called ``name``."""
    return [m for m in METHODS if any(f.name == name for f in fields(options_class(m)))]


def with_method_options(config: ContinualConfig, flags: dict | None = None, drop_unused: bool = False
                        ) -> ContinualConfig:
    """``config`` with ``method_options`` resolved to each method's options dataclass: its defaults <
    its mapping in ``config.method_options`` (from a config file) < ``flags`` (method options given on
    the command line, by field name). A flag or a mapping for a method the run does not use is a
    UsageError naming it, unless ``drop_unused`` (for scripts that share one set of flags among runs)."""
    classes = options_in_use(config)
    given = config.method_options or {}
    if not isinstance(given, dict):
        raise UsageError(f"method_options must be a mapping from a method to its options, got {given!r}")
    flags = dict(flags or {})
    unused = [m for m in given if m not in classes]
    if unused and not drop_unused:
        raise UsageError(f"method_options: {unused[0]} is not used by this run (--method {','.join(config.method)}, "
                         f"--init {config.init}); remove its options or run it")
    for name in flags:
        if not any(name in {f.name for f in fields(cls)} for cls in classes.values()) and not drop_unused:
            flag = next(flag_of(f) for m in owners(name) for f in fields(options_class(m)) if f.name == name)
            raise UsageError(f"{flag} applies to {', '.join(owners(name))}, which this run does not use "
                             f"(--method {','.join(config.method)}, --init {config.init})")
    resolved = {}
    for m, cls in classes.items():
        own = given.get(m) or {}
        own = to_dict(own) if dataclasses.is_dataclass(own) else own
        if not isinstance(own, dict):
            raise UsageError(f"method_options: {m} must be a mapping of its options, got {own!r}")
        names = {f.name for f in fields(cls)}
        options = from_dict(cls, {**own, **{k: v for k, v in flags.items() if k in names}},
                            where=f"method_options: {m}")
        check(options)
        resolved[m] = options
    return dataclasses.replace(config, method_options=resolved)


def _validate(config: ContinualConfig) -> None:
    check_methods(config)
    if not config.seeds:
        raise UsageError("--seeds: give at least one seed")
    if not config.stream:
        raise UsageError("--stream: give at least one stream")


# -- the study ------------------------------------------------------------------------------------------

def main(config: ContinualConfig) -> int:
    run(config)
    return 0


def run(config: ContinualConfig) -> dict:
    """Every (stream, seed, method) run of ``config``; writes config.yaml, results.json, results.md and
    accuracy.png into ``config.out`` and returns the summary."""
    from metaphi.config import writable_dir
    from metaphi.experiments.report import save_config

    config = with_method_options(config)
    _validate(config)
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    writable_dir(config.out)
    save_config(config, config.out, "continual")
    log = (lambda *a: None) if config.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    summary = sweep(config, log=log)
    print(markdown(summary))
    print(f"wrote {os.path.join(config.out, 'results.md')}, results.json, accuracy.png and config.yaml")
    return summary


def sweep(config: ContinualConfig, log=print, workdir: str | None = None) -> dict:
    """Every (stream, seed, method) run; writes and returns the summary. Meta-training runs are kept in
    ``workdir`` (default ``config.out/meta``)."""
    from metaphi.continual.oml import Pretrain
    from metaphi.continual.runner import SettingsMismatch, run_stream
    from metaphi.experiments.report import machine, write_json
    from metaphi.tasks.registry import build_stream

    config = with_method_options(config)
    _validate(config)
    streams, methods, seeds, out_dir, options = (config.stream, config.method, config.seeds, config.out,
                                                 config.method_options)
    progress = not config.quiet and sys.stderr.isatty()
    workdir = workdir or os.path.join(out_dir, "meta")
    init = Pretrain(**to_dict(options["pretrain"])) if "pretrain" in options and config.init == "pretrain" else None
    stream_options = {"experiences": config.experiences, "classes_per_experience": config.classes_per_experience,
                      "classes": config.classes, "train_per_class": config.train_per_class,
                      "test_per_class": config.test_per_class, "angles": config.angles,
                      "data_root": config.data_root, "image_size": config.image_size, "channels": config.channels,
                      "invert": config.invert}
    summary = {"streams": {}, "methods": methods, "seeds": seeds, "init": config.init, "machine": machine(),
               "net": {"hidden": config.hidden, "blocks": config.blocks},
               "methods_options": {m: to_dict(options[m]) for m in methods}}
    started, n, total = time.perf_counter(), 0, len(streams) * len(seeds) * len(methods)
    all_results = []
    for stream_name in streams:
        results = []
        for seed in seeds:
            stream = build_stream(stream_name, seed=seed, **stream_options)
            if stream.meta_train is None:
                needs = [m for m in methods if m in ("oml", "pretrain")] + (
                    ["--init pretrain"] if init is not None and set(methods) & set(WHOLE_NETWORK) else [])
                if needs:
                    raise UsageError(f"stream {stream_name} has no meta-training classes, which "
                                     f"{', '.join(needs)} need; use --init scratch and methods "
                                     f"{', '.join(WHOLE_NETWORK)}")
            for m in methods:
                n += 1
                method = build_method(m, **to_dict(options[m]))
                folder = os.path.join(out_dir, stream_name.replace(":", "_").replace("/", "_"), m, f"seed-{seed}")
                if config.fresh:
                    for f in ("checkpoint.pt", "result.json"):
                        if os.path.exists(os.path.join(folder, f)):
                            os.unlink(os.path.join(folder, f))
                try:
                    r = run_stream(method, stream, seed, folder, hidden=config.hidden, blocks=config.blocks,
                                   workdir=workdir, progress=progress,
                                   init=init if m in WHOLE_NETWORK else None)
                except SettingsMismatch as e:
                    raise UsageError(str(e)) from None
                results.append(r)
                took = "reused" if r.get("reused") else f"{r['train_seconds']:.1f} s"
                log(f"[{n}/{total}] {stream_name} seed {seed} {m:<9} average accuracy "
                    f"{100 * r['average_accuracy']:.1f}%, forgetting {100 * r['forgetting']:.1f} "
                    f"({took}; {time.perf_counter() - started:.0f} s in all)")
        summary["streams"][stream_name] = {"stream": {k: v for k, v in results[0]["settings"]["stream"].items()
                                                      if k != "seed"},
                                           "table": summarize(results, methods)}
        all_results += results
    summary["wall_seconds"] = time.perf_counter() - started
    summary["runs"] = [{k: r[k] for k in ("stream", "method", "seed", "R", "initial", "average_accuracy",
                                          "backward_transfer", "forgetting", "forward_transfer",
                                          "accuracy_over_time", "train_seconds", "start_seconds")}
                       for r in all_results]
    write_json(summary, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(summary) + "\n")
    plot(summary, os.path.join(out_dir, "accuracy.png"))
    return summary


# -- the report -----------------------------------------------------------------------------------------

def summarize(results: list[dict], methods: list[str]) -> dict:
    """Per method: mean ± 95% CI over seeds (Student t) of each metric and of accuracy over time."""
    from metaphi.evaluate import mean_ci95
    from metaphi.experiments.report import over_seeds

    finished = [r for r in results if r.get("finished")]
    table = {}
    for entry in over_seeds([r for r in finished if r["method"] in methods], ["method"], METRICS, order=methods):
        rows = [r for r in finished if r["method"] == entry["method"]]
        curves = [r["accuracy_over_time"] for r in rows]
        table[entry["method"]] = {
            "seeds": sorted(r["seed"] for r in rows),
            **{k: {"mean": entry[k], "ci95": entry[f"{k}_ci"]} for k in METRICS},
            "accuracy_over_time": [dict(zip(("mean", "ci95"), mean_ci95([c[i] for c in curves])))
                                   for i in range(len(curves[0]))],
            "train_seconds": sum(r["train_seconds"] for r in rows)}
    return table


def _cell(x: dict) -> str:
    from metaphi.experiments.report import pm

    return pm(x["mean"], None if math.isnan(x["ci95"]) else x["ci95"], digits=1)


def markdown(summary: dict) -> str:
    from metaphi.experiments.report import markdown_table

    lines = []
    for stream, entry in summary["streams"].items():
        d = entry["stream"]
        shape = (f"{d['experiences']} experiences, {d['classes']} classes"
                 + (f" ({d['classes_per_experience']} new per experience)" if "classes_per_experience" in d else "")
                 + (f", {d['train_per_class']} training images per class shown once" if "train_per_class" in d else ""))
        rows = [[m if m not in WHOLE_NETWORK else f"{m} ({summary['init']})", _cell(e["average_accuracy"]),
                 _cell(e["backward_transfer"]), _cell(e["forgetting"]), _cell(e["forward_transfer"]),
                 f"{e['train_seconds']:.0f}"] for m, e in entry["table"].items()]
        lines += [f"**{stream}** ({d['kind']}; {shape}; seeds {', '.join(map(str, summary['seeds']))}): "
                  "mean ± 95% CI over seeds (Student t), in %", "",
                  markdown_table(["method", "final average accuracy", "backward transfer", "forgetting",
                                  "forward transfer", "stream s"], rows), ""]
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    streams = list(summary["streams"])
    fig, axes = plt.subplots(1, len(streams), figsize=(4.6 * len(streams) + 1.6, 3.8), squeeze=False)
    for ax, stream in zip(axes[0], streams):
        for m, e in summary["streams"][stream]["table"].items():
            mean = [100 * p["mean"] for p in e["accuracy_over_time"]]
            ci = [0.0 if math.isnan(p["ci95"]) else 100 * p["ci95"] for p in e["accuracy_over_time"]]
            xs = list(range(1, len(mean) + 1))
            (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=m)
            ax.fill_between(xs, [a - c for a, c in zip(mean, ci)], [a + c for a, c in zip(mean, ci)],
                            color=line.get_color(), alpha=0.12, linewidth=0)
        ax.set_title(stream)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("experiences learned")
        ax.set_ylabel("accuracy on all experiences seen (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
