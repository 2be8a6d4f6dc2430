"""metaphi distill: knowledge distillation, a student alone, with plain KD and with a meta-learned
teacher (the study is metaphi/experiments/distill.py)."""
from __future__ import annotations

import argparse

from metaphi.config import add_config_option, add_options, resolve


def register(subparsers) -> None:
    from metaphi.experiments import distill

    p = subparsers.add_parser("distill", help="knowledge distillation: student alone, plain KD, meta-learned teacher",
                              description=distill.__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, distill.DistillConfig)
    add_config_option(p)
    p.set_defaults(func=lambda args: distill.main(resolve(distill.DistillConfig, args)))
