"""Parameters as data: dicts of tensors, a functional call of a module, and small tree helpers.

A model is an ordinary ``nn.Module``; its weights live outside it as ``dict[str, Tensor]`` and are
passed in at every call. Adapting a model to a task returns a new dict and never touches the module.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


def params_of(module: nn.Module, requires_grad: bool = True) -> Params:
    """A detached copy of a module's parameters: the starting point of φ."""
    return {k: v.detach().clone().requires_grad_(requires_grad) for k, v in module.named_parameters()}


def call(module: nn.Module, params: Mapping[str, Tensor], *args, **kwargs):
    """Run ``module`` with ``params`` in place of its own parameters."""
    return functional_call(module, dict(params), args, kwargs)


@torch.no_grad()
def accuracy(module: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, chunk: int = 1024, *args) -> float:
    """Classification accuracy of ``module`` run with ``params`` on (x, y), ``chunk`` examples at a time
    (extra ``args`` go to every call). A model with batch statistics normalizes each chunk with its own,
    so the chunk size is part of the result. NaN when there are no examples."""
    if len(y) == 0:
        return float("nan")
    right = 0
    for s in range(0, len(y), chunk):
        right += int((call(module, params, x[s:s + chunk], *args).argmax(-1) == y[s:s + chunk]).sum())
    return right / len(y)


def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> Params:
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float | Tensor = 1.0) -> Params:
    return {k: a[k] + alpha * b[k] for k in a}


def sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Params:
    return {k: a[k] - b[k] for k in a}


def scale(a: Mapping[str, Tensor], s: float | Tensor) -> Params:
    return {k: v * s for k, v in a.items()}


def zeros_like(a: Mapping[str, Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in a.items()}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def norm(a: Mapping[str, Tensor]) -> Tensor:
    return torch.sqrt(dot(a, a))


def prefixed(tree: Mapping[str, Tensor], prefix: str) -> Params:
    """The entries under ``prefix.``, with the prefix removed: φ keeps its parts in one flat dict."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tree.items() if k.startswith(p)}


def with_prefix(tree: Mapping[str, Tensor], prefix: str) -> Params:
    return {f"{prefix}.{k}": v for k, v in tree.items()}


def select(tree: Mapping[str, Tensor], keys: Iterable[str]) -> Params:
    return {k: tree[k] for k in keys}


def grads_or_zeros(loss: Tensor, params: Mapping[str, Tensor], **kwargs) -> Params:
    """d loss / d params, with zeros for entries the loss does not depend on."""
    keys = [k for k, v in params.items() if v.requires_grad]
    grads = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True, **kwargs)
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for k, g in zip(keys, grads):
        if g is not None:
            out[k] = g
    return out
