"""Algorithms: what φ is and how one task is learned with it. One family per file."""
from __future__ import annotations

from ..models import build_model
from .base import CLASSIFICATION, REGRESSION, Algorithm, Problem, problem_named
from .baselines import Pretrain, scratch
from .maml import MAML, anil, fomaml, maml, maml_from_spec, metasgd
from .reptile import reptile

#: name -> factory(model, problem, inner_lr, inner_steps, eval_steps)
ALGORITHMS = {
    "maml": maml,
    "fomaml": fomaml,
    "reptile": reptile,
    "anil": anil,
    "metasgd": metasgd,
    "scratch": scratch,
    "pretrain": lambda model, problem, inner_lr, inner_steps, eval_steps: Pretrain(model, problem, inner_lr,
                                                                                   eval_steps),
}
BASELINES = ("scratch", "pretrain")


def create_algorithm(name: str, benchmark, ways: int, inner_lr: float, inner_steps: int, eval_steps: int
                     ) -> Algorithm:
    """A fresh algorithm called ``name`` with the benchmark's model, sized for ``ways`` classes."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm '{name}' (valid: {', '.join(ALGORITHMS)})")
    if benchmark.problem is REGRESSION:
        out = 1
    elif name == "pretrain":
        out = benchmark.num_classes("train")
    else:
        out = ways
    return ALGORITHMS[name](benchmark.model(out), benchmark.problem, inner_lr, inner_steps, eval_steps)


def build_algorithm(spec: dict) -> Algorithm:
    """Rebuild an algorithm from the ``spec()`` a checkpoint stores."""
    model = build_model(spec["model"])
    if spec["class"] == "maml":
        return maml_from_spec(spec, model)
    if spec["class"] == "pretrain":
        return Pretrain(model, problem_named(spec["problem"]), spec["rule"]["lr"], spec["eval_steps"],
                        spec["batch_size"])
    raise ValueError(f"unknown algorithm class '{spec['class']}'")


__all__ = ["Algorithm", "Problem", "CLASSIFICATION", "REGRESSION", "MAML", "Pretrain", "ALGORITHMS", "BASELINES",
           "create_algorithm", "build_algorithm"]
