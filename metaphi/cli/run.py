"""``metaphi run`` (meta-train and test) and ``metaphi eval`` (re-test a saved run).

The flags are those of :class:`~metaphi.experiments.fewshot.RunConfig` and, in one group per family
and per estimator, the fields of every family's and every estimator's options dataclass: a name two
of them share is one flag. Which mapping of the config a flag fills (``algorithm_options`` or
``estimator_options``) follows from its owners; whether it applies to the chosen algorithm and
estimator is the experiment's check.
"""
from __future__ import annotations

import argparse

from metaphi.config import UsageError, add_config_option, add_options, add_owned_options, file_options, from_args, \
    resolve


def add_family_options(parser: argparse.ArgumentParser) -> list[str]:
    """A flag for every field of every family's and every estimator's options dataclass, in a group per
    family and per estimator (:func:`~metaphi.config.add_owned_options`); returns their names (the
    ``dest`` of each)."""
    from metaphi.algorithms import ALGORITHMS, options_class
    from metaphi.outer import ESTIMATORS, estimator_options_class

    return add_owned_options(parser, {**{name: options_class(name) for name in ALGORITHMS},
                                      **{f"{name} estimator": estimator_options_class(name) for name in ESTIMATORS}})


def with_family_options(data: dict, args: argparse.Namespace, names: list[str]) -> dict:
    """``data`` (a config file's mapping) with the family and estimator flags given on the command line
    merged into its ``algorithm_options`` and ``estimator_options`` (flags win)."""
    from metaphi.experiments.fewshot import route_options

    data = _without_stale_options(data, args)
    flat = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if not flat:
        return data
    data = dict(data)
    for key, routed in zip(("algorithm_options", "estimator_options"), route_options(flat)):
        before = data.get(key) or {}
        if not isinstance(before, dict):
            raise UsageError(f"--config: {key} must be a mapping of options, got {before!r}")
        if routed:
            data[key] = {**before, **routed}
    return data


def _without_stale_options(data: dict, args: argparse.Namespace) -> dict:
    """A config file's mapping less what belonged to the algorithm or estimator the command line replaces:
    a run's config.yaml spells out the options of its own family and estimator, which would be refused
    for another (``metaphi run maml --config imaml-run/config.yaml`` trains MAML with MAML's defaults)."""
    data = dict(data)
    if "algorithm" in args and data.get("algorithm") not in (None, args.algorithm):
        data.pop("algorithm_options", None)
        if "estimator" not in args:  # the new family's own estimator
            data.pop("estimator", None)
            data.pop("estimator_options", None)
    if "estimator" in args and data.get("estimator") not in (None, args.estimator):
        data.pop("estimator_options", None)
    return data


def _set_threads(threads: int | None) -> None:
    if threads is not None:  # a config file's; a flag was applied before the command started
        from metaphi.cli import set_threads
        set_threads(threads)


def resolve_run(args: argparse.Namespace, names: list[str]):
    """The RunConfig of a command line: defaults < ``--config FILE`` < flags, checked."""
    from metaphi.experiments.fewshot import RunConfig

    return from_args(RunConfig, args, with_family_options(file_options(args), args, names))


def register(sub) -> None:
    from metaphi.experiments import fewshot

    run = sub.add_parser("run", help="meta-train an algorithm and test it on held-out tasks",
                         description="Meta-train ALGORITHM on a benchmark's training tasks and test it on held-out "
                                     "tasks; the folder --out gets checkpoint.pt, metrics.jsonl, result.json and "
                                     "config.yaml (metaphi run --config OUT/config.yaml --out NEW runs it again).")
    add_options(run, fewshot.RunConfig)
    add_config_option(run)
    names = add_family_options(run)

    def cmd_run(args) -> int:
        config = resolve_run(args, names)
        _set_threads(config.threads)
        return fewshot.run(config)

    run.set_defaults(func=cmd_run)

    ev = sub.add_parser("eval", help="re-evaluate a saved run on its fixed test tasks")
    add_options(ev, fewshot.EvalConfig)
    add_config_option(ev)

    def cmd_eval(args) -> int:
        config = resolve(fewshot.EvalConfig, args)
        _set_threads(config.threads)
        return fewshot.evaluate_checkpoint(config)

    ev.set_defaults(func=cmd_eval)
