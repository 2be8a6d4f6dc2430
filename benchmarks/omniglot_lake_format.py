"""Omniglot one-shot problems in Lake et al.'s format, from a model trained on small1 alone.

Train on Omniglot's minimal background set ``images_background_small1`` (5 alphabets); test on
20-way one-shot within-alphabet problems built as Lake et al. (2015) built theirs, from the alphabets
of ``images_background_small2`` that small1 lacks (Japanese_(katakana), Sanskrit, Tagalog; Tagalog's
17 characters give 17-way problems): per problem 20 characters of one alphabet, one drawing of each
by one person as the support set, one drawing of each by another person to label
(:mod:`metaphi.tasks.lake`). Every method and seed is scored on the same problems (drawn with
``--problem-seed``); the error is the mean over seeds ± the 95% t-interval over seeds, beside the 95%
interval over the problems of all seeds pooled.

Rows:

* the library's learners, each trained by ``metaphi run ALGO --benchmark omniglot-small`` (small1:
  4 alphabets to train, 1 held out to validate; its best-validation checkpoint ``best.pt`` is the one
  tested) and tested in-process on the problems with the algorithm's own ``evaluate``: ProtoNet, MAML,
  Matching Networks, self-supervised (rotation) pre-training + fine-tuning, supervised pre-training +
  fine-tuning, pixel-space nearest neighbour;
* "recipe (run + predict)": the user-facing path. small1 is written out as a folder, one subfolder
  per character with the archive's own PNGs (black ink on white, 105 x 105); ``metaphi run protonet
  --benchmark folder:DIR --deploy --ways 20`` trains on it with nothing else given (the recipe decides
  the rest, iterations included, and trains on every class but a validation fifth); each problem is
  written as a support folder (one subfolder per character, one drawing) and a query folder (the
  drawings to label, under names that do not say their class), and ``metaphi predict`` labels it.
* "recipe, ensemble of 3": the same, with ``predict --checkpoint A,B,C`` over three recipe runs
  with consecutive seeds (``--ensemble-size``): the rows' seed is the first member's; its CPU minutes
  are the members' summed.

small2's drawings serve only to test: every choice (best.pt, by validation) is made on small1's
classes (the omniglot-small runs validate on small1's held-out alphabet and load small2's unseen
alphabets only as their own test split, scored after training; the folder run splits small1's own
classes), and this script decodes small2 only after every run has finished.

    .venv/bin/python benchmarks/omniglot_lake_format.py --data-root ../shared/data/omniglot           # hours
    (--jobs 2: two runs at a time, one thread each; CPU minutes are each run's own)
    .venv/bin/python benchmarks/omniglot_lake_format.py --quick --out /tmp/lake-quick                # minutes

Writes benchmarks/results/omniglot_lake_format.{json,md} (``--out DIR``: DIR/omniglot_lake_format.*).
Runs go to ``--work`` (reused when a run with the same command has finished there).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, run_all, shell, write  # noqa: E402

from metaphi.evaluate import confidence95, mean_ci95  # noqa: E402
from metaphi.experiments.report import markdown_table, pm  # noqa: E402
from metaphi.tasks import lake, omniglot  # noqa: E402

NAME = "omniglot_lake_format"

# Published 20-way within-alphabet one-shot error (REFERENCES.md, "Omniglot challenge"). Lake et al.
# tested on the 20 official runs over the evaluation alphabets, not on the three alphabets here, so
# they are context, not a like-for-like comparison.
PUBLISHED = [
    ("People (Lake et al. 2015)", "full background", 4.5),
    ("BPL (Lake et al. 2015)", "full background", 3.3),
    ("Siamese convnet (Koch et al. 2015)", "full background", 8.0),
    ("Deep convnet (Lake et al. 2015)", "full background", 13.5),
    ("Hierarchical deep (Lake et al. 2015)", "full background", 34.8),
    ("BPL (Lake et al. 2015)", "small1 / small2", "4.3 / 4.0"),
    ("Deep convnet (Lake et al. 2015)", "small1 / small2", "24.0 / 22.3"),
    ("Prototypical networks (Lake et al. 2019, unverified)", "full background", 13.7),
    ("A plain ProtoNet script: Conv4, 60-way, rotations, 15 CPU-min", "small1, these alphabets", "about 15"),
]

# The rows: (label, algorithm, flags of `metaphi run` beside the shared ones). ProtoNet takes its recipe
# (`metaphi run`'s defaults for character data: Snell et al.'s 60-way training episodes, 5 queries per
# class, one episode per update, rotations as new classes, max-pooling Conv4); Matching Networks the same
# episodes by flags; MAML the minimal-split benchmark's 20-way sizes with rotations; the pre-training rows
# take 4 batches of 64 images per update (the benchmark's meta-batch of 32 would make self-supervised
# pre-training about 10 CPU-seconds an iteration).
METHODS = {
    "protonet": ("ProtoNet", "protonet", []),
    "maml": ("MAML", "maml", ["--query", "2", "--meta-batch", "4", "--rotations"]),
    "matching": ("Matching", "matching", ["--train-ways", "60", "--query", "5", "--rotations", "--meta-batch", "1"]),
    "ssl": ("SSL (rotation) init + fine-tune", "ssl-rotation", ["--meta-batch", "4"]),
    "pretrain": ("Pre-training + fine-tune", "pretrain", ["--rotations", "--meta-batch", "4"]),
    "pixel-nn": ("Pixel nearest neighbour", "pixel-nn", []),
    "recipe": ("Recipe (run + predict)", "protonet", []),
    "ensemble": ("Recipe, ensemble of {k} runs (run x{k} + predict)", "protonet", []),
}
# The user-facing row: `metaphi run protonet --benchmark folder:DIR --deploy --ways 20` with nothing else
# (the recipe decides the rest, iterations included), then `metaphi predict` with these flags, chosen on
# validation characters by benchmarks/omniglot_recipe_choice.py.
PREDICT_FLAGS: list[str] = []


def metaphi_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "metaphi")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def test_in_process(run_dir: str, problems: list[lake.LakeProblem]) -> list[float]:
    """Accuracy on each problem of the run's best checkpoint, by the algorithm's own ``evaluate``."""
    from metaphi.experiments.predict import load_for_prediction
    from metaphi.train import choose_checkpoint

    ck, algorithm, spec = load_for_prediction(choose_checkpoint(run_dir))
    shape = problems[0].task.support[0].shape[1:]
    if (spec["channels"], spec["height"], spec["width"]) != tuple(shape):
        sys.exit(f"{run_dir}: trained on {spec['channels']}x{spec['height']}x{spec['width']} images, "
                 f"the problems are {tuple(shape)}")
    phi = ck["phi"]
    return [float(algorithm.evaluate(phi, p.task, None)[-1].detach()) for p in problems]


# -- the user-facing path: folders on disk ------------------------------------------------------------

def class_folder(name: str) -> str:
    """``Alphabet/characterNN`` -> ``Alphabet__characterNN``: one folder per character."""
    return name.replace("/", "__")


def write_training_folder(source: str, folder: str) -> None:
    """small1 as a user would lay it out: one subfolder per character holding the archive's PNGs."""
    if os.path.isfile(os.path.join(folder, ".complete")):
        return
    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(source) as z:
        for (alphabet, character, file), member in omniglot.listing(source):
            d = os.path.join(folder, class_folder(f"{alphabet}/{character}"))
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, file), "wb") as f:
                f.write(z.read(member))
    open(os.path.join(folder, ".complete"), "w").close()


