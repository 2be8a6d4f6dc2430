"""How one task is learned: update rules and the inner loop."""
from metaphi.inner.adapt import FIRST_ORDER, Unroll, adapt, adapt_steps
from metaphi.inner.rules import SGD, MetaSGD, UpdateRule, build_rule

__all__ = ["adapt", "adapt_steps", "Unroll", "FIRST_ORDER", "SGD", "MetaSGD", "UpdateRule", "build_rule"]
