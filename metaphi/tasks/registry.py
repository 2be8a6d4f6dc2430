"""One registry from a name to the data a study needs.

Every command names its data the same way: a registered name, or ``folder:PATH`` for your own images
(parsed once, by :func:`folder_path`). What a name gives depends on the kind of problem:

    kind      table        what it gives                                        call
    episodes  BENCHMARKS   Benchmark: N-way K-shot episodes of each split and   build_benchmark(name, data_root, ...)
                           the model that fits them (few-shot learning)
    dataset   DATASETS     ImageClasses: one whole labelled set (architecture   load_named(name, data_root, classes, seed)
                           search, augmentation, reweighting, distillation)
    stream    STREAMS      Stream: continual experiences in a fixed order       build_stream(name, seed=, ...)
    domains   DOMAINS      DomainSet: the same classes in several domains       build_domains(name, ...)
                           (domain generalization)

A table maps a name to ``builder(options: dict)``; a builder imports its data set module when it is
called, so ``import metaphi`` reads no data. ``folder:PATH`` goes to the kind's reader in ``FOLDERS``:

    episodes  PATH/<class>/<image>, split by class            (tasks/folder.py; or
              PATH/<group>/<class>/<image>, groups kept)
    dataset   PATH/<class>/<image> (or grouped, as above)     (tasks/folder.py)
    stream    PATH/<experience>/<class>/<image>               (tasks/streams.py)
    domains   PATH/<domain>/<class>/<image>                   (tasks/domains.py)

A new data set is a module in tasks/ that reads it into ``ImageClasses`` plus one entry in the table
of each kind it serves; every command that takes that kind then takes its name. An unknown name
raises DataError listing the valid ones.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch

from metaphi.algorithms.base import REGRESSION
from metaphi.models import MLP
from metaphi.tasks import DataError, ImageClasses
from metaphi.tasks.benchmark import Benchmark, PooledSampler, image_benchmark
from metaphi.tasks.sinusoid import SinusoidTasks

__all__ = ["BENCHMARKS", "DATASETS", "STREAMS", "DOMAINS", "KINDS", "FOLDERS", "NAMED", "Benchmark", "PooledSampler",
           "image_benchmark", "folder_path", "resolve", "names", "default_data_root", "build_benchmark", "load_named",
           "build_stream", "build_domains"]

Builder = Callable[[dict], object]


def default_data_root() -> str:
    """``$METAPHI_DATA``, else ``~/.cache/metaphi/data``: where archives are looked for and downloaded."""
    return os.environ.get("METAPHI_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "metaphi", "data")


def folder_path(name: str) -> str | None:
    """PATH for ``folder:PATH``, None for any other name. The one place ``folder:`` is parsed."""
    if not name.startswith("folder:"):
        return None
    path = name[len("folder:"):]
    if not path:
        raise DataError("folder: needs a path after the colon, as in folder:~/data/my-images")
    return path


# -- episodes: few-shot benchmarks ----------------------------------------------------------------------

GLYPHS_DEFAULTS = dict(ways=5, shots=1, query=5, eval_shots=None, eval_query=15, inner_lr=0.4, inner_steps=1,
                       eval_steps=3, meta_batch=8, iterations=300, eval_tasks=600, meta_lr=1e-3)
# MAML's Omniglot settings (Finn et al. 2017), with a shorter default run
OMNIGLOT_DEFAULTS = dict(ways=5, shots=1, query=5, eval_shots=None, eval_query=15, inner_lr=0.4, inner_steps=1,
                         eval_steps=3, meta_batch=32, iterations=2000, eval_tasks=600, meta_lr=1e-3)
# MAML's miniImageNet settings: 32 filters with max pooling, 5 steps at α = 0.01 (10 at test)
IMAGENET_DEFAULTS = dict(ways=5, shots=1, query=15, eval_shots=None, eval_query=15, inner_lr=0.01, inner_steps=5,
                         eval_steps=10, meta_batch=4, iterations=2000, eval_tasks=600, meta_lr=1e-3)
FOLDER_DEFAULTS = dict(ways=5, shots=1, query=1, eval_shots=None, eval_query=None, inner_lr=0.1, inner_steps=1,
                       eval_steps=5, meta_batch=8, iterations=500, eval_tasks=600, meta_lr=1e-3)


def sinusoid() -> Benchmark:
    return Benchmark(
        name="sinusoid", problem=REGRESSION,
        defaults=dict(ways=1, shots=10, query=10, eval_shots=5, eval_query=100, inner_lr=0.01, inner_steps=1,
                      eval_steps=10, meta_batch=25, iterations=2000, eval_tasks=600, meta_lr=1e-3),
        make_model=lambda out: MLP(1, out, (40, 40)),
        regression_tasks=lambda shots, query: SinusoidTasks(shots, query),
    )


def glyphs(options: dict) -> Benchmark:
    from metaphi.tasks.glyphs import glyph_splits, load_glyphs

    splits = glyph_splits(load_glyphs())
    return image_benchmark("glyphs", splits, dict(GLYPHS_DEFAULTS), hidden=32, invert=True)


def _omniglot(protocol: str) -> Builder:
    def build(options: dict) -> Benchmark:
        from metaphi.tasks import omniglot

        root, download = options["data_root"], options.get("download", False)
        if protocol == "omniglot":
            splits = omniglot.maml_splits(root, download=download)
        elif protocol == "omniglot-lake":
            splits = omniglot.lake_splits(root, download=download)
        else:
            splits = omniglot.minimal_splits(root, "small1", test="unseen", download=download)
        return image_benchmark(protocol, splits, dict(OMNIGLOT_DEFAULTS), invert=True, characters=True)
    return build


def _imagenet(name: str) -> Builder:
    def build(options: dict) -> Benchmark:
        from metaphi.tasks import imagenet

        read = imagenet.mini_imagenet_splits if name == "mini-imagenet" else imagenet.tiered_imagenet_splits
        return image_benchmark(name, read(options["data_root"]), dict(IMAGENET_DEFAULTS), hidden=32, pool="max")
    return build


def _cifar(name: str) -> Builder:
    def build(options: dict) -> Benchmark:
        from metaphi.tasks import cifar

        read = cifar.cifar_fs_splits if name == "cifar-fs" else cifar.fc100_splits
        splits = read(options["data_root"], download=options.get("download", False))
        return image_benchmark(name, splits, dict(IMAGENET_DEFAULTS, inner_steps=5, eval_steps=10), pool="max")
    return build


#: the class fractions (train, val, test) of a folder in deploy mode: no test split
DEPLOY_FRACTIONS = (0.8, 0.2, 0.0)


def deploy_fractions(val_fraction: float | None = None) -> tuple[float, float, float]:
    """Deploy mode's (train, val, test) class fractions: ``val_fraction`` (default 0.2) validates."""
    if val_fraction is None:
        return DEPLOY_FRACTIONS
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    return (1.0 - val_fraction, val_fraction, 0.0)


