"""``metaphi compare``: the flags of :class:`~metaphi.experiments.compare.CompareConfig` and, for the
settings every method starts from, those of ``metaphi run`` (less the ones decided per method)."""
from __future__ import annotations

import argparse

from metaphi.config import UsageError, add_config_option, add_options, check, file_options, from_args, from_dict, \
    given


def resolve_compare(args: argparse.Namespace):
    """The CompareConfig of a command line: defaults < ``--config FILE`` < flags; the run flags fill its
    ``base``."""
    from metaphi.experiments.compare import CompareConfig, PER_METHOD
    from metaphi.experiments.fewshot import RunConfig

    data = file_options(args)
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise UsageError(f"--config: base must be a mapping of metaphi run's options, got {base!r}")
    flags = {k: v for k, v in given(args, RunConfig).items() if k not in PER_METHOD}
    data["base"] = from_dict(RunConfig, {**base, **flags}, where="base")
    check(data["base"])
    return from_args(CompareConfig, args, data)


def register(sub) -> None:
    from metaphi.experiments import compare
    from metaphi.experiments.fewshot import RunConfig

    p = sub.add_parser("compare", help="run several methods on the same fixed test tasks; table and plot",
                       description=compare.__doc__.replace("``", ""),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, compare.CompareConfig)
    add_options(p, RunConfig, title="settings of every method (those of metaphi run)", skip=compare.PER_METHOD)
    add_config_option(p)
    p.set_defaults(func=lambda args: compare.main(resolve_compare(args)))
