"""metaphi distill: a student trained alone, with plain KD and with a meta-learned teacher, over seeds.

Many-class classification: every class's images are split into train / quiz / test by a seeded
permutation. Each seed trains a teacher on the train images and keeps snapshots after several
numbers of epochs (teachers of different quality), then trains students from the same
initialization: alone, distilled from each snapshot (``kd``), and with each snapshot as the
starting point of a teacher that keeps learning from the student's quiz loss (``meta``, ``meta-fo``;
see metaphi/algorithms/distill.py). The quiz images are used only by the meta teacher.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from metaphi.algorithms.distill import METHODS, DistillConfig, train_student
from metaphi.config import int_list as _ints
from metaphi.evaluate import mean_ci95
from metaphi.functional import accuracy, params_of
from metaphi.tasks.registry import load_named as load_data

PAIRS = {
    # a wide convnet teaching a narrow Conv4; a wide two-layer MLP teaching a one-layer MLP
    "conv": ({"name": "conv4", "hidden": 32}, {"name": "conv4", "hidden": 8}),
    "mlp": ({"name": "mlp", "hidden": [256, 256]}, {"name": "mlp", "hidden": [32]}),
}


def build(spec: dict, num_classes: int, image_shape) -> torch.nn.Module:
    from metaphi.models import MLP, Conv4
    c, h, w = image_shape
    if spec["name"] == "conv4":
        return Conv4(c, num_classes, hidden=spec["hidden"], image_size=h)
    return MLP(c * h * w, num_classes, tuple(spec["hidden"]))


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


def run_experiment(data: str = "glyphs", pair: str = "mlp", methods=("alone", "kd", "meta"),
                   teacher_epochs=(1, 3, 10), epochs: int = 5, seeds=(0, 1, 2, 3, 4), classes: int | None = None,
                   per_class=(10, 5, 5), batch: int = 64, teacher_lr: float = 1e-3,
                   cfg: DistillConfig | None = None, data_root: str | None = None, split_seed: int = 0,
                   checkpoint: str | None = None, progress: bool = False, log=print) -> dict:
    """Every (seed, teacher snapshot, method) run; resumes from ``checkpoint`` when it holds the
    same configuration. Returns {"config", "rows", "summary"}."""
    cfg = cfg or DistillConfig()
    config = {"data": data, "pair": pair, "methods": list(methods), "teacher_epochs": list(teacher_epochs),
              "epochs": epochs, "seeds": list(seeds), "classes": classes, "per_class": list(per_class),
              "batch": batch, "teacher_train_lr": teacher_lr, "distill": cfg.to_dict(), "split_seed": split_seed}
    rows: list[dict] = []
    if checkpoint and os.path.exists(checkpoint):
        saved = torch.load(checkpoint, weights_only=False)
        if saved.get("config") != config:
            raise ValueError(f"{checkpoint} holds a different configuration; use another --out or delete it")
        rows = saved["rows"]
        log(f"resuming: {len(rows)} runs done")
    done = {(r["seed"], r["teacher_epochs"], r["method"]) for r in rows}
    store = load_data(data, data_root, classes, split_seed)
    split = class_split(store, tuple(per_class), split_seed)
    n_classes, shape = store.num_classes, tuple(split["train"][0].shape[1:])
    t_spec, s_spec = PAIRS[pair]
    plan = [(s, te, m) for s in seeds for te in teacher_epochs for m in methods if m != "alone"]
    plan = [(s, None, "alone") for s in seeds if "alone" in methods] + plan
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), initial=sum(1 for p in plan if p in done), desc=f"distill {data}/{pair}")
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
            train_student(model, params_of(model, False), split["train"], max(teacher_epochs), batch, g, "alone",
                          DistillConfig(lr=teacher_lr), on_epoch=keep)
            teachers[seed] = {"model": model, "snaps": snaps, "wall_s": time.perf_counter() - t0}
        return teachers[seed]

    for seed, te, method in plan:
        if (seed, te, method) in done:
            continue
        torch.manual_seed(seed)
        student = build(s_spec, n_classes, shape)
        init = params_of(student, False)
        teacher = t_params = None
        t_acc = None
        if method != "alone":
            info = teacher_snapshots(seed)
            teacher, (t_params, t_acc) = info["model"], info["snaps"][te]
        t0 = time.perf_counter()
        params, t_final = train_student(student, init, split["train"], epochs, batch,
                                        torch.Generator().manual_seed(20_000 + seed), method, cfg, teacher, t_params,
                                        split["quiz"])
        row = {"seed": seed, "teacher_epochs": te, "method": method, "teacher_acc": t_acc,
               "student_acc": accuracy(student, params, *split["test"]), "wall_s": time.perf_counter() - t0}
        if method.startswith("meta"):
            row["teacher_acc_after"] = accuracy(teacher, t_final, *split["test"])
        rows.append(row)
        if checkpoint:
            tmp = checkpoint + ".tmp"
            torch.save({"config": config, "rows": rows}, tmp)
            os.replace(tmp, checkpoint)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(method=method, acc=f"{row['student_acc']:.3f}")
    if bar is not None:
        bar.close()
    return {"config": config, "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["teacher_epochs"]), []).append(r)
    out = []
    for (method, te), rs in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1] or 0)):
        s, s_ci = mean_ci95([r["student_acc"] for r in rs])
        entry = {"method": method, "teacher_epochs": te, "seeds": len(rs), "student_acc": s, "student_ci": s_ci}
        if te is not None:
            entry["teacher_acc"], entry["teacher_ci"] = mean_ci95([r["teacher_acc"] for r in rs])
        if method.startswith("meta"):
            entry["teacher_acc_after"], entry["teacher_after_ci"] = mean_ci95([r["teacher_acc_after"] for r in rs])
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"**{c['data']}, {c['pair']} pair** ({c['classes'] or 'all'} classes; per class "
             f"{'/'.join(map(str, c['per_class']))} train/quiz/test images; student {c['epochs']} epochs; "
             f"{len(c['seeds'])} seeds; test accuracy mean ± 95% CI)", "",
             "| method | teacher epochs | teacher acc | student acc | teacher acc after meta |",
             "|---|---|---|---|---|"]
    for e in result["summary"]:
        t = "—" if e["teacher_epochs"] is None else f"{100 * e['teacher_acc']:.1f} ± {100 * e['teacher_ci']:.1f}"
        after = f"{100 * e['teacher_acc_after']:.1f} ± {100 * e['teacher_after_ci']:.1f}" if "teacher_acc_after" in e \
            else "—"
        lines.append(f"| {e['method']} | {e['teacher_epochs'] or '—'} | {t} | "
                     f"{100 * e['student_acc']:.1f} ± {100 * e['student_ci']:.1f} | {after} |")
    return "\n".join(lines)


def cmd_distill(args) -> int:
    from metaphi.config import UsageError, writable_dir as _writable_dir, name_list
    from metaphi.experiments.report import write_result
    methods = name_list(args.methods, METHODS)
    teacher_epochs = _ints(args.teacher_epochs, "teacher-epochs")
    if min(teacher_epochs) < 1:
        raise UsageError("--teacher-epochs must be positive")
    per_class = _ints(args.per_class, "per-class")
    if len(per_class) != 3 or min(per_class) < 1:
        raise UsageError("--per-class takes three positive counts: train,quiz,test")
    out = _writable_dir(args.out)
    cfg = DistillConfig(temperature=args.temperature, soft_weight=args.soft_weight, lr=args.lr,
                        pilot_lr=args.pilot_lr, teacher_lr=args.meta_teacher_lr,
                        teacher_ce_weight=args.teacher_ce_weight)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        result = run_experiment(args.data, args.pair, methods, teacher_epochs, args.epochs, _ints(args.seeds, "seeds"),
                                args.classes, tuple(per_class), args.batch, args.teacher_lr, cfg, args.data_root,
                                args.split_seed, os.path.join(out, "checkpoint.pt"), not args.quiet,
                                (lambda *a: None) if args.quiet else print)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    result["wall_s"] = time.perf_counter() - t0
    write_result(result, out, markdown(result), args.quiet)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="knowledge distillation: student alone, plain KD, meta-learned teacher",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default="glyphs", choices=["glyphs", "omniglot"],
                   help="glyphs (built in) or omniglot (the small1 minimal split under --data-root)")
    p.add_argument("--pair", default="mlp", choices=sorted(PAIRS), help="teacher/student pair (default mlp)")
    p.add_argument("--methods", default="alone,kd,meta", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--teacher-epochs", default="1,3,10", help="teacher snapshots, in epochs (default 1,3,10)")
    p.add_argument("--epochs", type=int, default=5, help="student epochs (default 5)")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--classes", type=int, help="use this many classes, drawn by --split-seed (default all)")
    p.add_argument("--per-class", default="10,5,5", help="train,quiz,test images per class (default 10,5,5)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="student Adam step size (default 3e-3)")
    p.add_argument("--teacher-lr", type=float, default=1e-3, help="Adam step size of teacher pre-training")
    p.add_argument("--meta-teacher-lr", type=float, default=1e-4, help="Adam step size of the meta teacher")
    p.add_argument("--pilot-lr", type=float, default=0.1, help="SGD step size α of the pilot update")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--soft-weight", type=float, default=0.5, help="weight λ of the soft term (default 0.5)")
    p.add_argument("--teacher-ce-weight", type=float, default=0.0,
                   help="μ, weight of the meta teacher's own CE on the training batch (default 0, as MetaDistil)")
    p.add_argument("--data-root", help="folder with the Omniglot archives (default: $METAPHI_DATA or "
                   "~/.cache/metaphi/data)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="runs/distill", help="folder for checkpoint.pt, result.json, result.md")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_distill)