def folder(path: str, options: dict) -> Benchmark:
    """``PATH/<class>/<image>`` (or ``PATH/<group>/<class>/<image>``, each class keeping its group), its
    classes split into train/val/test (or by ``split_file``).

    ``channels``, ``image_size`` and ``invert`` left ``None`` are inferred from a sample of the images
    (:func:`metaphi.tasks.folder.folder_input`: all grey -> 1 channel; grey on a light background ->
    inverted and 28 pixels; else 84). The choices, and whether each was given or inferred, are in the
    benchmark's ``description`` and its ``input_spec()`` (so a checkpoint's ``run["input"]``).
    ``deploy``: no test split; every class but a validation fifth (``val_fraction``) trains (a model meant
    for ``predict``)."""
    from metaphi.tasks.folder import folder_input, folder_splits

    deploy = bool(options.get("deploy"))
    if deploy and options.get("split_file"):
        raise DataError("deploy mode splits the classes itself (all but a validation fifth train, no test); "
                        "drop the split file")
    chosen = folder_input(path, channels=options.get("channels"), image_size=options.get("image_size"),
                          invert=options.get("invert"))
    size = chosen.image_size if isinstance(chosen.image_size, int) else min(chosen.image_size)
    splits = folder_splits(path, seed=options.get("split_seed", 0), split=options.get("split_file"),
                           channels=chosen.channels, image_size=chosen.image_size, invert=chosen.invert,
                           **({"fractions": deploy_fractions(options.get("val_fraction"))} if deploy else {}))
    bench = image_benchmark(f"folder:{path}", splits, dict(FOLDER_DEFAULTS), pool="max" if size >= 64 else "stride",
                            hidden=64 if size < 64 else 32, invert=chosen.invert,
                            characters=chosen.channels == 1 and bool(chosen.invert))
    counts = [splits[s].num_classes for s in splits]
    images = sum(len(splits[s].targets) for s in splits)
    test = "no test: deploy" if deploy else f"{counts[2]} test"
    groups = {g for s in splits.values() for g in (s.groups or [])}
    in_groups = f" in {len(groups)} groups" if groups else ""
    bench.description = (f"folder:{path}: {sum(counts)} classes{in_groups} ({counts[0]} train, {counts[1]} val, {test}"
                         f"), {images} images {chosen.describe()}")
    bench.input_origin = dict(chosen.origin)
    return bench


