"""``metaphi domaingen``: the parser of :mod:`metaphi.experiments.domaingen` (the study is there)."""
from __future__ import annotations


def register(subparsers) -> None:
    from metaphi.config import add_config_option, add_options, resolve
    from metaphi.experiments import domaingen

    p = subparsers.add_parser("domaingen", help="leave-one-domain-out domain generalization (ERM, MLDG) and few-shot "
                              "adaptation", description=domaingen.__doc__.split("\n\n")[0])
    add_options(p, domaingen.DomainGenConfig)
    add_config_option(p)
    p.set_defaults(func=lambda args: domaingen.main(resolve(domaingen.DomainGenConfig, args)))
