"""metaphi distill: a student trained alone, with plain KD and with a meta-learned teacher, over seeds.

Many-class classification: every class's images are split into train / quiz / test by a seeded
permutation. Each seed trains a teacher on the train images and keeps snapshots after several
numbers of epochs (teachers of different quality), then trains students from the same
initialization: alone, distilled from each snapshot (``kd``), and with each snapshot as the
starting point of a teacher that keeps learning from the student's quiz loss (``meta``, ``meta-fo``;
the method is metaphi/algorithms/distill.py). The quiz images are used only by the meta teacher.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from metaphi.algorithms.distill import METHODS, DistillOptions, meta_distill_step, plain_step
from metaphi.config import UsageError, name_list, option, to_dict, writable_dir
from metaphi.functional import Params, accuracy, detach, params_of
from metaphi.inner.rules import Adam
from metaphi.tasks.registry import NAMED
from metaphi.tasks.registry import load_named as load_data

PAIRS = {
    # a wide convnet teaching a narrow Conv4; a wide two-layer MLP teaching a one-layer MLP
    "conv": ({"name": "conv4", "hidden": 32}, {"name": "conv4", "hidden": 8}),
    "mlp": ({"name": "mlp", "hidden": [256, 256]}, {"name": "mlp", "hidden": [32]}),
}


@dataclass
class DistillConfig:
    """One distillation study: every (seed, teacher snapshot, method) run."""

    data: str = option("glyphs", "glyphs (built in), digits (shipped) or omniglot (the small1 minimal split under "
                       "--data-root)", choices=NAMED, positional=True)
    pair: str = option("mlp", "teacher/student pair: conv (Conv4 hidden 32 teaching hidden 8) or mlp "
                       "(256-256 teaching 32)", choices=sorted(PAIRS))
    methods: list[str] = option(default_factory=lambda: ["alone", "kd", "meta"],
                                help=f"comma list of {', '.join(METHODS)}")
    teacher_epochs: list[int] = option(default_factory=lambda: [1, 3, 10], help="teacher snapshots, in epochs",
                                       check="positive")
    epochs: int = option(5, "student epochs", check="positive")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2, 3, 4], help="seeds: model inits and batch orders",
                              check="nonneg")
    classes: int | None = option(None, "use this many classes, drawn by --split-seed; none: all", check="positive")
    per_class: list[int] = option(default_factory=lambda: [10, 5, 5], help="train,quiz,test images per class",
                                  check="positive")
    split_seed: int = option(0, "seed of the class draw and of the train/quiz/test split")
    batch: int = option(64, "batch size of student and teacher training", check="positive")
    lr: float = option(3e-3, "student Adam step size", check="positive")
    teacher_lr: float = option(1e-3, "Adam step size of teacher pre-training", check="positive")
    meta_teacher_lr: float = option(1e-4, "Adam step size of the meta teacher", check="positive")
    pilot_lr: float = option(0.1, "SGD step size α of the pilot update", check="positive")
    temperature: float = option(4.0, "temperature T of the soft term", check="positive")
    soft_weight: float = option(0.5, "weight λ of the soft term", check="unit")
    teacher_ce_weight: float = option(0.0, "μ, weight of the meta teacher's own CE on the training batch "
                                      "(MetaDistil: 0)", check="nonneg")
    fd_eps: float = option(0.01, "ε₀ of meta-fo: the central difference steps ε₀/‖v‖", check="positive")
    data_root: str | None = option(None, "folder with the Omniglot archives; none: $METAPHI_DATA or "
                                   "~/.cache/metaphi/data")
    threads: int = option(0, "torch threads; 0: torch's choice", check="nonneg")
    out: str = option("runs/distill", "folder for checkpoint.pt, result.json, result.md, config.yaml")
    quiet: bool = option(False, "no progress output")


#: fields that say where and how a study runs, not what it computes: a checkpoint resumes across them
RUN_ONLY = ("data_root", "threads", "out", "quiet")


def method_options(config: DistillConfig) -> DistillOptions:
    return DistillOptions(temperature=config.temperature, soft_weight=config.soft_weight, lr=config.lr,
                          pilot_lr=config.pilot_lr, teacher_lr=config.meta_teacher_lr,
                          teacher_ce_weight=config.teacher_ce_weight, fd_eps=config.fd_eps)


def validate(config: DistillConfig) -> None:
    """What the field checks cannot say: UsageError naming the option."""
    name_list(config.methods, METHODS)
    if not config.teacher_epochs:
        raise UsageError("--teacher-epochs must list at least one number of epochs")
    if not config.seeds:
        raise UsageError("--seeds must list at least one seed")
    if len(config.per_class) != 3:
        raise UsageError("--per-class takes three positive counts: train,quiz,test")


def build(spec: dict, num_classes: int, image_shape) -> torch.nn.Module:
    """The teacher or student of a pair (``PAIRS``) for images of ``image_shape`` (c, h, w)."""
    from metaphi.models import build_model
    c, h, w = image_shape
    if spec["name"] == "conv4":
        return build_model({"name": "conv4", "in_channels": c, "out_features": num_classes, "hidden": spec["hidden"],
                            "image_size": h})
    return build_model({"name": "mlp", "in_features": c * h * w, "out_features": num_classes,
                        "hidden": tuple(spec["hidden"])})


def class_split(data, per_class: tuple[int, int, int], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train / quiz / test images of every class, by a seeded permutation within each class."""
    need = sum(per_class)
    if int(data.counts.min()) < need:
        raise ValueError(f"a class has {int(data.counts.min())} images, fewer than train+quiz+test = {need}")
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {"train": [], "quiz": [], "test": []}
    for c in range(data.num_classes):
        idx = (data.targets == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        start = 0
        for name, n in zip(parts, per_class):
            parts[name].append(idx[start:start + n])
            start += n
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        out[name] = (data.images[idx].float() / 255.0, data.targets[idx])
    return out


def online_step(student: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor], batch: int, method: str,
                opts: DistillOptions, teacher: torch.nn.Module | None = None,
                quiz: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One batch of student training by ``method``, as a step of ``metaphi.train_online``:
    ``step(state, t, generator) -> (state, metrics)``, with state {"theta", "theta_opt", "phi",
    "phi_opt", "order"} (student and teacher params, their Adam states, this epoch's batch order).
    Step t is batch t of an epoch; at t = 0 it draws the epoch's order, and a meta step then draws its
    quiz batch, from the one generator of the run."""
    x, y = train
    meta = method.startswith("meta")
    order_of_meta = "first" if method == "meta-fo" else "second"

    def step(state: dict, t: int, generator: torch.Generator) -> tuple[dict, dict]:
        order = torch.randperm(len(y), generator=generator) if t == 0 else state["order"]
        idx = order[t * batch:(t + 1) * batch]
        b = (x[idx], y[idx])
        if meta:
            q_idx = torch.randint(len(quiz[1]), (min(batch, len(quiz[1])),), generator=generator)
            theta, theta_opt, phi, phi_opt, m = meta_distill_step(
                student, state["theta"], state["theta_opt"], teacher, state["phi"], state["phi_opt"], b,
                (quiz[0][q_idx], quiz[1][q_idx]), opts, order_of_meta)
            metrics = {"loss": m["loss"], "quiz": m["quiz"]}
        else:
            theta, theta_opt, loss = plain_step(student, state["theta"], state["theta_opt"], b[0], b[1],
                                                opts.lr, teacher if method == "kd" else None, state["phi"], opts)
            phi, phi_opt, metrics = state["phi"], state["phi_opt"], {"loss": float(loss)}
        return {"theta": theta, "theta_opt": theta_opt, "phi": phi, "phi_opt": phi_opt, "order": order}, metrics

    return step


def train_student(student: torch.nn.Module, params: Params, train: tuple[torch.Tensor, torch.Tensor], epochs: int,
                  batch: int, generator: torch.Generator, method: str = "alone", opts: DistillOptions | None = None,
                  teacher: torch.nn.Module | None = None, teacher_params: Params | None = None,
                  quiz: tuple[torch.Tensor, torch.Tensor] | None = None,
                  on_epoch: Callable[[int, dict], None] | None = None):
    """Train a student for ``epochs`` passes over ``train`` by ``method`` (one of ``METHODS``).

    "alone" ignores the teacher; "kd" distils from a fixed teacher; "meta"/"meta-fo" update the
    teacher as well, with quiz batches drawn from ``quiz``. Returns (student params, teacher params).
    ``generator`` decides the batch order (and the quiz batches) and nothing else. Each epoch is one
    run of the online bilevel loop (``metaphi.train_online``) over its batches; ``on_epoch(epoch,
    {"loss": the epoch's mean, "params", "teacher_params"})`` after each."""
    from metaphi import train_online
    from metaphi.train import NonFiniteLoss

    opts = opts or DistillOptions()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "alone" and (teacher is None or teacher_params is None):
        raise ValueError(f"method {method!r} needs a teacher")
    if method.startswith("meta") and quiz is None:
        raise ValueError("meta distillation needs a quiz set")
    t_params = None if teacher_params is None else detach(teacher_params)
    state = {"theta": params, "theta_opt": Adam(opts.lr).init(params), "phi": t_params,
             "phi_opt": None if t_params is None else Adam(opts.teacher_lr).init(t_params), "order": None}
    step = online_step(student, train, batch, method, opts, teacher, quiz)
    batches = -(-len(train[1]) // batch)
    for epoch in range(epochs):
        try:
            record = train_online.run(step, state, batches, generator=generator,
                                      hint="lower --lr or --meta-teacher-lr")
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"epoch {epoch + 1}: {e}") from None
        state = record["state"]
        if on_epoch is not None:
            losses = [m["loss"] for m in record["history"]]
            on_epoch(epoch, {"loss": sum(losses) / len(losses), "params": state["theta"],
                             "teacher_params": state["phi"]})
    return state["theta"], state["phi"]


def _computed(config: DistillConfig) -> dict:
    return {k: v for k, v in to_dict(config).items() if k not in RUN_ONLY}


def study(config: DistillConfig, checkpoint: str | None = None, progress: bool = False, log=print) -> dict:
    """Every (seed, teacher snapshot, method) run of ``config``; resumes from ``checkpoint`` when it holds
    the same configuration. Returns {"config", "rows", "summary"}."""
    from metaphi.experiments.report import sweep

    validate(config)
    opts = method_options(config)
    store = load_data(config.data, config.data_root, config.classes, config.split_seed)
    split = class_split(store, tuple(config.per_class), config.split_seed)
    n_classes, shape = store.num_classes, tuple(split["train"][0].shape[1:])
    t_spec, s_spec = PAIRS[config.pair]
    methods, teacher_epochs = config.methods, config.teacher_epochs
    plan = [(s, te, m) for s in config.seeds for te in teacher_epochs for m in methods if m != "alone"]
    plan = [(s, None, "alone") for s in config.seeds if "alone" in methods] + plan
    teachers: dict[int, dict] = {}

    def teacher_snapshots(seed: int) -> dict:
        if seed not in teachers:
            torch.manual_seed(seed)  # module construction only; the params are copied out at once
            model = build(t_spec, n_classes, shape)
            snaps, t0 = {}, time.perf_counter()
            g = torch.Generator().manual_seed(10_000 + seed)
            wanted = set(teacher_epochs)

            def keep(epoch: int, info: dict) -> None:
                if epoch + 1 in wanted:
                    snaps[epoch + 1] = (info["params"], accuracy(model, info["params"], *split["test"]))

            # one run with snapshots, so a teacher's weights do not depend on which others are kept
            train_student(model, params_of(model, False), split["train"], max(teacher_epochs), config.batch, g,
                          "alone", DistillOptions(lr=config.teacher_lr), on_epoch=keep)
            teachers[seed] = {"model": model, "snaps": snaps, "wall_s": time.perf_counter() - t0}
        return teachers[seed]

    def run_cell(cell: tuple[int, int | None, str]) -> dict:
        seed, te, method = cell
        torch.manual_seed(seed)
        student = build(s_spec, n_classes, shape)
        init = params_of(student, False)
        teacher = t_params = None
        t_acc = None
        if method != "alone":
            info = teacher_snapshots(seed)
            teacher, (t_params, t_acc) = info["model"], info["snaps"][te]
        t0 = time.perf_counter()
        params, t_final = train_student(student, init, split["train"], config.epochs, config.batch,
                                        torch.Generator().manual_seed(20_000 + seed), method, opts, teacher, t_params,
                                        split["quiz"])
        row = {"seed": seed, "teacher_epochs": te, "method": method, "teacher_acc": t_acc,
               "student_acc": accuracy(student, params, *split["test"]), "wall_s": time.perf_counter() - t0}
        if method.startswith("meta"):
            row["teacher_acc_after"] = accuracy(teacher, t_final, *split["test"])
        return row

    rows = sweep(plan, run_cell, key=lambda r: (r["seed"], r["teacher_epochs"], r["method"]), checkpoint=checkpoint,
                 identity=_computed(config), desc=f"distill {config.data}/{config.pair}", progress=progress, log=log,
                 postfix=lambda r: {"method": r["method"], "acc": f"{r['student_acc']:.3f}"})
    return {"config": to_dict(config), "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and 95% t-interval over seeds of each (method, teacher epochs): teacher accuracy (before and,
    for a meta teacher, after) and student accuracy."""
    from metaphi.experiments.report import over_seeds

    rows = sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["teacher_epochs"] or 0))
    return over_seeds(rows, ("method", "teacher_epochs"), ("teacher_acc", "student_acc", "teacher_acc_after"))


def markdown(result: dict) -> str:
    from metaphi.experiments.report import markdown_table, pm

    c = result["config"]
    title = (f"**{c['data']}, {c['pair']} pair** ({c['classes'] or 'all'} classes; per class "
             f"{'/'.join(map(str, c['per_class']))} train/quiz/test images; student {c['epochs']} epochs; "
             f"{len(c['seeds'])} seeds; test accuracy mean ± 95% CI)")
    cells = [[e["method"], e["teacher_epochs"] or "—", pm(e.get("teacher_acc"), e.get("teacher_acc_ci"), digits=1),
              pm(e["student_acc"], e["student_acc_ci"], digits=1),
              pm(e.get("teacher_acc_after"), e.get("teacher_acc_after_ci"), digits=1)] for e in result["summary"]]
    return title + "\n\n" + markdown_table(["method", "teacher epochs", "teacher acc", "student acc",
                                            "teacher acc after meta"], cells)


def run(config: DistillConfig) -> dict:
    """The study of ``config``, resumable from ``out``/checkpoint.pt; writes ``out``/config.yaml,
    result.json and result.md."""
    from metaphi.experiments import report

    validate(config)
    out = writable_dir(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    try:
        # another study's folder is refused before anything is written into it
        report.resumed_rows(os.path.join(out, "checkpoint.pt"), _computed(config))
        report.save_config(config, out, "distill")
        result = study(config, os.path.join(out, "checkpoint.pt"), not config.quiet,
                       (lambda *a: None) if config.quiet else print)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    result["wall_s"] = time.perf_counter() - t0
    report.write_result(result, out, markdown(result), config.quiet)
    return result


def main(config: DistillConfig) -> int:
    run(config)
    return 0