#: name -> builder(options)
BENCHMARKS: dict[str, Builder] = {
    "glyphs": glyphs,
    "sinusoid": lambda options: sinusoid(),
    "omniglot": _omniglot("omniglot"),
    "omniglot-lake": _omniglot("omniglot-lake"),
    "omniglot-small": _omniglot("omniglot-small"),
    "mini-imagenet": _imagenet("mini-imagenet"),
    "tiered-imagenet": _imagenet("tiered-imagenet"),
    "cifar-fs": _cifar("cifar-fs"),
    "fc100": _cifar("fc100"),
}


# -- dataset: whole labelled data sets ------------------------------------------------------------------
# For problems where the task is one data set (architecture search, augmentation, sample reweighting,
# distillation).

def _digits(options: dict) -> ImageClasses:
    from metaphi.tasks.digits import load_digits

    return load_digits()


def _glyph_set(options: dict) -> ImageClasses:
    from metaphi.tasks.glyphs import load_glyphs

    return load_glyphs()


def _omniglot_set(options: dict) -> ImageClasses:
    from metaphi.tasks import omniglot

    return omniglot.read(options["data_root"], "small1")


def folder_dataset(path: str, options: dict) -> ImageClasses:
    """``PATH/<class>/<image>``, every image read (``channels`` and ``image_size`` as for benchmarks: 3, 84)."""
    from metaphi.tasks.folder import load_folder

    return load_folder(path, channels=options.get("channels") or 3, image_size=options.get("image_size") or 84,
                       invert=options.get("invert", False))


#: name -> builder(options): ``digits`` (shipped in the package), ``glyphs`` (generated), ``omniglot``
#: (the small1 minimal split, read from ``data_root``)
DATASETS: dict[str, Builder] = {
    "digits": _digits,
    "glyphs": _glyph_set,
    "omniglot": _omniglot_set,
}


# -- stream: continual-learning streams -----------------------------------------------------------------

