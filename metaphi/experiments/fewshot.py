"""Few-shot learning: meta-train an algorithm on a benchmark's tasks and test it on held-out ones
(``metaphi run``), and re-test a saved run (``metaphi eval``).

A run is described by one :class:`RunConfig`; the sizes it leaves open (``None``) are the chosen
family's defaults for the benchmark (its recipe: ProtoNet's more-ways episodes and max-pooling Conv4
on images, ...), then the benchmark's own (:func:`complete`); the training split is rotated where the
run does not say for character data (:func:`training_data`). ``run`` prints what was chosen
(:func:`describe_choices`) and writes it into config.yaml. The chosen
algorithm's options (iMAML's λ, ...) and the estimator's (the implicit solver, ES's population, ...)
are nested mappings, ``algorithm_options`` and ``estimator_options``, checked against the options
dataclass of that family and that estimator: an option of another family or estimator is refused
with its name, never ignored.

A run writes checkpoint.pt, metrics.jsonl, result.json and config.yaml (the fully resolved config:
``metaphi run --config OUT/config.yaml --out NEW`` runs it again) into ``out``; the scratch and
pre-training baselines run beside the algorithm unless ``baselines`` is off.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

from metaphi.algorithms import ALGORITHMS
from metaphi.config import NONFINITE_EXIT, UsageError, check, option, to_dict, writable_dir
from metaphi.experiments.report import machine, save_config, strict, write_json
from metaphi.models import Conv4
from metaphi.outer import ESTIMATORS

#: the sizes a benchmark (or a family, for a benchmark) decides when the config leaves them open
SIZES = ("ways", "shots", "query", "inner_lr", "inner_steps", "eval_steps", "meta_batch", "iterations", "eval_tasks",
         "meta_lr")


@dataclass
class RunConfig:
    """``metaphi run``: meta-train ``algorithm`` on ``benchmark`` and test it on held-out tasks."""

    algorithm: str | None = option(None, "the algorithm to meta-train", choices=ALGORITHMS, positional=True)
    benchmark: str = option("glyphs", "a benchmark name (glyphs and sinusoid are built in) or folder:PATH")
    data_root: str | None = option(None, "folder with the data set's archives (none: $METAPHI_DATA or "
                                         "~/.cache/metaphi/data)")
    download: bool = option(False, "download missing archives (checked by SHA-256)")
    within_alphabet: bool = option(False, "test and validation tasks take all their classes from one alphabet (group)")
    train_within_alphabet: float | None = option(None, "the fraction of meta-training tasks, in [0, 1], that take all "
                                                       "their classes from one alphabet (group; a folder gives groups "
                                                       "as PATH/<group>/<class>/<image>) (none: 0)", check="nonneg")
    image_size: int | None = option(None, "folder:PATH only: resize images to this size (none: inferred from a "
                                          "sample of the images: 32 for grey images on a light background "
                                          "(characters), else 84)", check="positive")
    channels: int | None = option(None, "folder:PATH only: 1 (grey) or 3 (RGB; none: inferred, 1 when every "
                                        "sampled image is grey)", choices=(1, 3))
    invert: bool | None = option(None, "folder:PATH only: dark ink on light paper becomes high (none: inferred, "
                                       "on when the images are grey on a light background; --no-invert forces off)")
    split_file: str | None = option(None, "folder:PATH only: a file mapping class -> train/val/test")
    deploy: bool = option(False, "folder:PATH only: a model for `metaphi predict`: every class but a validation fifth "
                                 "trains, no test split; result.json has no test score (test: null) but the "
                                 "validation scores of the best and last φ; no baselines")
    val_fraction: float | None = option(None, "--deploy only: the fraction of the folder's classes held out to "
                                              "validate (and choose best.pt) instead of training (none: 0.2)",
                                        check="positive")
    ways: int | None = option(None, "classes per task (none: the benchmark's)", check="positive")
    train_ways: int | None = option(None, "classes per meta-training task, for learners that take any number "
                                          "(protonet, matching, relation; none: --ways)", check="positive")
    init: str | None = option(None, "start the network's body from a saved run's (ssl: insists on a self-supervised "
                                    "run)", metavar="[ssl:]CHECKPOINT")
    shots: int | None = option(None, "support examples per class (K) for meta-training (none: the benchmark's)",
                               check="positive")
    query: int | None = option(None, "query examples per class for meta-training (none: the benchmark's)",
                               check="positive")
    rotations: bool | None = option(None, "each training class also rotated by 90, 180 and 270 degrees, each rotation "
                                          "a new class (Omniglot's protocol in MAML and ProtoNets; 4x the training "
                                          "images in memory); validation and test classes untouched (none: on for "
                                          "character data: Omniglot, a folder of dark ink on light paper)")
    reflections: bool | None = option(None, "each rotated class also mirrored left-right, a new class too; turns "
                                            "--rotations on (the 8 symmetries of the square; 8x the training images in "
                                            "memory); none: the family's recipe, off unless it says on")
    augment: bool | None = option(None, "move every training-episode image by its own random affine map: shift up to "
                                        "±10% of the size, zoom 0.9-1.1, rotation up to ±15°, shear up to ±10° (the "
                                        "usual small-affine ranges for characters); validation and test episodes "
                                        "untouched (none: the family's recipe; off unless it says on)")
    augment_strength: float = option(1.0, "--augment only: every range above times this, in (0, 2]", check="positive")
    augment_elastic: float | None = option(None, "--augment only: also bend every image by a smooth random field, "
                                                 "its 4x4 control points moved by up to this fraction of the "
                                                 "image's size (elastic distortion, Simard et al. 2003), in "
                                                 "[0, 0.2] (none: the family's recipe; 0 unless it says)",
                                           check="nonneg")
    pool: str | None = option(None, "how the Conv4 backbone downsamples: stride-2 convolutions (MAML's Omniglot "
                                    "network), 2x2 max pooling (ProtoNet's; slower, stronger) or max pooling after "
                                    "the first three blocks only (max3: a feature grid twice as fine) (none: the "
                                    "family's recipe, else the benchmark's)", choices=Conv4.POOLS)
    log: str | None = option(None, "also log the curves to: a comma list of csv (OUT/metrics.csv), tensorboard "
                                   "(OUT/tensorboard; needs tensorboard), wandb (needs wandb; WANDB_MODE=offline "
                                   "keeps it local) (none: metrics.jsonl only)")
    model: str | None = option(None, "the backbone on image benchmarks: conv4, conv4-WIDTH (WIDTH filters a layer, "
                                     "not 64), resnet12 (ResNet-12), wrn-28-10 (any wrn-DEPTH-WIDEN), or "
                                     "timm:ARCHITECTURE (needs timm; architecture only, no weights downloaded) (none: "
                                     "the benchmark's Conv4)")
    eval_shots: int | None = option(None, "support examples per class at test (none: the benchmark's, else --shots)",
                                    check="positive")
    eval_query: int | None = option(None, "query examples per class at test (none: the benchmark's, else --query)",
                                    check="positive")
    inner_steps: int | None = option(None, "inner steps during meta-training (none: the family's or benchmark's)",
                                     check="nonneg")
    eval_steps: int | None = option(None, "inner steps at test (none: the benchmark's)", check="nonneg")
    inner_lr: float | None = option(None, "inner step size α (none: the benchmark's)", check="positive")
    meta_batch: int | None = option(None, "tasks per meta-update (none: the benchmark's)", check="positive")
    meta_lr: float | None = option(None, "outer step size (none: the benchmark's)", check="positive")
    lr_schedule: str | None = option(None, "the outer step size over the iterations: constant, or cosine (decays "
                                                 "from --meta-lr to --lr-min-factor x --meta-lr at the last "
                                                 "iteration) (none: the family's recipe, else constant)",
                                     choices=("constant", "cosine"))
    warmup: int = option(0, "iterations of linear warm-up of the outer step size to --meta-lr before the schedule "
                            "(fewer than --iterations)", check="nonneg")
    lr_min_factor: float = option(0.0, "--lr-schedule cosine only: the step size at the last iteration, as a "
                                       "fraction of --meta-lr", check="unit")
    optimizer: str = option("adam", "outer optimizer", choices=("adam", "sgd"))
    estimator: str | None = option(None, "how φ's update is estimated (none: the algorithm's own)", choices=ESTIMATORS)
    algorithm_options: dict = option(default_factory=dict, cli=False,
                                     help="the chosen family's own options (flags in the family groups below)")
    estimator_options: dict = option(default_factory=dict, cli=False,
                                     help="the chosen estimator's options (flags in the estimator groups below)")
    iterations: int | None = option(None, "meta-training iterations (none: the benchmark's)", check="nonneg")
    eval_tasks: int | None = option(None, "test tasks (none: the benchmark's, 600)", check="positive")
    val_every: int = option(100, "validate every this many iterations", check="positive")
    val_tasks: int = option(100, "validation tasks", check="positive")
    seed: int = option(0, "seed of the initial weights, the training tasks and the estimator's randomness")
    threads: int | None = option(None, "torch CPU threads (none: torch's choice, lowered to the cores left free by "
                                       "other work; OMP_NUM_THREADS, if set, is respected)", check="positive",
                                 metavar="N")
    eval_seed: int = option(1234, "seed of the fixed test tasks")
    device: str = option("cpu", "torch device", check="device")
    out: str | None = option(None, "output folder (none: runs/ALGO-BENCHMARK-WAYSwSHOTSs-seedSEED)")
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    baselines: bool = option(True, "also run the scratch and pre-training baselines (--no-baselines skips them)")
    baseline_steps: int = option(10, "fine-tuning steps of the baselines at test", check="nonneg")
    quiet: bool = option(False, "no progress bars")


@dataclass
class EvalConfig:
    """``metaphi eval``: re-test a saved run on its fixed test tasks."""

    checkpoint: str | None = option(None, "a run's folder, or its checkpoint.pt or best.pt: a folder, or a "
                                          "checkpoint.pt beside a best.pt, means best.pt (the best validation "
                                          "score) unless --last", positional=True)
    last: bool = option(False, "take the run's checkpoint.pt (its last iteration) instead of its best.pt")
    eval_tasks: int | None = option(None, "test tasks (none: the run's)", check="positive")
    eval_steps: int | None = option(None, "inner steps at test (none: the run's)", check="nonneg")
    eval_seed: int | None = option(None, "seed of the test tasks (none: the run's)")
    data_root: str | None = option(None, "folder with the data set's archives (none: the run's)")
    within_alphabet: bool = option(False, "test tasks take all their classes from one alphabet (group)")
    model_factory: str | None = option(None, "rebuild a model of your own from the checkpoint by this importable "
                                             "callable, the one the checkpoint names (built by metaphi.models."
                                             "from_factory); a checkpoint's callable is never imported unless "
                                             "named here", metavar="MODULE:CALLABLE")
    threads: int | None = option(None, "torch CPU threads (none: torch's choice)", check="positive", metavar="N")
    device: str = option("cpu", "torch device", check="device")
    out: str | None = option(None, "write the result JSON to this file", check="output_file")
    quiet: bool = option(False, "no progress bar")


# -- the options of families and estimators -----------------------------------------------------------

def option_owners() -> dict[str, list[tuple[str, str]]]:
    """Every family and estimator option name -> its owners, ``("algorithm", name)`` or ``("estimator", name)``."""
    from metaphi.algorithms import options_class
    from metaphi.outer import estimator_options_class

    owners: dict[str, list[tuple[str, str]]] = {}
    for kind, names, of in (("algorithm", ALGORITHMS, options_class), ("estimator", ESTIMATORS,
                                                                         estimator_options_class)):
        for name in names:
            for f in dataclasses.fields(of(name)):
                owners.setdefault(f.name, []).append((kind, name))
    return owners


def route_options(values: dict, where: str = "") -> tuple[dict, dict]:
    """Flat family and estimator options (from flags, or a compare method's ``key=value``) split into
    ``(algorithm_options, estimator_options)`` by the kind of their owners; a name both kinds use goes
    to both, and :func:`check_options` keeps it where it applies."""
    owners = option_owners()
    algorithm_options, estimator_options = {}, {}
    for key, value in values.items():
        kinds = {kind for kind, _ in owners.get(key, ())}
        if not kinds:
            raise UsageError(f"{where}unknown option '{key}'")
        if "algorithm" in kinds:
            algorithm_options[key] = value
        if "estimator" in kinds:
            estimator_options[key] = value
    return algorithm_options, estimator_options


def _listed(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _not_applicable(key: str, algorithm: str, estimator: str) -> UsageError:
    """``--KEY applies to OWNERS, not ALGORITHM`` (or the estimator): one line, what it applies to."""
    owners = option_owners().get(key, [])
    flag = "--" + key.replace("_", "-")
    families = [name for kind, name in owners if kind == "algorithm"]
    estimators = [name for kind, name in owners if kind == "estimator"]
    if not owners:
        return UsageError(f"{flag} is not an option of any algorithm or estimator")
    parts = ([_listed(families)] if families else []) + (
        [f"the {_listed(estimators)} estimator{'s' if len(estimators) > 1 else ''}"] if estimators else [])
    chosen = (estimator if not families else algorithm if not estimators
              else f"{algorithm} with the {estimator} estimator")
    return UsageError(f"{flag} applies to {' and '.join(parts)}, not {chosen}")


def check_options(config: RunConfig, estimator: str):
    """``(family options, estimator options)``: the options dataclasses of ``config.algorithm`` and
    ``estimator`` filled from the config's mappings and checked. An option of another family or
    estimator is a UsageError naming it and what it applies to."""
    from metaphi.algorithms import algorithm_options, options_class
    from metaphi.outer import estimator_options, estimator_options_class

    takes = {"algorithm": {f.name for f in dataclasses.fields(options_class(config.algorithm))},
             "estimator": {f.name for f in dataclasses.fields(estimator_options_class(estimator))}}
    given = {"algorithm": dict(config.algorithm_options), "estimator": dict(config.estimator_options)}
    # a name families and estimators share was routed to both mappings: it stays where it applies
    for key in set(given["algorithm"]) & set(given["estimator"]):
        for kind, other in (("algorithm", "estimator"), ("estimator", "algorithm")):
            if key not in takes[kind] and key in takes[other]:
                del given[kind][key]
    for kind in ("algorithm", "estimator"):
        for key in given[kind]:
            if key not in takes[kind]:
                raise _not_applicable(key, config.algorithm, estimator)
    return (algorithm_options(config.algorithm, given["algorithm"]),
            estimator_options(estimator, given["estimator"]))


# -- a run's settings ---------------------------------------------------------------------------------

def benchmark_options(config) -> dict:
    """What ``build_benchmark`` takes besides the name and the data root (also stored with the run)."""
    return {"download": config.download, "within_group": config.within_alphabet, "image_size": config.image_size,
            "channels": config.channels, "invert": config.invert, "split_file": config.split_file,
            **({"deploy": True} if getattr(config, "deploy", False) else {}),
            **({"val_fraction": config.val_fraction} if getattr(config, "val_fraction", None) is not None else {})}


def load_benchmark(config):
    from metaphi.tasks.registry import build_benchmark, folder_path

    if getattr(config, "deploy", False) and folder_path(config.benchmark) is None:
        raise UsageError(f"--deploy applies to folder:PATH benchmarks only, not {config.benchmark}")
    if getattr(config, "val_fraction", None) is not None:
        if not config.deploy:
            raise UsageError("--val-fraction applies with --deploy only (other runs split 60/20/20 or by --split-file)")
        if not 0.0 < config.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}")
    logger_names(config)
    benchmark = build_benchmark(config.benchmark, config.data_root, **benchmark_options(config))
    check_model(config, benchmark)
    return training_data(config, benchmark)


def training_data(config: RunConfig, benchmark):
    """``benchmark`` with its training split as ``config`` asks (``--rotations``, ``--augment``; where it
    does not say, the recipe's: rotations for character data unless the family's recipe says otherwise,
    augmentation where it has it): through the benchmark, so every family's training sampler (episodes or
    pooled batches) sees it and the validation and test splits do not. What was decided is ``benchmark.training``."""
    from metaphi.tasks.transforms import MAX_ELASTIC, MAX_STRENGTH

    recipe = family_recipe(config.algorithm, benchmark)
    rotations = config.rotations
    if rotations is None:  # --reflections mirrors the rotations: it brings them where the run does not say
        rotations = bool(config.reflections) or recipe.get("rotations", benchmark.rotates_by_default())
    augment = config.augment if config.augment is not None else bool(recipe.get("augment", False))
    elastic = config.augment_elastic if config.augment_elastic is not None else float(recipe.get("augment_elastic", 0.0))
    if config.augment_elastic and not augment:
        raise UsageError("--augment-elastic applies with --augment only")
    if augment and not 0.0 <= elastic <= MAX_ELASTIC:
        raise UsageError(f"--augment-elastic must be in [0, {MAX_ELASTIC:g}], got {elastic}")
    reflections = config.reflections if config.reflections is not None else bool(recipe.get("reflections", False))
    if reflections and not rotations:
        raise UsageError("--reflections mirrors the rotated classes: it needs rotations (drop --no-rotations)")
    if config.augment_strength != 1.0 and not augment:
        raise UsageError("--augment-strength applies with --augment only")
    if augment and not 0.0 < config.augment_strength <= MAX_STRENGTH:
        raise UsageError(f"--augment-strength must be in (0, {MAX_STRENGTH:g}], got {config.augment_strength}")
    within = config.train_within_alphabet or 0.0
    if not 0.0 <= within <= 1.0:
        raise UsageError(f"--train-within-alphabet must be in [0, 1], got {within}")
    return benchmark.with_training(rotations=rotations, augment=augment, augment_strength=config.augment_strength,
                                   reflections=reflections, elastic=elastic if augment else 0.0, within_group=within)


def family_recipe(algorithm: str | None, benchmark) -> dict:
    """The settings family ``algorithm`` takes on ``benchmark`` where the run gives none (its recipe:
    :func:`metaphi.algorithms.family_defaults`), told what the benchmark is: image classes or not,
    character data, a folder, its training classes, the images of its smallest training class and its
    image size."""
    from metaphi.algorithms import family_defaults
    from metaphi.tasks.registry import folder_path

    if algorithm is None:
        return {}
    images = bool(benchmark.splits)
    classes = benchmark.num_classes("train") if images else 0
    smallest = int(benchmark.splits["train"].counts.min()) if images and classes else 0
    facts = {**benchmark.defaults, "images": images, "characters": benchmark.characters,
             "folder": folder_path(benchmark.name) is not None, "train_classes": classes,
             "train_class_images": smallest,
             "image_size": min(benchmark.splits["train"].image_shape[1:]) if images else 0}
    return family_defaults(algorithm, facts)


def with_input_settled(config: RunConfig, benchmark) -> RunConfig:
    """``config`` with the image size, channels and ink polarity a folder was read with, where they were
    inferred: config.yaml, the checkpoint and ``metaphi eval`` then read the folder the same way, whatever
    is added to it later."""
    origin = benchmark.input_spec().get("origin")
    if not origin:
        return config
    spec = benchmark.input_spec()
    return dataclasses.replace(config, image_size=spec["height"], channels=spec["channels"], invert=spec["invert"])


def default_estimator(algorithm) -> str:
    return algorithm.estimators[0] if algorithm.estimators else "first-order"


def complete(config: RunConfig, benchmark) -> RunConfig:
    """``config`` with every size it leaves open decided (the family's default for this benchmark, else
    the benchmark's), the estimator named and the family's and estimator's options written out in full:
    the run's fully resolved config. The family's recipe (:func:`family_recipe`) also decides the
    training ways, the pooling and the step-size schedule where the config leaves them open; the
    rotations and augmentation are what :func:`training_data` made of the benchmark."""
    if config.algorithm is None:
        raise UsageError(f"name the algorithm: metaphi run ALGORITHM (valid: {', '.join(ALGORITHMS)})")
    for key in ("algorithm_options", "estimator_options"):
        if not isinstance(getattr(config, key), dict):
            raise UsageError(f"{key} must be a mapping of options, got {getattr(config, key)!r}")
    recipe = family_recipe(config.algorithm, benchmark)
    d = {**benchmark.defaults, **recipe}
    sizes = {k: getattr(config, k) if getattr(config, k) is not None else d.get(k) for k in SIZES}
    sizes["eval_shots"] = config.eval_shots or d.get("eval_shots") or sizes["shots"]
    # the recipe shapes training episodes only: tests keep the benchmark's queries (or the run's --query)
    sizes["eval_query"] = (config.eval_query or d.get("eval_query")
                           or (config.query if config.query is not None else benchmark.defaults.get("query"))
                           or sizes["query"])
    training = {"rotations": benchmark.training.get("rotations", bool(config.rotations)),
                "reflections": benchmark.training.get("reflections", bool(config.reflections)),
                "augment": benchmark.training.get("augment", bool(config.augment)),
                "augment_elastic": benchmark.training.get("augment_elastic", config.augment_elastic or 0.0),
                "train_within_alphabet": benchmark.training.get("within_group", config.train_within_alphabet or 0.0),
                "pool": None if not is_conv4(config)  # another backbone
                else config.pool or recipe.get("pool") or benchmark.backbone.get("pool"),
                "lr_schedule": config.lr_schedule or recipe.get("lr_schedule") or "constant",
                "train_ways": config.train_ways}
    if config.train_ways is None and recipe.get("train_ways") and sizes["ways"] is not None:
        # the recipe's ways (already capped by the training classes), never fewer than the tests'
        training["train_ways"] = max(sizes["ways"], recipe["train_ways"])
    probe = probe_algorithm(config.algorithm, benchmark, sizes)
    estimator = config.estimator or default_estimator(probe)
    resolved = dataclasses.replace(config, **sizes, **training, estimator=estimator)
    check(resolved)
    family, estimator_settings = check_options(resolved, estimator)  # numbers first, then whether they fit
    check_fits(resolved, probe)
    return dataclasses.replace(resolved, algorithm_options=to_dict(family),
                               estimator_options=to_dict(estimator_settings))


def probe_algorithm(name: str, benchmark, sizes: dict):
    """Algorithm ``name`` as built for ``sizes`` (with its default options), to ask what it takes."""
    import torch

    from metaphi.algorithms import create_algorithm

    with torch.random.fork_rng():  # its initial weights are thrown away: leave the global generator alone
        return create_algorithm(name, benchmark, sizes["ways"], sizes["inner_lr"], sizes["inner_steps"],
                                sizes["eval_steps"])


def check_fits(config: RunConfig, algorithm) -> None:
    """A UsageError when the estimator or the training tasks' size of ``config`` do not fit ``algorithm``."""
    from metaphi.outer import BLACK_BOX

    if algorithm.estimators and config.estimator not in tuple(algorithm.estimators) + BLACK_BOX:
        raise UsageError(f"--estimator {config.estimator} does not apply to {config.algorithm} "
                         f"(valid: {', '.join(algorithm.estimators)})")
    if (config.train_ways or config.ways) != config.ways and not getattr(algorithm, "any_ways", False):
        raise UsageError(f"--train-ways: {config.algorithm} learns tasks of one size (only protonet, matching and "
                         f"relation take any number of classes)")


def settings(config: RunConfig) -> dict:
    """The sizes of a completed config, as the checkpoint and compare's reuse test record them."""
    return {k: getattr(config, k) for k in SIZES + ("eval_shots", "eval_query")}


# -- the pieces of a run: the algorithm, its estimator, meta-training ---------------------------------

def logger_names(config) -> list[str]:
    """``--log``'s loggers, checked (:func:`metaphi.loggers.check_loggers`)."""
    from metaphi.loggers import check_loggers

    text = getattr(config, "log", None)
    return check_loggers([n.strip() for n in text.split(",") if n.strip()] if text else [])


def is_conv4(config) -> bool:
    """Whether the run's backbone is the benchmark's Conv4 (no ``--model``, ``conv4`` or ``conv4-WIDTH``)."""
    from metaphi.models import model_named

    name = getattr(config, "model", None)
    try:
        return not name or model_named(name)["name"] == "conv4"
    except ValueError:  # an unknown name: check_model says so
        return False


def with_chosen_model(config: RunConfig, benchmark):
    """``benchmark`` with the backbone ``--model`` names, or its Conv4 pooled as ``--pool`` says and as
    wide as ``--model conv4-WIDTH`` says."""
    from metaphi.models import model_named

    name = getattr(config, "model", None)
    spec = model_named(name) if name else {"name": "conv4"}
    if spec["name"] != "conv4":
        return benchmark.with_model(spec)
    return benchmark.with_backbone(pool=getattr(config, "pool", None), hidden=spec.get("hidden"))


def check_model(config: RunConfig, benchmark) -> None:
    """A UsageError, before anything runs, for a ``--model`` that does not exist or cannot be built here."""
    import importlib.util

    from metaphi.models import model_named

    name = getattr(config, "model", None)
    if getattr(config, "pool", None) and is_conv4(config) and "pool" not in benchmark.backbone:
        raise UsageError(f"--pool chooses how Conv4 downsamples; benchmark {benchmark.name} has no Conv4")
    if not name:
        return
    try:
        spec = model_named(name)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    if not benchmark.splits:
        raise UsageError(f"--model applies to image benchmarks, and {benchmark.name} is not one")
    if spec["name"] != "conv4" and config.pool:
        raise UsageError(f"--pool chooses how Conv4 downsamples; --model {name} has its own")
    if spec["name"] == "timm" and importlib.util.find_spec("timm") is None:
        raise UsageError(f"--model {name} needs the timm package: pip install timm")


def make_algorithm(config: RunConfig, benchmark):
    """The algorithm of a completed ``config``: its initial weights from ``config.seed`` (touching no
    global random state), its body from ``config.init`` when given."""
    import torch

    from metaphi.algorithms import create_algorithm

    benchmark = with_chosen_model(config, benchmark)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        algorithm = create_algorithm(config.algorithm, benchmark, config.ways, config.inner_lr, config.inner_steps,
                                     config.eval_steps, options=config.algorithm_options)
    if config.init:
        from metaphi.algorithms.ssl import start_from
        algorithm = start_from(algorithm, config.init)
    return algorithm


def make_estimator(config: RunConfig, algorithm, progress: bool = False):
    """The estimator of a completed ``config``, refused when it does not fit ``algorithm``."""
    from metaphi.outer import build_estimator

    check_fits(config, algorithm)
    if config.estimator_options.get("compile") and progress:
        print(f"{config.algorithm}: --compile: the first meta-iteration compiles the meta-gradient (tens of seconds "
              "to minutes on a CPU; cached on disk for runs with the same shapes)", file=sys.stderr, flush=True)
    return build_estimator(config.estimator, options=config.estimator_options)


def meta_train_algorithm(config: RunConfig, benchmark, algorithm, estimator, out_dir: str | None = None,
                         validate=None, run: dict | None = None, progress: bool = False):
    """Meta-train ``algorithm`` on ``benchmark``'s training tasks as ``config`` says; the TrainState."""
    from metaphi.loggers import Loggers
    from metaphi.train import TrainConfig, check_schedule, meta_train

    sample_train = algorithm.training_tasks(benchmark, config.train_ways or config.ways, config.shots, config.query)
    train = TrainConfig(iterations=config.iterations if algorithm.trains else 0, meta_batch=config.meta_batch,
                        meta_lr=config.meta_lr, optimizer=config.optimizer, seed=config.seed,
                        val_every=config.val_every, device=config.device, lr_schedule=config.lr_schedule,
                        warmup=config.warmup, lr_min_factor=config.lr_min_factor)
    try:
        check_schedule(train)
    except ValueError as e:
        raise UsageError(str(e)) from None
    resume = config.resume and out_dir is not None and os.path.exists(os.path.join(out_dir, "checkpoint.pt"))
    loggers = Loggers(logger_names(config), out_dir, to_dict(config)) if out_dir else None
    return meta_train(algorithm, estimator, sample_train, train, out_dir=out_dir, validate=validate, resume=resume,
                      run=run, progress=progress, higher_is_better=benchmark.problem.higher_is_better,
                      loggers=loggers)


def train_and_test(config: RunConfig, benchmark, out_dir: str, progress: bool = True) -> dict:
    """Meta-train the algorithm of a completed ``config`` and test it; returns its result dict (also
    written to ``out_dir``/result.json)."""
    from metaphi import distributed
    from metaphi.evaluate import evaluate

    algorithm = make_algorithm(config, benchmark)
    estimator = make_estimator(config, algorithm, progress)
    if not has_test(benchmark):  # deploy mode: validated, kept for predict, not tested
        return train_without_test(config, benchmark, algorithm, estimator, out_dir, progress)
    test_sampler = benchmark.episodes("test", config.ways, config.eval_shots, config.eval_query)
    validate = validator(config, benchmark, algorithm)
    train_ways = config.train_ways or config.ways
    run = run_record(config, benchmark)
    started = time.perf_counter()
    state = meta_train_algorithm(config, benchmark, algorithm, estimator, out_dir, validate, run, progress)
    if not distributed.is_main():  # under torchrun rank 0 alone tests and writes the results
        return {"algorithm": config.algorithm, "rank": distributed.rank()}
    test = evaluate(algorithm, state.phi, test_sampler, config.eval_tasks, config.eval_seed, device=config.device,
                    progress=progress, desc=f"test {config.algorithm}")
    result = {
        "algorithm": config.algorithm, "benchmark": benchmark.name, "metric": benchmark.problem.metric,
        "higher_is_better": benchmark.problem.higher_is_better,
        "mean": test["mean"], "ci95": test["ci95"], "per_step": test["per_step"],
        "iterations": state.iteration, "wall_seconds": time.perf_counter() - started,
        "train_seconds": state.train_seconds, "test_seconds": test["seconds"], "seed": config.seed,
        "eval_seed": config.eval_seed, "eval_tasks": config.eval_tasks, "ways": config.ways, "shots": config.shots,
        "query": config.query, "eval_shots": config.eval_shots, "eval_query": config.eval_query,
        "inner_lr": config.inner_lr, "inner_steps": config.inner_steps, "eval_steps": config.eval_steps,
        "meta_batch": config.meta_batch, "meta_lr": config.meta_lr, "estimator": config.estimator,
        "parameters": sum(v.numel() for v in state.phi.values()), "machine": machine(),
        "train_ways": train_ways, "init": config.init,
        "checkpoint": os.path.join(out_dir, "checkpoint.pt"), "processes": distributed.world_size(),
        "best_iteration": state.best["iteration"] if state.best else None,
        "best_val": state.best["val"] if state.best else None,
    }
    best = best_result(algorithm, state, test_sampler, config, out_dir, progress)
    if best is not None:
        result["best"] = best
    write_json(result, os.path.join(out_dir, "result.json"))
    return result


def validator(config: RunConfig, benchmark, algorithm):
    """φ -> the mean score on ``config.val_tasks`` fixed validation tasks, or None without validation tasks."""
    from metaphi.evaluate import evaluate

    if "val" not in benchmark.splits and benchmark.regression_tasks is None:
        return None
    val_sampler = benchmark.episodes("val", config.ways, config.eval_shots, config.eval_query)
    return lambda phi: evaluate(algorithm, phi, val_sampler, config.val_tasks, config.eval_seed + 1,
                                device=config.device)["mean"]


def run_record(config: RunConfig, benchmark) -> dict:
    """What a checkpoint records of its run: enough for ``eval`` and ``predict`` to rebuild the data and inputs."""
    return {"benchmark": benchmark.name, "data_root": config.data_root, "benchmark_options": benchmark_options(config),
            **settings(config), "estimator": config.estimator, "seed": config.seed, "eval_seed": config.eval_seed,
            "input": benchmark.input_spec(), "train_ways": config.train_ways or config.ways, "init": config.init,
            "training": training_record(config)}


#: what the run makes of its training data (resuming with other values is refused)
TRAINING_DATA = ("rotations", "reflections", "augment", "augment_strength", "augment_elastic", "pool")
#: recorded only where not 0, so that checkpoints written before they existed still resume
TRAINING_DATA_IF_SET = ("train_within_alphabet",)


def training_record(config) -> dict:
    """What ``config`` makes of the training data, as the run record keeps it."""
    return {**{key: getattr(config, key) for key in TRAINING_DATA},
            **{key: getattr(config, key) for key in TRAINING_DATA_IF_SET if getattr(config, key, None)}}


def has_test(benchmark) -> bool:
    """Whether ``benchmark`` has test tasks (a folder in deploy mode has none)."""
    return benchmark.regression_tasks is not None or "test" in benchmark.splits


def train_without_test(config: RunConfig, benchmark, algorithm, estimator, out_dir: str, progress: bool) -> dict:
    """Deploy mode: meta-train on a benchmark with no test split, validating; the result says
    ``"test": None`` and gives the validation scores of the last φ and of the best (best.pt)."""
    from metaphi import distributed

    validate = validator(config, benchmark, algorithm)
    train_ways = config.train_ways or config.ways
    run = run_record(config, benchmark)
    started = time.perf_counter()
    state = meta_train_algorithm(config, benchmark, algorithm, estimator, out_dir, validate, run, progress)
    if not distributed.is_main():
        return {"algorithm": config.algorithm, "rank": distributed.rank(), "deploy": True}
    last_val = next((row["val"] for row in reversed(state.history) if "val" in row), None)
    result = {
        "algorithm": config.algorithm, "benchmark": benchmark.name, "metric": benchmark.problem.metric,
        "higher_is_better": benchmark.problem.higher_is_better, "deploy": True, "test": None,
        "val": {"last": last_val, "best": state.best["val"] if state.best else None,
                "best_iteration": state.best["iteration"] if state.best else None, "tasks": config.val_tasks},
        "iterations": state.iteration, "wall_seconds": time.perf_counter() - started,
        "train_seconds": state.train_seconds, "seed": config.seed, "ways": config.ways, "shots": config.shots,
        "query": config.query, "eval_shots": config.eval_shots, "eval_query": config.eval_query,
        "train_ways": train_ways, "estimator": config.estimator, "machine": machine(),
        "checkpoint": os.path.join(out_dir, "checkpoint.pt"),
        "best_checkpoint": os.path.join(out_dir, "best.pt") if state.best else None,
    }
    write_json(result, os.path.join(out_dir, "result.json"))
    return result


def best_result(algorithm, state, test_sampler, config: RunConfig, out_dir: str, progress: bool = False) -> dict | None:
    """``{"mean", "ci95", "iteration"}`` of the run's best.pt (its best validation score) on the same test
    tasks as the last φ, or None when it kept none or the best is the last."""
    from metaphi.evaluate import evaluate
    from metaphi.train import BEST, load_checkpoint

    path = os.path.join(out_dir, BEST)
    if not state.best or state.best["iteration"] == state.iteration or not os.path.isfile(path):
        return None
    ck = load_checkpoint(path)
    phi = {k: v.to(config.device) for k, v in ck["phi"].items()}
    test = evaluate(algorithm, phi, test_sampler, config.eval_tasks, config.eval_seed, device=config.device,
                    progress=progress, desc=f"test {config.algorithm} (best)")
    return {"mean": test["mean"], "ci95": test["ci95"], "iteration": ck["iteration"]}


def baseline_config(config: RunConfig, name: str, benchmark) -> RunConfig:
    """The config of baseline ``name`` beside a completed run: the same tasks and sizes,
    ``baseline_steps`` fine-tuning steps at test, the baseline's own estimator with those of the run's
    estimator options that it takes too (``loop``, ``task_chunk``, ...)."""
    from metaphi.outer import estimator_options_class

    sizes = {**settings(config), "eval_steps": config.baseline_steps}
    estimator = default_estimator(probe_algorithm(name, benchmark, sizes))
    takes = {f.name for f in dataclasses.fields(estimator_options_class(estimator))}
    baseline = dataclasses.replace(config, algorithm=name, init=None, train_ways=None, eval_steps=config.baseline_steps,
                                   estimator=estimator, algorithm_options={},
                                   estimator_options={k: v for k, v in config.estimator_options.items() if k in takes})
    family, estimator_settings = check_options(baseline, estimator)
    return dataclasses.replace(baseline, algorithm_options=to_dict(family),
                               estimator_options=to_dict(estimator_settings))


#: what ``run`` reports having decided, where the command line left it open: (field, flag, wording)
CHOICES = (("ways", "--ways", lambda v: f"{v}-way"), ("shots", "--shots", lambda v: f"{v}-shot tasks"),
           ("train_ways", "--train-ways", lambda v: f"{v}-way training episodes"),
           ("query", "--query", lambda v: f"{v} queries per class"),
           ("meta_batch", "--meta-batch", lambda v: f"{v} task{'s' if v != 1 else ''} per step"),
           ("rotations", "--rotations", lambda v: "rotations as new classes" if v else "no rotations"),
           ("reflections", "--reflections", lambda v: "mirror images as new classes" if v else None),
           ("augment", "--augment", lambda v: "random affine augmentation" if v else "no augmentation"),
           ("augment_elastic", "--augment-elastic", lambda v: f"elastic distortion up to {v:g} of the size" if v
            else None),
           ("pool", "--pool", lambda v: f"{v} pooling"),
           ("lr_schedule", "--lr-schedule", lambda v: f"{v} step size"),
           ("iterations", "--iterations", lambda v: f"{v} iterations"))


def describe_choices(given: RunConfig, config: RunConfig) -> str:
    """One line: what the run decided of what ``given`` left open (the family's recipe, else the
    benchmark's defaults), each with the flag that changes it."""
    chosen = [(flag, say(getattr(config, key))) for key, flag, say in CHOICES
              if getattr(given, key) is None and getattr(config, key) is not None]
    chosen = [(flag, words) for flag, words in chosen if words is not None]  # None: nothing worth saying
    if not chosen:
        return f"{config.algorithm} on {config.benchmark}: every setting as given"
    listed = ", ".join(f"{words} ({flag})" for flag, words in chosen)
    return f"{config.algorithm} on {config.benchmark}, chosen where not given: {listed}"


def outputs_folder(config: RunConfig, benchmark_name: str) -> str:
    return config.out or os.path.join("runs", f"{config.algorithm}-{benchmark_name}-{config.ways}w{config.shots}s-"
                                              f"seed{config.seed}")


def format_table(result: dict) -> str:
    metric = result["metric"]
    lines = [f"{result['benchmark']} {result['ways']}-way {result['eval_shots']}-shot, {metric} on "
             f"{result['eval_tasks']} test tasks (seed {result['eval_seed']}), ± 95% CI",
             f"{'method':<10} {'steps':>5} {metric:>18} {'meta-train s':>13} {'test s':>8}"]
    rows = [result] + list(result.get("baselines", {}).values())
    for r in rows:
        scale, unit = (100.0, "%") if metric == "accuracy" else (1.0, "")
        value = f"{r['mean'] * scale:.2f} ± {r['ci95'] * scale:.2f}{unit}"
        lines.append(f"{r['algorithm']:<10} {len(r['per_step']) - 1:>5} {value:>18} {r['train_seconds']:>13.1f} "
                     f"{r['test_seconds']:>8.1f}")
    return "\n".join(lines)


def progress_bars(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty() or os.environ.get("METAPHI_PROGRESS") == "1"


# -- the commands -----------------------------------------------------------------------------------------

def run(config: RunConfig) -> int:
    """``metaphi run``; under ``torchrun`` every process runs it, joined into one process group."""
    from metaphi import distributed

    config = dataclasses.replace(config, device=distributed.init_from_env(config.device))
    try:
        code = _run(config, distributed.is_main())
    except BaseException:
        distributed.shutdown(wait=False)
        raise
    distributed.shutdown()
    return code


def _run(config: RunConfig, main_process: bool) -> int:
    from metaphi.algorithms import BASELINES

    benchmark = load_benchmark(config)
    if benchmark.description and main_process and not config.quiet:  # folder:PATH: how its images are read
        print(benchmark.description, file=sys.stderr, flush=True)
    config = with_input_settled(config, benchmark)
    given = config
    config = complete(config, benchmark)
    out_dir = outputs_folder(config, benchmark.name)
    config = dataclasses.replace(config, out=out_dir)
    if config.resume and not os.path.isfile(os.path.join(out_dir, "checkpoint.pt")):
        raise UsageError(f"--resume: no checkpoint in {out_dir}; leave out --resume to start a new run")
    if config.init:  # the body it starts from is read and checked before anything is written
        make_algorithm(config, benchmark)
    writable_dir(out_dir)
    progress = progress_bars(config.quiet)
    # Sizes are checked against the data before any training starts.
    for split, shots, query in (("train", config.shots, config.query), ("test", config.eval_shots, config.eval_query)):
        if split == "test" and not has_test(benchmark):
            split = "val"  # deploy mode: the validation tasks are the held-out ones
        benchmark.episodes(split, config.ways, shots, query)
    if main_process and not config.quiet:
        print(describe_choices(given, config), file=sys.stderr, flush=True)
    if main_process:
        save_config(config, out_dir, "run")
    result = train_and_test(config, benchmark, out_dir, progress=progress)
    if result.get("deploy"):
        return report_deployed(result, out_dir) if main_process else 0
    if config.baselines:
        result["baselines"] = {}
        for name in BASELINES:
            if name == config.algorithm:
                continue
            sub_dir = writable_dir(os.path.join(out_dir, "baselines", name))
            result["baselines"][name] = train_and_test(baseline_config(config, name, benchmark), benchmark, sub_dir,
                                                       progress=progress)
        if main_process:
            write_json(result, os.path.join(out_dir, "result.json"))
    if not main_process:
        return 0
    print(format_table(result))
    if "best" in result:
        scale, unit = (100.0, "%") if result["metric"] == "accuracy" else (1.0, "")
        best = result["best"]
        print(f"best validation at iteration {best['iteration']} of {result['iterations']}: {result['metric']} "
              f"{best['mean'] * scale:.2f} ± {best['ci95'] * scale:.2f}{unit} on the same test tasks")
    kept = " and best.pt" if os.path.isfile(os.path.join(out_dir, "best.pt")) else ""
    print(f"wrote {os.path.join(out_dir, 'result.json')} and {os.path.join(out_dir, 'checkpoint.pt')}{kept}")
    return 0


def report_deployed(result: dict, out_dir: str) -> int:
    """What a deploy-mode run prints: its validation scores and the files for ``metaphi predict``."""
    scale, unit = (100.0, "%") if result["metric"] == "accuracy" else (1.0, "")
    val = result["val"]
    shown = lambda v: "none" if v is None else f"{v * scale:.2f}{unit}"
    print(f"{result['benchmark']} (deploy: no test classes) {result['ways']}-way {result['eval_shots']}-shot, "
          f"{result['metric']} on {val['tasks']} validation tasks: last {shown(val['last'])}, best {shown(val['best'])}"
          f" at iteration {val['best_iteration']}")
    kept = " and best.pt" if os.path.isfile(os.path.join(out_dir, "best.pt")) else ""
    print(f"wrote {os.path.join(out_dir, 'result.json')} and {os.path.join(out_dir, 'checkpoint.pt')}{kept}; label "
          f"your images with: metaphi predict --checkpoint {out_dir} --support SUPPORT --query QUERY")
    return 0


def evaluate_checkpoint(config: EvalConfig) -> int:
    """``metaphi eval``: the saved run's algorithm and φ on its fixed test tasks (or as many as asked)."""
    import torch

    from metaphi.evaluate import evaluate
    from metaphi.tasks.registry import build_benchmark
    from metaphi.checkpoint import CheckpointError
    from metaphi.models import factory
    from metaphi.train import choose_checkpoint, describe_checkpoint, load_model

    if config.checkpoint is None:
        raise UsageError("name the checkpoint: metaphi eval CHECKPOINT")
    try:
        path = choose_checkpoint(config.checkpoint, config.last)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        with factory.allowed(config.model_factory):
            ck, algorithm = load_model(path)
    except CheckpointError as e:  # says what the file is
        raise UsageError(str(e)) from None
    run = ck["run"]
    options = dict(run.get("benchmark_options", {}))
    if config.within_alphabet:
        options["within_group"] = True
    benchmark = build_benchmark(run["benchmark"], config.data_root or run.get("data_root"), **options)
    sampler = benchmark.episodes("test", run["ways"], run["eval_shots"], run["eval_query"])
    n = config.eval_tasks or run["eval_tasks"]
    seed = run["eval_seed"] if config.eval_seed is None else config.eval_seed
    phi = {k: v.to(config.device) for k, v in ck["phi"].items()}
    diverged = [k for k, v in phi.items() if not torch.isfinite(v).all()]
    if diverged:  # NaN weights classify by argmax at chance: a number that would look like a result
        print(f"metaphi: stopped: {path}: weight '{diverged[0]}' is not finite (the run diverged); nothing to "
              "evaluate", file=sys.stderr)
        return NONFINITE_EXIT
    progress = not config.quiet and sys.stderr.isatty()
    test = evaluate(algorithm, phi, sampler, n, seed, config.eval_steps, device=config.device, progress=progress)
    result = {"algorithm": algorithm.name, "benchmark": benchmark.name, "metric": benchmark.problem.metric,
              "checkpoint": path, "iterations": ck["iteration"], **test}
    if config.out:
        write_json(result, config.out)
    print(f"metaphi eval: tested {describe_checkpoint(path, ck)}", file=sys.stderr)
    print(json.dumps(strict({k: result[k] for k in ("algorithm", "benchmark", "metric", "mean", "ci95", "tasks")})))
    if not math.isfinite(result["mean"]):  # a diverged model: its scores are NaN, which is a failure
        print(f"metaphi: stopped: {path} gives a non-finite {result['metric']} (its weights have diverged)",
              file=sys.stderr)
        return NONFINITE_EXIT
    return 0
