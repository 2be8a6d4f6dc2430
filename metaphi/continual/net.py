"""The network every continual method trains, and the small functional pieces they share.

A continual learner updates on a few examples at a time, often one, so the network has no batch
normalization (whose statistics of a batch of one are meaningless) and no running state: a plain
stack of 3x3 stride-2 convolutions with ReLU, He-initialized (the representation, ``body``) and one linear layer over
the flattened features (the prediction head, ``head``, one output per class of the stream). OML's
representation/prediction split (Javed & White 2019) is this ``body``/``head`` split. Its weights
live outside it as ``dict[str, Tensor]`` and are passed in at every call (``metaphi.functional``).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.functional import Params, call
from metaphi.functional import accuracy as functional_accuracy


class ConvNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 32, blocks: int = 4,
                 image_size: int = 28):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for _ in range(blocks):
            conv = nn.Conv2d(channels, hidden, 3, stride=2, padding=1)
            # He initialization: with no normalization, torch's default (which shrinks the signal by
            # about 2.4 per layer) leaves the deep end silent and the network stuck at chance
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            channels, size = hidden, (size + 1) // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.feature_dim = hidden * size * size
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.spec = {"in_channels": in_channels, "num_classes": num_classes, "hidden": hidden, "blocks": blocks,
                     "image_size": image_size}

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


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