def _glyph_stream(name: str) -> Builder:
    """Glyph streams: class-incremental over the test (``glyphs``) or validation (``glyphs-val``)
    alphabets of :func:`metaphi.tasks.glyphs.glyph_splits`, or domain-incremental over ``classes``
    test-alphabet glyphs (``rotated-glyphs``, ``permuted-glyphs``); meta-training classes are the
    train alphabets."""
    def build(o: dict):
        from metaphi.tasks import streams
        from metaphi.tasks.glyphs import glyph_splits, load_glyphs

        splits = glyph_splits(load_glyphs())
        data, meta = splits["val" if name == "glyphs-val" else "test"], splits["train"]
        experiences = o["experiences"]
        if name in ("glyphs", "glyphs-val"):
            return streams.class_incremental(
                data, experiences=experiences or 10, classes_per_experience=o["classes_per_experience"],
                train_per_class=o["train_per_class"], test_per_class=o["test_per_class"], seed=o["seed"], name=name,
                meta_train=meta)
        if name == "rotated-glyphs":
            angles = list(o["angles"])[:experiences] if experiences else list(o["angles"])
            return streams.rotated(data, angles, classes=o["classes"], train_per_class=o["train_per_class"],
                                   test_per_class=o["test_per_class"], seed=o["seed"], name=name, meta_train=meta)
        return streams.permuted(data, experiences or 5, classes=o["classes"], train_per_class=o["train_per_class"],
                                test_per_class=o["test_per_class"], seed=o["seed"], name=name, meta_train=meta)
    return build


def _omniglot_stream(o: dict):
    """Class-incremental over the alphabets of Omniglot's ``small2`` minimal set that ``small1`` lacks
    (Japanese (katakana), Sanskrit, Tagalog); meta-training classes are all of ``small1``. Needs the
    two minimal archives under ``data_root``."""
    from metaphi.tasks import omniglot, streams

    small1 = omniglot.read(o["data_root"], "small1", o["image_size"])
    stream_data = omniglot.unseen_alphabets(small1, omniglot.read(o["data_root"], "small2", o["image_size"]))
    return streams.class_incremental(stream_data, experiences=o["experiences"] or 10,
                                     classes_per_experience=o["classes_per_experience"],
                                     train_per_class=o["train_per_class"], test_per_class=o["test_per_class"],
                                     seed=o["seed"], name="omniglot", meta_train=small1)


def folder_stream(path: str, o: dict):
    from metaphi.tasks.streams import folder_sequence

    return folder_sequence(path, test_per_class=o["test_per_class"], channels=o["channels"],
                           image_size=o["image_size"], invert=o["invert"], seed=o["seed"])


#: name -> builder(options)
STREAMS: dict[str, Builder] = {
    "glyphs": _glyph_stream("glyphs"),
    "glyphs-val": _glyph_stream("glyphs-val"),
    "omniglot": _omniglot_stream,
    "rotated-glyphs": _glyph_stream("rotated-glyphs"),
    "permuted-glyphs": _glyph_stream("permuted-glyphs"),
}


# -- domains: multi-domain data for domain generalization ----------------------------------------------

def _rotated_omniglot(o: dict):
    """Characters of Omniglot minimal-split alphabets (``alphabets``, default Greek), each rotation by
    0°, 15°, ..., 75° a domain (the Rotated-MNIST protocol)."""
    from metaphi.tasks import domains as dm

    classes = dm.omniglot_classes(o["data_root"], o["alphabets"] or ["Greek"], o["omniglot_set"],
                                  download=o["download"])
    classes = dm.choose_classes(classes, o["classes"], o["split_seed"])
    return dm.rotated_domains(classes, _angles(o["domains"]), name="rotated-omniglot", **split_sizes(o))


def _angles(domains: Sequence[str]) -> list[float]:
    """The rotation domains named by ``domains`` (degrees; every default angle when empty)."""
    from metaphi.tasks import domains as dm

    try:
        angles = [float(a) for a in domains] if domains else list(dm.ANGLES)
    except ValueError:
        raise DataError(f"--domains of rotations are angles in degrees (e.g. 0,15,30), got {','.join(domains)}") \
            from None
    if not all(math.isfinite(a) for a in angles):
        raise DataError(f"--domains: angles must be finite numbers, got {','.join(domains)}")
    return angles


def _glyph_domains(name: str) -> Builder:
    """Built-in glyphs (``classes``, default 10, of two generated alphabets), as rotations
    (``rotated-glyphs``) or in six drawing styles (``glyph-styles``)."""
    def build(o: dict):
        from metaphi.tasks import domains as dm

        classes = dm.glyph_classes(o["classes"] or 10, alphabets=2, seed=o["split_seed"])
        if name == "rotated-glyphs":
            return dm.rotated_domains(classes, _angles(o["domains"]), name=name, **split_sizes(o))
        return dm.style_domains(classes, o["domains"] or dm.STYLES, name=name, **split_sizes(o))
    return build


