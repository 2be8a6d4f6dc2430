"""``metaphi search-arch``: the parser of :mod:`metaphi.experiments.nas` (the study is there).

Its flags come from :class:`~metaphi.experiments.nas.ArchSearchConfig`; ``--config FILE.yaml``
reads them from a file (a run's ``config.yaml`` reproduces it), flags given on the command line
taking precedence.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from metaphi.config import add_config_option, add_options, resolve
    from metaphi.experiments import nas

    p = subparsers.add_parser("search-arch", help="architecture search (DARTS, REINFORCE, evolution, random) on one "
                              "data set, retrained from scratch", description=nas.__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, nas.ArchSearchConfig)
    add_config_option(p)
    p.set_defaults(func=lambda args: nas.main(resolve(nas.ArchSearchConfig, args)))
