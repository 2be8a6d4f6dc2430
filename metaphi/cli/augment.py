"""``metaphi augment``: the parser of :mod:`metaphi.experiments.augment` (the study is there).

Its flags come from :class:`~metaphi.experiments.augment.AugmentConfig`; ``--config FILE.yaml``
reads them from a file (a run's ``config.yaml`` reproduces it), flags given on the command line
taking precedence.
"""
from __future__ import annotations


def register(subparsers) -> None:
    from metaphi.cli import study_command
    from metaphi.experiments import augment

    study_command(subparsers, "augment", augment.AugmentConfig, augment.main,
                  help="learned data augmentation vs none and a random policy, over seeds",
                  description=augment.__doc__.split("\n\n")[0], raw=True)