def folder_domain_set(path: str, o: dict):
    """``PATH/<domain>/<class>/<image>``; ``domains`` keeps those domain folders, in that order."""
    from metaphi.tasks import domains as dm

    found = dm.folder_domains(path, channels=o["channels"] or 1, image_size=o["image_size"] or 28,
                              invert=o["invert"], **split_sizes(o))
    chosen = o["domains"]
    if chosen:
        unknown = [d for d in chosen if d not in found.domains]
        if unknown:
            raise DataError(f"folder:{path}: no domain folder '{unknown[0]}' (domains: {', '.join(found.domains)})")
        keep = [found.domains.index(d) for d in chosen]
        found = dm.DomainSet(found.name, list(chosen), [found.parts[i] for i in keep], found.invert)
    return found


def split_sizes(o: dict) -> dict:
    """The per-class split of a domain set: images held out per class for adaptation and for test."""
    return dict(adapt=o["adapt_per_class"], test=o["test_per_class"], split_seed=o["split_seed"])


#: name -> builder(options)
DOMAINS: dict[str, Builder] = {
    "rotated-omniglot": _rotated_omniglot,
    "rotated-glyphs": _glyph_domains("rotated-glyphs"),
    "glyph-styles": _glyph_domains("glyph-styles"),
}


# -- the registry ---------------------------------------------------------------------------------------

#: kind -> its table
KINDS: dict[str, dict[str, Builder]] = {"episodes": BENCHMARKS, "dataset": DATASETS, "stream": STREAMS,
                                        "domains": DOMAINS}
#: kind -> reader(PATH, options) for ``folder:PATH``
FOLDERS: dict[str, Callable[[str, dict], object]] = {"episodes": folder, "dataset": folder_dataset,
                                                     "stream": folder_stream, "domains": folder_domain_set}
#: what an unknown name is called in the error message
_NOUNS = {"episodes": "benchmark", "dataset": "data set", "stream": "stream", "domains": "domain data"}


def names(kind: str) -> list[str]:
    """The names ``kind`` takes, ``folder:PATH`` last."""
    return [*_table(kind), "folder:PATH"]


def _table(kind: str) -> dict[str, Builder]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of data '{kind}' (kinds: {', '.join(KINDS)})")
    return KINDS[kind]


def resolve(kind: str, name: str) -> Builder:
    """The builder ``builder(options)`` of ``name`` (a registered name or ``folder:PATH``) for ``kind``
    (``episodes``, ``dataset``, ``stream`` or ``domains``); DataError naming the valid names otherwise."""
    table = _table(kind)
    path = folder_path(name)
    if path is not None:
        reader = FOLDERS[kind]
        return lambda options: reader(path, options)
    if name not in table:
        raise DataError(f"unknown {_NOUNS[kind]} '{name}' (valid: {', '.join(names(kind))})")
    return table[name]


def build_benchmark(name: str, data_root: str | None = None, *, download: bool = False, within_group: bool = False,
                    image_size: int | None = None, channels: int | None = None, invert: bool | None = None,
                    split_file: str | None = None, split_seed: int = 0, deploy: bool = False,
                    val_fraction: float | None = None) -> Benchmark:
    """The few-shot benchmark called ``name`` (see ``BENCHMARKS``) or ``folder:PATH``.

    ``download`` fetches missing archives; ``within_group`` draws each test and validation episode
    from one group (alphabet). For folders: ``image_size``, ``channels`` and ``invert`` (None: inferred
    from a sample of the images, see :func:`folder`), ``split_file`` (which classes go to which split)
    and ``split_seed`` (the random split otherwise); ``deploy`` (folders only): no test split, with
    ``val_fraction`` of the classes validating (default 0.2).
    """
    if deploy and folder_path(name) is None:
        raise DataError(f"deploy mode (no test split) is for folder:PATH benchmarks, not '{name}'")
    options = dict(data_root=data_root or default_data_root(), download=download, image_size=image_size,
                   channels=channels, invert=invert, split_file=split_file, split_seed=split_seed, deploy=deploy,
                   val_fraction=val_fraction)
    bench = resolve("episodes", name)(options)
    bench.eval_within_group = bool(within_group)
    return bench


