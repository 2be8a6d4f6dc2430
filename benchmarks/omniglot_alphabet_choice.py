"""Recipe choices checked on a whole held-out alphabet of small1, in the test's own format.

``omniglot_recipe_choice.py`` validates on characters of the training alphabets, pooled: its errors
(6-7%) did not predict the test on unseen alphabets (20%). Here one alphabet of small1 (``--alphabet``,
default Korean, 40 characters: the size of the test alphabets) is left out of the folder entirely;
every variant is ``metaphi run protonet --benchmark folder:small1-minus-ALPHABET --deploy`` (the
recipe's defaults plus the variant's flags), and each is scored on ``--problems`` one-shot 20-way
problems in Lake et al.'s format built from the held-out alphabet alone (20 of its characters,
support drawn by one person, queries by another), through predict's path on the run's best.pt.
Nothing of small2 is read, so nothing of the test alphabets.

    .venv/bin/python benchmarks/omniglot_alphabet_choice.py --data-root ../shared/data/omniglot   # ~2.5 h on 2 cores

Writes benchmarks/results/omniglot_alphabet_choice.{json,md}; runs go to ``--work`` (a finished run of
the same command there is reused). ``--variants`` runs some only: the rows of the others are kept from the
results file already there (same alphabet and problems).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine, run_all, write  # noqa: E402
from omniglot_lake_format import metaphi_bin, write_training_folder  # noqa: E402
from omniglot_recipe_choice import score  # noqa: E402

from metaphi.evaluate import mean_ci95  # noqa: E402
from metaphi.experiments.report import markdown_table, pm  # noqa: E402
from metaphi.tasks import lake, omniglot  # noqa: E402

NAME = "omniglot_alphabet_choice"
#: name -> (what changes from the recipe, flags, ways of the run's own validation episodes)
VARIANTS = {
    "recipe": ("the recipe as `run` chooses it (augmentation, rotations, 60-way, max pooling)", [], 15),
    "no-augment": ("no augmentation", ["--no-augment"], 15),
    "strength15": ("augmentation 1.5x as strong", ["--augment-strength", "1.5"], 15),
    "cosine": ("cosine step size", ["--lr-schedule", "cosine"], 15),
    "valfrac05": ("5% of the classes validate instead of 20% (91 training characters, not 77)",
                  ["--val-fraction", "0.05"], 5),
    "reflections": ("each rotated class also mirrored, a new class too (8 views of every character, not 4)",
                    ["--reflections"], 15),
    "size32": ("32 x 32 images instead of 28 x 28 (a 2 x 2 x 64 embedding, 256 numbers, not 1 x 1 x 64)",
               ["--image-size", "32"], 15),
    "elastic": ("elastic distortion beside the affine map (4x4 control points moved by up to 8% of the size)",
                ["--augment-elastic", "0.08"], 15),
    "max3": ("32 x 32, no pooling after the last block (a 4 x 4 x 64 embedding, 1024 numbers)",
             ["--image-size", "32", "--pool", "max3"], 15),
    "max3-28": ("28 x 28, no pooling after the last block (a 3 x 3 x 64 embedding, 576 numbers)",
                ["--image-size", "28", "--pool", "max3"], 15),
    "ways90": ("90-way training episodes with 3 queries per class (360 images a step, as 60 x 6)",
               ["--train-ways", "90", "--query", "3"], 15),
    "ways120": ("120-way training episodes with 2 queries per class (360 images a step, as 60 x 6)",
                ["--train-ways", "120", "--query", "2"], 15),
    "within1": ("every training episode's 60 classes from one alphabet (its characters and their rotations)",
                ["--train-within-alphabet", "1"], 15),
    "within05": ("half the training episodes' classes from one alphabet (a coin per episode), half from all",
                 ["--train-within-alphabet", "0.5"], 15),
    "lr2x": ("outer step size 0.002 instead of 0.001, constant (runs still improved at their last iterations)",
             ["--meta-lr", "0.002"], 15),
    "lr3x-cosine": ("outer step size 0.003, cosine decay to 0 over the run",
                    ["--meta-lr", "0.003", "--lr-schedule", "cosine"], 15),
    "seed1": ("size32 (the recipe since) with training seed 1: how far a second run of one recipe lands",
              ["--image-size", "32", "--seed", "1"], 15),
    "seed2": ("size32 with training seed 2", ["--image-size", "32", "--seed", "2"], 15),
    "iters4000": ("twice the iterations (4000; the runs' validation accuracy still rose at 2000)",
                  ["--iterations", "4000"], 15),
    "width96": ("Conv4 with 96 filters a layer instead of 64 (about 2.2x the computation of a step)",
                ["--model", "conv4-96"], 15),
}
#: the variant each is compared against where it is not the recipe of its time: the recipe read 28 x 28
#: characters until size32 won, so later variants are paired with size32 (the recipe since)
AGAINST = dict.fromkeys(("max3", "max3-28", "ways90", "ways120", "within1", "within05", "lr2x", "lr3x-cosine",
                         "seed1", "seed2", "iters4000", "width96"), "size32")


#: the runs of one recipe with other seeds that predict's ensembles (--checkpoint A,B[,C]) are made of
SEED_RUNS = ("size32", "seed1", "seed2")


def held_out_folder(small1_folder: str, alphabet: str, folder: str) -> None:
    """``folder``: links to every class folder of ``small1_folder`` but ``alphabet``'s, grouped by
    alphabet as ``folder/<alphabet>/<character>`` (Omniglot's own layout; the classes, their order and
    so every draw of a run are those of the flat layout the earlier rows were trained on)."""
    if os.path.isdir(folder):
        return
    for d in sorted(os.listdir(small1_folder)):
        if not d.startswith(".") and not d.startswith(alphabet + "__"):
            group, character = d.split("__", 1)
            os.makedirs(os.path.join(folder, group), exist_ok=True)
            os.symlink(os.path.join(small1_folder, d), os.path.join(folder, group, character))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join("..", "shared", "data", "omniglot"))
    ap.add_argument("--alphabet", default="Korean")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--problem-seed", type=int, default=7)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=os.path.join("runs", "bench", "omniglot-alphabet-choice"))
    ap.add_argument("--out", default=None, help=f"folder for {NAME}.{{json,md}} (default: benchmarks/results)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    work = os.path.abspath(os.path.join(args.work, args.alphabet))
    small1 = os.path.join(os.path.abspath(args.work), "small1-folder")
    write_training_folder(str(omniglot.find(args.data_root, "small1")), small1)
    folder = os.path.join(work, "train-grouped")
    held_out_folder(small1, args.alphabet, folder)
    jobs = []
    for v in args.variants:
        _, flags, ways = VARIANTS[v]
        out = os.path.join(work, v)
        jobs.append((v, [metaphi_bin(), "run", "protonet", "--benchmark", f"folder:{folder}", "--deploy", "--ways",
                         str(ways), "--threads", "1", "--quiet", "--out", out, *flags], out))
    run_all(jobs, args.jobs)
    problems_at: dict[int, list] = {}  # the same problems (same draws) at each run's image size
    rows = []
    for name, cmd, out in jobs:
        with open(os.path.join(out, "config.yaml")) as f:
            size = int(yaml.safe_load(f)["image_size"])
        if size not in problems_at:
            data = lake.read(args.data_root, "small1", image_size=size)
            problems_at[size] = lake.lake_problems(data, [args.alphabet], args.problems,
                                                   torch.Generator().manual_seed(args.problem_seed))
        problems = problems_at[size]
        accuracies, _ = score(out, problems, {})
        mean, ci = mean_ci95([1 - a for a in accuracies])
        result = json.load(open(os.path.join(out, "result.json")))
        rows.append({"variant": name, "what": VARIANTS[name][0], "error": mean, "ci95": ci,
                     "errors": [1 - a for a in accuracies],
                     "best_iteration": result["val"]["best_iteration"], "iterations": result["iterations"],
                     "train_minutes": result["wall_seconds"] / 60, "command": " ".join(cmd[1:])})
        print(f"{name}: held-out {args.alphabet} error {100 * mean:.1f} ± {100 * ci:.1f}%", flush=True)
    rows = kept_rows(args, rows)
    ensembles = ensemble_rows(work, rows, problems_at, args)
    minutes = (time.perf_counter() - started) / 60
    payload = {"machine": machine(), "settings": vars(args), "problems": args.problems, "rows": rows,
               "ensembles": ensembles, "wall_minutes": minutes, "command": " ".join(sys.argv[1:])}
    write(NAME, payload, report(args, rows, args.problems, minutes, payload["command"], ensembles),
          args.out or RESULTS)


def ensemble_errors(run_dirs: list[str], problems) -> list[float]:
    """Error on each problem of predict's ensemble of the runs' best.pt (``predict --checkpoint A,B,...``:
    the members' class log-probabilities averaged)."""
    from metaphi.experiments.predict import class_probabilities, ensemble, load_for_prediction
    from metaphi.train import choose_checkpoint

    members = [load_for_prediction(choose_checkpoint(d)) for d in run_dirs]
    errors = []
    for p in problems:
        (xs, ys), (xq, yq) = p.task.support, p.task.query
        each = [class_probabilities(algorithm, ck["phi"], (xs, ys), xq, p.ways, invert=spec["invert"], log=True)
                for ck, algorithm, spec in members]
        errors.append(1 - float((ensemble(each).argmax(-1) == yq).float().mean()))
    return errors


def ensemble_rows(work: str, rows: list[dict], problems_at: dict, args) -> list[dict]:
    """predict's ensembles of the SEED_RUNS that have a row in ``rows`` and a finished run in ``work``:
    every pair and all three, each beside its members' single-run errors (their rows') on the same problems."""
    import itertools

    single = {r["variant"]: r["errors"] for r in rows if r["variant"] in SEED_RUNS}
    done = [v for v in SEED_RUNS if v in single and os.path.isfile(os.path.join(work, v, "result.json"))]
    if len(done) < 2:
        return []
    if 32 not in problems_at:
        data = lake.read(args.data_root, "small1", image_size=32)
        problems_at[32] = lake.lake_problems(data, [args.alphabet], args.problems,
                                             torch.Generator().manual_seed(args.problem_seed))
    problems = problems_at[32]
    ensembles = []
    for k in range(2, len(done) + 1):
        for members in itertools.combinations(done, k):
            errors = ensemble_errors([os.path.join(work, v) for v in members], problems)
            members_mean = [sum(single[v][i] for v in members) / k for i in range(len(problems))]
            mean, ci = mean_ci95(errors)
            d, d_ci = mean_ci95([a - b for a, b in zip(errors, members_mean)])
            ensembles.append({"members": list(members), "error": mean, "ci95": ci, "errors": errors,
                              "members_error": sum(members_mean) / len(problems), "vs_members": d,
                              "vs_members_ci95": d_ci})
            print(f"ensemble {'+'.join(members)}: held-out {args.alphabet} error {100 * mean:.1f} ± {100 * ci:.1f}% "
                  f"(its members alone {100 * ensembles[-1]['members_error']:.1f}%)", flush=True)
    return ensembles


def kept_rows(args, rows: list[dict]) -> list[dict]:
    """``rows`` beside the rows of the variants not run this time, kept (``"kept": True``) from the results
    file already in the output folder when it holds the same problems (alphabet, number, seed); in the
    order of VARIANTS."""
    path = os.path.join(args.out or RESULTS, f"{NAME}.json")
    by_name = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        same = all(old["settings"].get(k) == getattr(args, k) for k in ("alphabet", "problems", "problem_seed"))
        if same:
            by_name = {r["variant"]: {**r, "kept": True} for r in old["rows"] if r["variant"] in VARIANTS}
    by_name.update({r["variant"]: r for r in rows})
    return [by_name[v] for v in VARIANTS if v in by_name]


def report(args, rows, n: int, minutes: float, command: str, ensembles: list[dict] = ()) -> str:
    by_name = {r["variant"]: r for r in rows}
    base = by_name.get("recipe")
    lines = [f"### Recipe choices on a held-out alphabet of small1 ({args.alphabet})", "",
             f"`metaphi run protonet --benchmark folder:small1-minus-{args.alphabet} --deploy` (2000 iterations, seed 0, "
             f"one thread), scored on {n} 20-way one-shot problems in Lake et al.'s format from {args.alphabet} alone "
             f"(problem seed {args.problem_seed}; mean ± 95% CI over problems), through predict's path on best.pt.", ""]
    lines.append(markdown_table(["variant", "what changes", "held-out alphabet error %", "best at", "wall min"],
                                [[r["variant"], r["what"], pm(r["error"], r["ci95"], digits=1),
                                  f"{r['best_iteration']} of {r['iterations']}", f"{r['train_minutes']:.0f}"]
                                 for r in rows]))
    if base:
        said = []
        for r in rows:
            against = by_name.get(AGAINST.get(r["variant"], "recipe"))
            if r is base or against is None:
                continue
            d, ci = mean_ci95([a - b for a, b in zip(r["errors"], against["errors"])])
            verdict = "lower" if d + ci < 0 else "higher" if d - ci > 0 else "no different"
            vs = "" if against is base else f" against {against['variant']}"
            said.append(f"{r['variant']}{vs} {100 * d:+.1f} ± {100 * ci:.1f} points ({verdict})")
        lines += ["", "Against the recipe (or the variant named), paired over the same problems (the variant's error "
                  "minus the other's on each problem, mean ± 95% CI): " + "; ".join(said) + ". The recipe takes a variant whose error is "
                  "lower beyond that interval; one that is higher confirms the recipe's own choice."]
    seeds = [by_name[v] for v in SEED_RUNS if v in by_name]
    if len(seeds) > 1:
        errors = [r["error"] for r in seeds]
        mean, ci = mean_ci95(errors)
        lines += ["", f"Run to run: the 32 x 32 recipe trained with seeds 0 to {len(seeds) - 1} made "
                  f"{', '.join(f'{100 * e:.1f}' for e in errors)}% error (mean {100 * mean:.1f}, ± {100 * ci:.1f} "
                  f"over seeds, a spread of {100 * (max(errors) - min(errors)):.1f} points). The paired interval above "
                  "counts the problems' noise only, not the training seed's: a variant run once and no more than "
                  "that spread away from the recipe is not shown to differ from it."]
    if ensembles:
        lines += ["", "predict's ensembles of those runs (`predict --checkpoint A,B[,C]`: the members' class "
                  "log-probabilities averaged; no training beyond the members'), against the mean of their members' "
                  "errors on each problem (mean ± 95% CI, paired):", ""]
        lines.append(markdown_table(
            ["members", "held-out alphabet error %", "members alone %", "ensemble minus members, points"],
            [[" + ".join(e["members"]), pm(e["error"], e["ci95"], digits=1), f"{100 * e['members_error']:.1f}",
              f"{100 * e['vs_members']:+.1f} ± {100 * e['vs_members_ci95']:.1f}"] for e in ensembles]))
    lines += ["", "Wall minutes are of runs that shared the machine's two cores with others. The recipe read "
              "characters at 28 x 28 when these runs were made; since size32's result it reads them at 32 x 32 "
              "(metaphi.tasks.folder.CHARACTER_SIZE), so the recipe row run afresh now trains what size32 trained."]
    lines += ["", f"Command: `.venv/bin/python benchmarks/omniglot_alphabet_choice.py {command}` ({minutes:.0f} "
              "minutes wall clock, finished runs reused; rows of variants not named kept from the file before)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
