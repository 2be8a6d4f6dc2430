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

``--out`` gets ``results.json`` (every run's R and the summary), ``results.md`` (final average
accuracy, backward transfer, forgetting and forward transfer, mean ± 95% CI over seeds, Student t)
and ``accuracy.png`` (accuracy on all experiences seen so far after each experience).
"""
from __future__ import annotations

import math
import os
import sys
import time

WHOLE_NETWORK = ("finetune", "ewc", "replay", "lamaml")


def _csv(text: str | None, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else []


def _floats(text: str) -> list[float]:
    import argparse

    try:
        return _csv(text, float)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None


def method_options(name: str, args) -> dict:
    """The constructor options of method ``name`` from the command line."""
    sgd = {"lr": args.lr, "batch": args.batch, "epochs": args.epochs}
    meta = {"meta_iterations": args.meta_iterations, "meta_batch": args.meta_batch, "meta_lr": args.meta_lr,
            "inner_lr": args.inner_lr, "traj_classes": args.traj_classes, "traj_shots": args.traj_shots,
            "remember": args.remember}
    if name == "finetune":
        return sgd
    if name == "ewc":
        return {**sgd, "lam": args.ewc_lambda}
    if name == "replay":
        return {**sgd, "memory": args.memory, "replay_batch": args.replay_batch}
    if name == "lamaml":
        return {"alpha": args.alpha, "alpha_lr": args.alpha_lr, "batch": args.batch, "epochs": args.epochs,
                "memory": args.memory, "replay_batch": args.replay_batch, "first_order": args.first_order}
    if name == "oml":
        return {**meta, "online_lr": args.online_lr, "estimator": args.meta_estimator}
    if name == "pretrain":
        return {**meta, "online_lr": args.online_lr}
    raise ValueError(name)


def pretrain_init(args):
    from metaphi.continual.oml import Pretrain

    return Pretrain(**method_options("pretrain", args))


def summarize(results: list[dict], methods: list[str]) -> dict:
    """Per method: mean ± 95% CI over seeds (Student t) of each metric and of accuracy over time."""
    from metaphi.evaluate import mean_ci95 as mean_ci

    table = {}
    for m in methods:
        rows = [r for r in results if r["method"] == m and r.get("finished")]
        if not rows:
            continue
        entry = {"seeds": sorted(r["seed"] for r in rows)}
        for key in ("average_accuracy", "backward_transfer", "forgetting", "forward_transfer"):
            mean, ci = mean_ci([r[key] for r in rows])
            entry[key] = {"mean": mean, "ci95": ci}
        curves = [r["accuracy_over_time"] for r in rows]
        entry["accuracy_over_time"] = [dict(zip(("mean", "ci95"), mean_ci([c[i] for c in curves])))
                                       for i in range(len(curves[0]))]
        entry["train_seconds"] = sum(r["train_seconds"] for r in rows)
        table[m] = entry
    return table


def _cell(x: dict, scale: float = 100.0) -> str:
    ci = "" if math.isnan(x["ci95"]) else f" ± {scale * x['ci95']:.1f}"
    return f"{scale * x['mean']:.1f}{ci}"


def markdown(summary: dict) -> str:
    lines = []
    for stream, entry in summary["streams"].items():
        d = entry["stream"]
        shape = (f"{d['experiences']} experiences, {d['classes']} classes"
                 + (f" ({d['classes_per_experience']} new per experience)" if "classes_per_experience" in d else "")
                 + (f", {d['train_per_class']} training images per class shown once" if "train_per_class" in d else ""))
        lines += [f"**{stream}** ({d['kind']}; {shape}; seeds {', '.join(map(str, summary['seeds']))}): "
                  "mean ± 95% CI over seeds (Student t), in %", "",
                  "| method | final average accuracy | backward transfer | forgetting | forward transfer | stream s |",
                  "|---|---|---|---|---|---|"]
        for m, e in entry["table"].items():
            label = m if m not in WHOLE_NETWORK else f"{m} ({summary['init']})"
            lines.append(f"| {label} | {_cell(e['average_accuracy'])} | {_cell(e['backward_transfer'])} | "
                         f"{_cell(e['forgetting'])} | {_cell(e['forward_transfer'])} | {e['train_seconds']:.0f} |")
        lines.append("")
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


def sweep(streams: list[str], methods: list[str], seeds: list[int], args, out_dir: str, log=print,
          workdir: str | None = None) -> dict:
    """Every (stream, seed, method) run; writes and returns the summary. Meta-training runs are kept in
    ``workdir`` (default ``out_dir/meta``)."""
    from metaphi.config import UsageError
    from metaphi.experiments.report import machine, write_json
    from metaphi.continual import build_method
    from metaphi.continual.runner import SettingsMismatch, run_stream
    from metaphi.continual.streams import build_stream

    progress = not args.quiet and sys.stderr.isatty()
    workdir = workdir or os.path.join(out_dir, "meta")
    init = pretrain_init(args) if args.init == "pretrain" else None
    stream_options = {"experiences": args.experiences, "classes_per_experience": args.classes_per_experience,
                      "classes": args.classes, "train_per_class": args.train_per_class,
                      "test_per_class": args.test_per_class, "angles": args.angles, "data_root": args.data_root,
                      "image_size": args.image_size, "channels": args.channels, "invert": args.invert}
    summary = {"streams": {}, "methods": methods, "seeds": seeds, "init": args.init, "machine": machine(),
               "net": {"hidden": args.hidden, "blocks": args.blocks},
               "methods_options": {m: method_options(m, args) for m in methods}}
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
                method = build_method(m, **method_options(m, args))
                folder = os.path.join(out_dir, stream_name.replace(":", "_").replace("/", "_"), m, f"seed-{seed}")
                if args.fresh:
                    for f in ("checkpoint.pt", "result.json"):
                        if os.path.exists(os.path.join(folder, f)):
                            os.unlink(os.path.join(folder, f))
                try:
                    r = run_stream(method, stream, seed, folder, hidden=args.hidden, blocks=args.blocks,
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


def register(subparsers) -> None:
    from metaphi.continual import METHODS
    from metaphi.continual.streams import STREAMS

    p = subparsers.add_parser("continual", help="lifelong learning on a stream: finetune, EWC, replay, OML, La-MAML",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default=",".join(METHODS),
                   help=f"comma list of {', '.join(METHODS)} (default: all)")
    p.add_argument("--stream", default="glyphs", help=f"comma list of {', '.join(STREAMS)}, folder:PATH "
                   "(default: glyphs, built in)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list of seeds (default 0,1,2,3,4)")
    p.add_argument("--out", default="runs/continual")
    p.add_argument("--init", choices=["pretrain", "scratch"], default="pretrain",
                   help="start of finetune/ewc/replay/lamaml: the pre-trained body or random weights")
    g = p.add_argument_group("stream")
    g.add_argument("--experiences", type=int, help="experiences (default: 10 class-incremental, 5 domain)")
    g.add_argument("--classes-per-experience", type=int, default=5, help="class-incremental: new classes each")
    g.add_argument("--classes", type=int, default=10, help="rotated/permuted: classes in every experience")
    g.add_argument("--angles", type=_floats, default=[0.0, 30.0, 60.0, 90.0, 120.0], help="rotated-glyphs: the angles, one per experience")
    g.add_argument("--train-per-class", type=int, default=15, help="images per class shown once (default 15)")
    g.add_argument("--test-per-class", type=int, default=5, help="held-out test images per class (default 5)")
    g.add_argument("--data-root", help="folder with the Omniglot archives (default: $METAPHI_DATA or "
                   "~/.cache/metaphi/data)")
    g.add_argument("--image-size", type=int, default=28, help="folder:PATH: resize to this size (default 28)")
    g.add_argument("--channels", type=int, choices=[1, 3], default=1, help="folder:PATH: 1 (grey) or 3 (RGB)")
    g.add_argument("--invert", action="store_true", help="folder:PATH: dark ink on light paper becomes high")
    g = p.add_argument_group("network")
    g.add_argument("--hidden", type=int, default=32, help="channels of the convnet (default 32)")
    g.add_argument("--blocks", type=int, default=4, help="stride-2 conv blocks (default 4)")
    g = p.add_argument_group("methods")
    g.add_argument("--lr", type=float, default=0.01,
                   help="SGD step size of finetune, ewc, replay (default 0.01, finetune's and ewc's choice on "
                        "glyphs-val; replay's was 0.1)")
    g.add_argument("--batch", type=int, default=10, help="mini-batch of the stream (default 10)")
    g.add_argument("--epochs", type=int, default=1, help="passes over each experience (default 1)")
    g.add_argument("--ewc-lambda", type=float, default=1.0, help="EWC: penalty weight λ (default 1, chosen on glyphs-val)")
    g.add_argument("--memory", type=int, default=100, help="replay, lamaml: examples in memory (default 100)")
    g.add_argument("--replay-batch", type=int, help="replay, lamaml: memory examples per step (default --batch)")
    g.add_argument("--alpha", type=float, default=0.3, help="lamaml: initial per-weight step size (default 0.3)")
    g.add_argument("--alpha-lr", type=float, default=0.3, help="lamaml: step size of the step sizes (default 0.3)")
    g.add_argument("--first-order", action="store_true", help="lamaml: first-order meta-gradient")
    g.add_argument("--online-lr", type=float, default=0.03,
                   help="oml, pretrain: online head step size (default 0.03, oml's choice on glyphs-val; "
                        "pretrain's was 0.3)")
    g.add_argument("--meta-iterations", type=int, default=500,
                   help="oml, pretrain (and --init pretrain): meta-training steps (default 500)")
    g.add_argument("--meta-batch", type=int, default=4, help="oml, pretrain: tasks per step (default 4)")
    g.add_argument("--meta-lr", type=float, default=3e-3, help="oml, pretrain: Adam step size (default 3e-3)")
    g.add_argument("--inner-lr", type=float, default=1.0, help="oml: inner step size on the head (default 1.0)")
    g.add_argument("--traj-classes", type=int, default=2, help="oml: classes per trajectory (default 2)")
    g.add_argument("--traj-shots", type=int, default=5, help="oml: images per trajectory class (default 5)")
    g.add_argument("--remember", type=int, default=16, help="oml: random images in the meta-loss (default 16)")
    g.add_argument("--meta-estimator", choices=["second-order", "first-order"], default="second-order",
                   help="oml: meta-gradient estimator (default second-order)")
    p.add_argument("--fresh", action="store_true", help="rerun runs already in --out instead of reusing/resuming")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for these small networks)")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_continual)


def cmd_continual(args) -> int:
    from metaphi.config import UsageError, writable_dir as _writable_dir
    from metaphi.continual import METHODS

    try:
        seeds = _csv(args.seeds, int)
    except ValueError as e:
        raise UsageError(f"--seeds is a comma list of integers ({e})") from None
    methods, streams = _csv(args.method), _csv(args.stream)
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise UsageError(f"--method: unknown method '{bad[0] if bad else ''}' (valid: {', '.join(METHODS)})")
    if not seeds:
        raise UsageError("--seeds: give at least one seed")
    if not streams:
        raise UsageError("--stream: give at least one stream")
    for name in ("classes_per_experience", "classes", "train_per_class", "test_per_class", "hidden", "blocks", "batch",
                 "epochs", "memory", "meta_batch", "traj_classes", "traj_shots", "image_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    for name in ("experiences", "replay_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    for name in ("lr", "alpha", "alpha_lr", "online_lr", "meta_lr", "inner_lr"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("ewc_lambda", "meta_iterations", "remember"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be a positive number, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    _writable_dir(args.out)
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    summary = sweep(streams, methods, seeds, args, args.out, log=log)
    print(markdown(summary))
    print(f"wrote {os.path.join(args.out, 'results.md')}, results.json and accuracy.png")
    return 0