NAMED = tuple(DATASETS)


def load_named(name: str, data_root: str | None = None, classes: int | None = None, seed: int = 0, *,
               channels: int | None = None, image_size: int | None = None, invert: bool = False) -> ImageClasses:
    """The whole data set ``name`` (see ``DATASETS``) or ``folder:PATH`` (read with ``channels``,
    ``image_size``, ``invert``); ``classes`` keeps that many of its classes, drawn with ``seed`` and
    kept in their original order."""
    data = resolve("dataset", name)(dict(data_root=data_root or default_data_root(), channels=channels,
                                         image_size=image_size, invert=invert))
    if classes is not None:
        if not 2 <= classes <= data.num_classes:
            raise DataError(f"--classes must be between 2 and {data.num_classes} for {name}, got {classes}")
        pick = torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(seed))[:classes]
        data = data.subset(sorted(pick.tolist()))
    return data


def build_stream(name: str, *, seed: int = 0, experiences: int | None = None, classes_per_experience: int = 5,
                 classes: int = 10, train_per_class: int = 15, test_per_class: int = 5,
                 angles: Sequence[float] = (0, 30, 60, 90, 120), data_root: str | None = None,
                 image_size: int = 28, channels: int = 1, invert: bool = False):
    """The continual stream called ``name`` (see ``STREAMS``) or ``folder:PATH``, with its meta-training
    classes (:class:`metaphi.tasks.streams.Stream`).

    ``experiences`` (None: the stream's own count, 10 class-incremental, 5 permuted, one per angle
    rotated), ``classes_per_experience`` (class-incremental), ``classes`` and ``angles``
    (domain-incremental), ``train_per_class`` / ``test_per_class`` images, ``seed`` (which classes,
    their order, the split of the images). Folders: ``image_size``, ``channels``, ``invert``.
    """
    options = dict(seed=seed, experiences=experiences, classes_per_experience=classes_per_experience, classes=classes,
                   train_per_class=train_per_class, test_per_class=test_per_class, angles=angles,
                   data_root=data_root or default_data_root(), image_size=image_size, channels=channels, invert=invert)
    return resolve("stream", name)(options)


def build_domains(name: str, *, domains: Sequence[str] | None = None, alphabets: Sequence[str] | None = None,
                  classes: int | None = None, data_root: str | None = None, download: bool = False,
                  image_size: int | None = None, channels: int | None = None, invert: bool = False,
                  test_per_class: int = 6, adapt_per_class: int = 5, split_seed: int = 0,
                  omniglot_set: str = "small1"):
    """The multi-domain data called ``name`` (see ``DOMAINS``) or ``folder:PATH``
    (:class:`metaphi.tasks.domains.DomainSet`).

    ``domains`` picks the angles, styles or domain folders (all for None or empty); each class's
    images are split by ``split_seed`` into ``test_per_class`` test, ``adapt_per_class`` adaptation
    and the rest training images. ``alphabets`` and ``omniglot_set`` choose Omniglot characters;
    ``classes`` keeps that many classes. Folders: ``image_size`` (28), ``channels`` (1), ``invert``.
    """
    options = dict(domains=list(domains or []), alphabets=list(alphabets or []), classes=classes,
                   data_root=data_root or default_data_root(), download=download, image_size=image_size,
                   channels=channels, invert=invert, test_per_class=test_per_class, adapt_per_class=adapt_per_class,
                   split_seed=split_seed, omniglot_set=omniglot_set)
    return resolve("domains", name)(options)
