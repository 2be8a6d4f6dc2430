"""metaphi distill: knowledge distillation, a student alone, with plain KD and with a meta-learned
teacher (the study is metaphi/experiments/distill.py)."""
from __future__ import annotations


def register(subparsers) -> None:
    from metaphi.cli import study_command
    from metaphi.experiments import distill

    study_command(subparsers, "distill", distill.DistillConfig, distill.main,
                  help="knowledge distillation: student alone, plain KD, meta-learned teacher",
                  description=distill.__doc__.split("\n\n")[0], raw=True)