def write_problem_folders(source: str, problems: list[lake.LakeProblem], folder: str) -> list[dict]:
    """Each problem as ``pNNN/support/<class>/<drawing>.png`` and ``pNNN/query/qNN.png`` (names that do
    not give the class away), from the archive's own PNGs; the answers."""
    shutil.rmtree(folder, ignore_errors=True)
    members = omniglot.listing(source)
    answers = []
    with zipfile.ZipFile(source) as z:
        for i, p in enumerate(problems):
            root = os.path.join(folder, f"p{i:03d}")
            for index, label in zip(p.support_indices.tolist(), p.task.support[1].tolist()):
                (_, _, file), member = members[index]
                d = os.path.join(root, "support", class_folder(p.classes[label]))
                os.makedirs(d, exist_ok=True)
                open(os.path.join(d, file), "wb").write(z.read(member))
            truth = {}
            os.makedirs(os.path.join(root, "query"))
            for j, (index, label) in enumerate(zip(p.query_indices.tolist(), p.task.query[1].tolist())):
                name = f"q{j:02d}.png"
                open(os.path.join(root, "query", name), "wb").write(z.read(members[index][1]))
                truth[name] = class_folder(p.classes[label])
            answers.append({"support": os.path.join(root, "support"), "query": os.path.join(root, "query"),
                            "truth": truth})
    return answers


