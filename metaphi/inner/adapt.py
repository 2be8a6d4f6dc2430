"""The inner loop: learning one task from its support set."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from ..functional import Params, detach
from .rules import UpdateRule


def adapt_steps(
    loss_fn: Callable[[Params], Tensor],
    params: Params,
    rule: UpdateRule,
    rule_meta: Params,
    steps: int,
    first_order: bool = False,
    trainable: Iterable[str] | None = None,
) -> Iterator[Params]:
    """Yield the params after 0, 1, ..., ``steps`` updates of ``rule`` on ``loss_fn``.

    ``loss_fn(params)`` is the support loss. Only the keys in ``trainable`` change (all by default;
    ANIL passes the head's). With ``first_order`` the inner gradients are constants: the update
    arithmetic stays differentiable (so a learned step size still gets a gradient) but no second
    derivatives are formed, which is first-order MAML. Gradients come from ``torch.func.grad`` so the
    same code runs inside ``vmap`` over a batch of tasks and under an outer ``autograd.grad``.
    """
    keys = list(params) if trainable is None else [k for k in params if k in set(trainable)]
    fixed = {k: v for k, v in params.items() if k not in keys}
    current = {k: params[k] for k in keys}
    state = rule.init(current)
    yield {**fixed, **current}
    fixed_const = detach(fixed) if first_order else fixed
    for _ in range(steps):
        if first_order:
            grads = torch.func.grad(lambda p: loss_fn({**fixed_const, **p}))(detach(current))
        else:
            grads = torch.func.grad(lambda p: loss_fn({**fixed, **p}))(current)
        current, state = rule.update(current, grads, state, {k: v for k, v in rule_meta.items() if k not in fixed})
        yield {**fixed, **current}


def adapt(loss_fn: Callable[[Params], Tensor], params: Params, rule: UpdateRule, rule_meta: Params, steps: int,
          first_order: bool = False, trainable: Iterable[str] | None = None) -> Params:
    """The params after ``steps`` inner updates (see ``adapt_steps``)."""
    result = params
    for result in adapt_steps(loss_fn, params, rule, rule_meta, steps, first_order, trainable):
        pass
    return result
