"""The small functional pieces every continual method shares: loss, gradient, SGD step, accuracy,
one pass of minibatches, and the split of a network's weights into representation and head.

The network they train is :class:`metaphi.models.PlainConvNet` (no batch normalization: a continual
learner updates on a few examples at a time, often one). Its ``body`` is the representation and its
``head`` the prediction layer, OML's split (Javed & White 2019). Weights live outside it as
``dict[str, Tensor]`` and are passed in at every call (``metaphi.functional``).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.functional import Params, call
from metaphi.functional import accuracy as functional_accuracy


def head_keys(params: Params) -> list[str]:
    return [k for k in params if k.startswith("head.")]


def body_keys(params: Params) -> list[str]:
    return [k for k in params if k.startswith("body.")]


def as_input(x: Tensor) -> Tensor:
    """uint8 images to floats in [0, 1]."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


def loss(net: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(call(net, params, as_input(x)), y)


def accuracy(net: nn.Module, params: Params, x: Tensor, y: Tensor, chunk: int = 512) -> float:
    return functional_accuracy(net, params, as_input(x), y, chunk)


def minibatches(x: Tensor, y: Tensor, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The examples in the order the stream shows them, ``batch`` at a time (one pass)."""
    for s in range(0, len(y), batch):
        yield x[s:s + batch], y[s:s + batch]


def sgd(params: Params, grads: Params, lr: float) -> Params:
    return {k: (p - lr * grads[k]) if k in grads else p for k, p in params.items()}


def grad(net: nn.Module, params: Params, x: Tensor, y: Tensor, keys: list[str] | None = None,
         extra=None) -> tuple[Params, float]:
    """The gradient of the cross-entropy (plus ``extra(params)``, a penalty) with respect to ``keys``
    (all by default), and the loss."""
    keys = list(params) if keys is None else keys
    fixed = {k: v for k, v in params.items() if k not in keys}

    def f(p):
        full = {**fixed, **p}
        value = loss(net, full, x, y)
        if extra is not None:
            value = value + extra(full)
        return value, value

    g, value = torch.func.grad(f, has_aux=True)({k: params[k] for k in keys})
    return g, float(value)
