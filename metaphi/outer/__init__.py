"""How φ is optimized: estimators of its update from a meta-batch of tasks."""
from .estimators import Reptile, Unrolled, build_estimator

ESTIMATORS = ("second-order", "first-order", "reptile")

__all__ = ["Unrolled", "Reptile", "build_estimator", "ESTIMATORS"]
