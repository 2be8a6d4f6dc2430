"""``metaphi augment``: the parser of :mod:`metaphi.experiments.augment` (the study is there).

Its flags come from :class:`~metaphi.experiments.augment.AugmentConfig`; ``--config FILE.yaml``
reads them from a file (a run's ``config.yaml`` reproduces it), flags given on the command line
taking precedence.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from metaphi.config import add_config_option, add_options, resolve
    from metaphi.experiments import augment

    p = subparsers.add_parser("augment", help="learned data augmentation vs none and a random policy, over seeds",
                              description=augment.__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, augment.AugmentConfig)
    add_config_option(p)
    p.set_defaults(func=lambda args: augment.main(resolve(augment.AugmentConfig, args)))
