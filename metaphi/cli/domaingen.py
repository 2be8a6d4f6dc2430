"""``metaphi domaingen``: the parser of :mod:`metaphi.experiments.domaingen` (the study is there)."""
from __future__ import annotations


def register(subparsers) -> None:
    from metaphi.cli import study_command
    from metaphi.experiments import domaingen

    study_command(subparsers, "domaingen", domaingen.DomainGenConfig, domaingen.main,
                  help="leave-one-domain-out domain generalization (ERM, MLDG) and few-shot adaptation",
                  description=domaingen.__doc__.split("\n\n")[0])