def test_by_predict(run_dirs: list[str], out_dir: str, answers: list[dict], log: list[str],
                    parallel: int = 1) -> list[float]:
    """Accuracy on each problem as labelled by `metaphi predict` with the runs' default checkpoints (one
    run, or an ensemble of several), its CSVs under ``out_dir/predictions`` (``parallel`` predict
    processes at a time, one thread each when more than one)."""
    from concurrent.futures import ThreadPoolExecutor

    def command(i: int, a: dict) -> list[str]:
        out = os.path.join(out_dir, "predictions", f"p{i:03d}.csv")
        return [metaphi_bin(), "predict", "--checkpoint", ",".join(run_dirs), "--support", a["support"], "--query",
                a["query"], *PREDICT_FLAGS, "--out", out]

    os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1") if parallel > 1 else None
    commands = [command(i, a) for i, a in enumerate(answers)]
    log.append(shell(commands[0]))
    with ThreadPoolExecutor(parallel) as pool:
        done = list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True, env=env), commands))
    accuracies = []
    for cmd, finished, a in zip(commands, done, answers):
        if finished.returncode != 0:
            sys.exit(f"failed ({finished.returncode}): {shell(cmd)}\n{finished.stderr[-3000:]}")
        with open(cmd[-1], newline="") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != len(a["truth"]):
            sys.exit(f"{cmd[-1]}: {len(rows)} predictions for {len(a['truth'])} query images")
        accuracies.append(sum(a["truth"][os.path.basename(r["file"])] == r["prediction"] for r in rows) / len(rows))
    if len(answers) > 1:
        log.append(f"# ... and the same for the other {len(answers) - 1} problems")
    return accuracies


