"""``metaphi search-arch``: the parser of :mod:`metaphi.experiments.nas` (the study is there).

Its flags come from :class:`~metaphi.experiments.nas.ArchSearchConfig`; ``--config FILE.yaml``
reads them from a file (a run's ``config.yaml`` reproduces it), flags given on the command line
taking precedence.
"""
from __future__ import annotations


def register(subparsers) -> None:
    from metaphi.cli import study_command
    from metaphi.experiments import nas

    study_command(subparsers, "search-arch", nas.ArchSearchConfig, nas.main,
                  help="architecture search (DARTS, REINFORCE, evolution, random) on one data set, retrained "
                       "from scratch", description=nas.__doc__.split("\n\n")[0], raw=True)
