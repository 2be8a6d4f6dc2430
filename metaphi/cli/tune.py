"""``metaphi tune``: the flags of :class:`~metaphi.experiments.tune.TuneConfig` and, as for
``metaphi run``, those of every family's and estimator's options."""
from __future__ import annotations

import argparse

from metaphi.config import add_config_option, add_options, file_options, from_args


def register(sub) -> None:
    from metaphi.cli.run import add_family_options, with_family_options
    from metaphi.experiments import tune

    p = sub.add_parser("tune", help="search inner lr, inner steps and meta-batch on validation tasks",
                       description=tune.__doc__.split("\n\n")[0].replace("``", ""))
    add_options(p, tune.TuneConfig)
    # two numbers after one flag: the one option add_options does not spell
    p.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"), dest="lr_range",
                   default=argparse.SUPPRESS,
                   help="inner lr range, log scale (default: the default configuration's lr /10 to x5)")
    add_config_option(p)
    names = add_family_options(p)
    p.set_defaults(func=lambda args: tune.run(from_args(tune.TuneConfig, args,
                                                        with_family_options(file_options(args), args, names))))