# -- the benchmark ------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join("..", "shared", "data", "omniglot"),
                    help="folder with images_background_small1.zip and images_background_small2.zip")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--seeds-of", nargs="*", default=[], metavar="METHOD=S,S",
                    help="other training seeds for some methods, e.g. maml=0 protonet=0,1")
    ap.add_argument("--iterations-of", nargs="*", default=[], metavar="METHOD=N",
                    help="other iterations for some methods, e.g. matching=500")
    ap.add_argument("--iterations", type=int, default=1000,
                    help="meta-training iterations of every run but the recipe's (which takes its own)")
    ap.add_argument("--ensemble-size", type=int, default=3,
                    help="recipe runs in each ensemble row (seeds S, S+1, ...: trained where not there yet)")
    ap.add_argument("--per-alphabet", type=int, default=20, help="test problems per small2-only alphabet")
    ap.add_argument("--problem-seed", type=int, default=2015, help="seed of the test problems (all rows share them)")
    ap.add_argument("--val-every", type=int, default=100, help="validate (and keep best.pt) every this many "
                                                                "iterations")
    ap.add_argument("--val-tasks", type=int, default=100, help="validation tasks")
    ap.add_argument("--run-eval-tasks", type=int, default=100,
                    help="the runs' own test tasks (random within-alphabet episodes; not this table's numbers)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run in minutes: 10 iterations, seed 0, 2 problems per alphabet, few tasks")
    ap.add_argument("--work", default=os.path.join("runs", "bench", "omniglot-lake-format"),
                    help="where the runs and the problem folders are written")
    ap.add_argument("--out", default=None, help=f"folder for {NAME}.{{json,md}} (default: benchmarks/results)")
    args = ap.parse_args(argv)
    try:
        args.method_seeds = {m: [int(x) for x in v.split(",")] for m, v in (a.split("=") for a in args.seeds_of)}
    except ValueError:
        ap.error("--seeds-of takes METHOD=S,S,...")
    try:
        args.method_iterations = {m: int(v) for m, v in (a.split("=") for a in args.iterations_of)}
    except ValueError:
        ap.error("--iterations-of takes METHOD=N")
    if (set(args.method_seeds) | set(args.method_iterations)) - set(METHODS):
        ap.error(f"--seeds-of/--iterations-of: unknown method (valid: {', '.join(METHODS)})")
    if args.ensemble_size < 2:
        ap.error("--ensemble-size: an ensemble has at least 2 runs")
    if args.quick:
        args.iterations, args.seeds, args.per_alphabet = 10, [0], 2
        args.method_seeds, args.method_iterations = {}, {}
        args.val_every, args.val_tasks, args.run_eval_tasks = 10, 10, 10
    out_dir = args.out or RESULTS
    started = time.perf_counter()

    small1 = str(omniglot.find(args.data_root, "small1"))
    small2 = str(omniglot.find(args.data_root, "small2"))
    # the test alphabets come from the archives' names; nothing of small2 is decoded before training ends
    alphabets = lake.unseen_alphabets(omniglot.alphabets(small1), omniglot.alphabets(small2))
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)

    shared = lambda method: ["--ways", "20", "--shots", "1", "--iterations",
                             str(args.method_iterations.get(method, args.iterations)), "--val-every",
                             str(args.val_every), "--val-tasks", str(args.val_tasks), "--eval-tasks",
                             str(args.run_eval_tasks), "--no-baselines", "--quiet"]
    jobs, logs = [], {}

    def add_job(method: str, seed: int) -> None:
        label, algorithm, flags = METHODS[method]
        run_dir = os.path.join(work, f"{method}-seed{seed}")
        if method == "recipe":
            folder = os.path.join(work, "small1-folder")
            write_training_folder(small1, folder)
            cmd = [metaphi_bin(), "run", algorithm, "--benchmark", f"folder:{folder}", "--deploy", "--ways", "20",
                   *(["--iterations", str(args.iterations)] if args.quick else []),
                   "--quiet", "--seed", str(seed), "--out", run_dir]
        else:
            cmd = [metaphi_bin(), "run", algorithm, "--benchmark", "omniglot-small", "--data-root",
                   args.data_root, "--within-alphabet", *shared(method), *flags, "--seed", str(seed), "--out", run_dir]
        cmd += ["--threads", "1"] if args.jobs > 1 else []
        jobs.append(((method, seed), cmd, run_dir))
        logs[(method, seed)] = [shell(cmd)]

    for method in args.methods:
        for seed in args.method_seeds.get(method, args.seeds) if method != "ensemble" else []:
            add_job(method, seed)
    # an ensemble's members are recipe runs, trained here where the recipe row does not train them already
    ensembles = {seed: list(range(seed, seed + args.ensemble_size))
                 for seed in (args.method_seeds.get("ensemble", args.seeds) if "ensemble" in args.methods else [])}
    for members in ensembles.values():
        for seed in members:
            if ("recipe", seed) not in logs:
                add_job("recipe", seed)
    costs = run_all(jobs, args.jobs)
    runs = []  # (method, seed, run dirs, where the predictions go, train cpu s, train wall s, commands)
    scored_recipes = args.method_seeds.get("recipe", args.seeds) if "recipe" in args.methods else []
    for (method, seed), cmd, run_dir in jobs:
        cpu, wall, reused = costs[(method, seed)]
        if reused:
            logs[(method, seed)][0] += "   # reused"
        if method != "recipe" or seed in scored_recipes:
            runs.append((method, seed, [run_dir], run_dir, cpu, wall, logs[(method, seed)]))
    for seed, members in ensembles.items():
        keys = [("recipe", m) for m in members]
        runs.append(("ensemble", seed, [os.path.join(work, f"recipe-seed{m}") for m in members],
                     os.path.join(work, f"ensemble{args.ensemble_size}-seed{seed}"),
                     sum(costs[k][0] for k in keys), sum(costs[k][1] for k in keys),
                     [line for k in keys for line in logs[k][:1]]))

    # Training is over: now small2 is decoded and the problems drawn.
    data = lake.read(args.data_root, "small2")
    problems = lake.lake_problems(data, alphabets, args.per_alphabet, torch.Generator().manual_seed(args.problem_seed))
    answers = write_problem_folders(small2, problems, os.path.join(work, "problems")) \
        if {"recipe", "ensemble"} & set(args.methods) else None

    rows = []
    for method, seed, run_dirs, predictions_dir, train_cpu, train_wall, log in runs:
        cpu, wall, own = children_cpu(), time.perf_counter(), time.process_time()
        if method in ("recipe", "ensemble"):
            accuracies = test_by_predict(run_dirs, predictions_dir, answers, log, parallel=args.jobs)
        else:
            run_dir, = run_dirs
            accuracies = test_in_process(run_dir, problems)
            log.append(f"# tested in this script: {lake.__name__}.lake_problems + the algorithm's evaluate() "
                       f"on {os.path.join(run_dir, 'best.pt')} (or checkpoint.pt where no best was kept)")
        test_cpu = children_cpu() - cpu + time.process_time() - own
        errors = [1 - a for a in accuracies]
        per_alphabet = {a: sum(e for e, p in zip(errors, problems) if p.alphabet == a) / args.per_alphabet
                        for a in alphabets}
        rows.append({"method": method, "label": label_of(method, args), "seed": seed, "error": sum(errors) / len(errors),
                     "per_alphabet": per_alphabet, "problem_errors": errors, "train_cpu_minutes": train_cpu / 60,
                     "train_wall_minutes": train_wall / 60, "test_cpu_minutes": test_cpu / 60,
                     "test_wall_minutes": (time.perf_counter() - wall) / 60, "commands": log})
        print(f"{method} seed {seed}: error {100 * rows[-1]['error']:.1f}%", flush=True)

    summary = []
    for method in args.methods:
        rs = [r for r in rows if r["method"] == method]
        mean, ci = mean_ci95([r["error"] for r in rs])
        pooled = torch.tensor([e for r in rs for e in r["problem_errors"]])
        summary.append({"method": method, "label": label_of(method, args), "seeds": len(rs),
                        "iterations": None if method in ("recipe", "ensemble")
                        else args.method_iterations.get(method, args.iterations),
                        "seed_list": [r["seed"] for r in rs], "error": mean,
                        "error_ci95_over_seeds": None if math.isnan(ci) else ci,  # None: one seed
                        "error_ci95_over_problems": confidence95(pooled),
                        "per_alphabet": {a: mean_ci95([r["per_alphabet"][a] for r in rs])[0] for a in alphabets},
                        "train_cpu_minutes": sum(r["train_cpu_minutes"] for r in rs) / len(rs),
                        "test_cpu_minutes": sum(r["test_cpu_minutes"] for r in rs) / len(rs),
                        "commands": rs[0]["commands"]})
    total_minutes = (time.perf_counter() - started) / 60
    reused = sum(r for _, _, r in costs.values())
    md = markdown_report(args, alphabets, problems, summary, total_minutes, reused)
    payload = {"machine": machine(), "settings": vars(args), "alphabets": alphabets,
               "problems": [{"alphabet": p.alphabet, "ways": p.ways, "classes": p.classes,
                             "support_drawer": p.support_drawer, "query_drawer": p.query_drawer} for p in problems],
               "published_error_percent": PUBLISHED, "summary": summary, "runs": rows,
               "total_wall_minutes": total_minutes}
    write(NAME, payload, md, out_dir)
    print(f"wrote {os.path.join(out_dir, NAME)}.json and .md ({total_minutes:.1f} minutes)")


