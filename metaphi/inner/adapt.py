"""The inner loop: learning one task from its support set.

How the inner loop is unrolled for the outer gradient is one small value, ``Unroll``, that the
estimator (step 3) hands to the algorithm's task loss (step 2), which hands it to ``adapt``:

* ``first_order``: the inner gradients are constants (first-order MAML); no second derivatives.
* ``checkpoint``: gradient checkpointing. It keeps only each step's parameters and recomputes a
  step's graph when the outer backward reaches it (``torch.utils.checkpoint``), so the memory of a
  second-order meta-gradient grows with the inner steps by one parameter set per step instead of one
  full double-backward graph per step: long inner loops fit, for about two more forwards and one
  more inner backward per step (torch's checkpoint recomputes a step's forward once for its inner
  gradient and once for the outer backward). It runs one task at a time: the checkpointed step takes
  its gradient with ``torch.autograd.grad``, because ``torch.func.grad`` does not run under
  checkpointing's saved-tensor hooks, so it cannot be vmapped.

There is no hidden state: what is not in the ``Unroll`` an algorithm is handed does not happen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor
import torch.utils.checkpoint
from torch.utils import _pytree as pytree

from metaphi.functional import Params, detach
from metaphi.inner.rules import UpdateRule


@dataclass(frozen=True)
class Unroll:
    """How the inner loop is differentiated: chosen by the estimator, obeyed by ``adapt``.

    ``first_order``: the inner gradients are held constant, so ∂θ_k/∂φ drops its second-derivative
    terms (Finn et al. 2017, §5.2). ``checkpoint``: each inner step is recomputed in the outer
    backward instead of stored (see the module docstring); it applies only while gradients are
    recorded, and one task at a time.
    """

    first_order: bool = False
    checkpoint: bool = False


#: the inner loop with constant inner gradients: first-order meta-gradients, and the cheap way to
#: adapt where no outer gradient is taken (evaluation, prediction)
FIRST_ORDER = Unroll(first_order=True)


def adapt_steps(
    loss_fn: Callable[[Params], Tensor],
    params: Params,
    rule: UpdateRule,
    rule_meta: Params,
    steps: int,
    unroll: Unroll = Unroll(),
    trainable: Iterable[str] | None = None,
) -> Iterator[Params]:
    """Yield the params after 0, 1, ..., ``steps`` updates of ``rule`` on ``loss_fn``.

    ``loss_fn(params)`` is the support loss. Only the keys in ``trainable`` change (all by default;
    ANIL passes the head's). With ``unroll.first_order`` the inner gradients are constants: the
    update arithmetic stays differentiable (so a learned step size still gets a gradient) but no
    second derivatives are formed, which is first-order MAML. Gradients come from ``torch.func.grad``
    so the same code runs inside ``vmap`` over a batch of tasks and under an outer ``autograd.grad``.
    ``unroll.checkpoint`` checkpoints each step (see the module docstring) while gradients are recorded.
    """
    if not isinstance(unroll, Unroll):
        raise TypeError(f"unroll must be a metaphi.inner.Unroll, got {type(unroll).__name__}")
    first_order = unroll.first_order
    keys = list(params) if trainable is None else [k for k in params if k in set(trainable)]
    fixed = {k: v for k, v in params.items() if k not in keys}
    current = {k: params[k] for k in keys}
    state = rule.init(current)
    yield {**fixed, **current}
    fixed_const = detach(fixed) if first_order else fixed
    if torch.compiler.is_compiling():  # compiled code is one graph: never checkpointed (Unrolled refuses both)
        checkpointed = False
    else:
        checkpointed = unroll.checkpoint and torch.is_grad_enabled()
    if checkpointed and torch._C._functorch.maybe_current_level() is not None:
        raise ValueError("a checkpointed inner loop runs one task at a time and cannot run under torch.func "
                         "transforms (vmap, grad); run the tasks in a loop (the estimator option loop)")
    for _ in range(steps):
        if checkpointed:
            current, state = _checkpointed_step(loss_fn, fixed_const, current, state, rule,
                                                {k: v for k, v in rule_meta.items() if k not in fixed}, first_order)
        else:
            if first_order:
                grads = torch.func.grad(lambda p: loss_fn({**fixed_const, **p}))(detach(current))
            else:
                grads = torch.func.grad(lambda p: loss_fn({**fixed, **p}))(current)
            current, state = rule.update(current, grads, state, {k: v for k, v in rule_meta.items() if k not in fixed})
        yield {**fixed, **current}


def adapt(loss_fn: Callable[[Params], Tensor], params: Params, rule: UpdateRule, rule_meta: Params, steps: int,
          unroll: Unroll = Unroll(), trainable: Iterable[str] | None = None) -> Params:
    """The params after ``steps`` inner updates (see ``adapt_steps``)."""
    result = params
    for result in adapt_steps(loss_fn, params, rule, rule_meta, steps, unroll, trainable):
        pass
    return result


def _checkpointed_step(loss_fn, fixed: Params, current: Params, state, rule: UpdateRule, meta: Params,
                       first_order: bool) -> tuple[Params, object]:
    """One update of ``rule``, recomputed in the outer backward instead of stored."""
    leaves, spec = pytree.tree_flatten((current, state))
    out_spec = []

    def step(*flat):
        params, st = pytree.tree_unflatten(list(flat), spec)
        with torch.enable_grad():
            if first_order:
                probe = {k: v.detach().requires_grad_() for k, v in params.items()}
            else:  # entries that carry no graph (a detached φ) still need a gradient of their own
                probe = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
            loss = loss_fn({**fixed, **probe})
            found = torch.autograd.grad(loss, list(probe.values()), create_graph=not first_order, allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(params.items(), found)}
        new, new_state = rule.update(params, grads, st, meta)
        out, tree = pytree.tree_flatten((new, new_state))
        out_spec[:] = [tree]
        return tuple(out)

    out = torch.utils.checkpoint.checkpoint(step, *leaves, use_reentrant=False)
    return pytree.tree_unflatten(list(out), out_spec[0])
