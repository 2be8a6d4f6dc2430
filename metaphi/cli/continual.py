"""``metaphi continual``: the parser of :mod:`metaphi.experiments.continual` (the study is there).

Its flags come from :class:`~metaphi.experiments.continual.ContinualConfig` and from each method's
options dataclass (``Method.Options`` in ``metaphi.continual``); a flag several methods share is
one flag, and its help names them.
"""
from __future__ import annotations


def method_flags(args) -> dict:
    """The method options given on the command line, by field name."""
    from metaphi.config import given
    from metaphi.continual import METHODS, options_class

    return {k: v for m in METHODS for k, v in given(args, options_class(m)).items()}


def config_from_args(args):
    """The config of ``args``: defaults < ``--config FILE`` < flags, the methods' options included."""
    from metaphi.config import resolve
    from metaphi.experiments.continual import ContinualConfig, with_method_options

    return with_method_options(resolve(ContinualConfig, args), method_flags(args))


def register(subparsers) -> None:
    from metaphi.config import add_config_option, add_options, add_owned_options
    from metaphi.continual import METHODS, options_class
    from metaphi.experiments import continual

    p = subparsers.add_parser("continual", help="lifelong learning on a stream: finetune, EWC, replay, OML, La-MAML",
                              description=continual.__doc__.split("\n\n")[0])
    add_options(p, continual.ContinualConfig)
    add_owned_options(p, {m: options_class(m) for m in METHODS}, "method options",
                      "each applies to the methods in brackets; a flag of a method that is not run is refused")
    add_config_option(p)
    p.set_defaults(func=lambda args: continual.main(config_from_args(args)))