def label_of(method: str, args) -> str:
    return METHODS[method][0].format(k=args.ensemble_size)


def markdown_report(args, alphabets, problems, summary, total_minutes, reused: int = 0) -> str:
    ways = sorted({(p.alphabet, p.ways) for p in problems})
    lines = [
        "### Omniglot in Lake et al.'s format: train on small1, one-shot problems from small2's unseen alphabets",
        "",
        f"{len(problems)} problems ({args.per_alphabet} per alphabet: "
        + ", ".join(f"{a} {w}-way" for a, w in ways)
        + f"; problem seed {args.problem_seed}), each one drawing per character by one person as the support and "
        f"one by another person to label. Error = mean over a row's training seeds ± 95% t-interval over "
        f"seeds (none with one seed); beside it the 95% interval over all problems of all its seeds pooled. "
        "Iterations as the table says (the recipe takes its own: 2000); CPU minutes are user + system time of "
        "the training process (all threads) and of testing, per seed"
        + (f"; an ensemble's are its {args.ensemble_size} members' summed, and its seed is its first member's "
           f"(members: that seed and the next {args.ensemble_size - 1})." if "ensemble" in args.methods else "."),
        "",
    ]
    table = []
    for s in summary:
        table.append([s["label"], ", ".join(map(str, s["seed_list"])), str(s["iterations"] or "recipe"),
                      pm(s["error"], s["error_ci95_over_seeds"], digits=1),
                      pm(s["error"], s["error_ci95_over_problems"], digits=1),
                      *[f"{100 * s['per_alphabet'][a]:.1f}" for a in alphabets],
                      f"{s['train_cpu_minutes']:.1f}", f"{s['test_cpu_minutes']:.1f}"])
    lines.append(markdown_table(["method", "seeds", "iterations", "error % (seeds)", "error % (problems)",
                                 *[f"{a} %" for a in alphabets], "train CPU min", "test CPU min"], table))
    lines += ["", "Published 20-way within-alphabet one-shot error (Lake et al. tested on the 20 official runs over "
              "the evaluation alphabets, not these three: context, not a like-for-like comparison):", ""]
    lines.append(markdown_table(["system", "background set", "error %"], [list(p) for p in PUBLISHED]))
    lines += ["", "Command lines of each row (its first seed):", ""]
    for s in summary:
        lines.append(f"- {s['label']}:")
        lines += [f"  - `{c}`" for c in s["commands"]]
    lines += ["", f"Benchmark: `.venv/bin/python benchmarks/omniglot_lake_format.py {' '.join(sys.argv[1:])}` "
              f"({total_minutes:.1f} minutes wall clock"
              + (f"; {reused} finished runs reused, their training not counted)" if reused else ")")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
