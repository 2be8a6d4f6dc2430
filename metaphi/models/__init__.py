"""Backbones: ordinary nn.Modules with a ``body`` (features) and a ``head`` (the last linear layer).

They keep no running statistics, so a functional call is a pure function of (params, input).

Every backbone has a name in ``MODELS`` and a spec, ``{"name": ..., **constructor arguments}``, that
checkpoints store and :func:`build_model` rebuilds it from:

    conv4          Conv4: the four-block convnet of MAML/ProtoNet (task batch norm)      (conv4.py)
    mlp            MLP: fully connected; MAML's sinusoid regressor                        (mlp.py)
    dg-convnet     GroupNormConvNet: stride-2 convnet with group norm, for MLDG          (convnet.py)
    plain-convnet  PlainConvNet: stride-2 convnet with no normalization, for continual   (convnet.py)
    resnet12       ResNet12: the few-shot ResNet-12 (MetaOptNet, RFS), task batch norm   (resnet.py)
    wrn            WideResNet: WRN-depth-widen (WRN-28-10 by default), task batch norm   (resnet.py)
    timm           TimmModel: any timm architecture by name, without weights             (resnet.py)

A study that knows its data but not every argument gives a partial spec and the data's shape:
``build_model({"name": "conv4", "hidden": 8}, input_shape=(1, 28, 28), out_features=10)``.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

from torch import nn

from metaphi.models.layers import GroupNorm, TaskBatchNorm
from metaphi.models.conv4 import Conv4
from metaphi.models.convnet import GroupNormConvNet, PlainConvNet
from metaphi.models.mlp import MLP
from metaphi.models.resnet import ResNet12, TimmModel, WideResNet
from metaphi.models.factory import from_factory

__all__ = ["TaskBatchNorm", "GroupNorm", "Conv4", "MLP", "GroupNormConvNet", "PlainConvNet", "ResNet12",
           "WideResNet", "TimmModel", "MODELS", "IMAGE_MODELS", "build_model", "spec_of", "model_named",
           "from_factory"]


def _image(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"a convnet takes images (channels, height, width), got input shape {tuple(shape)}")
    return tuple(shape)  # type: ignore[return-value]


#: name -> (class, the constructor arguments an input shape (C, H, W) fixes, the argument naming the outputs)
MODELS: dict[str, tuple[type[nn.Module], Callable[[Sequence[int]], dict], str]] = {
    "conv4": (Conv4, lambda s: {"in_channels": _image(s)[0], "image_size": _image(s)[1]}, "out_features"),
    "mlp": (MLP, lambda s: {"in_features": math.prod(s)}, "out_features"),
    "dg-convnet": (GroupNormConvNet, lambda s: {"in_channels": _image(s)[0]}, "out_features"),
    "plain-convnet": (PlainConvNet, lambda s: {"in_channels": _image(s)[0], "image_size": _image(s)[1]},
                      "num_classes"),
    "resnet12": (ResNet12, lambda s: {"in_channels": _image(s)[0]}, "out_features"),
    "wrn": (WideResNet, lambda s: {"in_channels": _image(s)[0]}, "out_features"),
    "timm": (TimmModel, lambda s: {"in_channels": _image(s)[0]}, "out_features"),
}
#: the backbones ``metaphi run --model`` offers on image benchmarks (and ``timm:ARCHITECTURE``)
IMAGE_MODELS = {"conv4": {"name": "conv4"}, "resnet12": {"name": "resnet12"},
                "wrn-28-10": {"name": "wrn", "depth": 28, "widen": 10}}


def model_named(text: str) -> dict:
    """The partial spec ``--model TEXT`` names: a key of IMAGE_MODELS, ``conv4-WIDTH`` (Conv4 with
    WIDTH filters a layer instead of 64), ``wrn-DEPTH-WIDEN`` or ``timm:ARCHITECTURE``; a ValueError
    listing them otherwise."""
    if text in IMAGE_MODELS:
        return dict(IMAGE_MODELS[text])
    if text.startswith("timm:") and len(text) > 5:
        return {"name": "timm", "architecture": text[5:]}
    parts = text.split("-")
    if len(parts) == 2 and parts[0] == "conv4" and parts[1].isdigit() and int(parts[1]) > 0:
        return {"name": "conv4", "hidden": int(parts[1])}
    if len(parts) == 3 and parts[0] == "wrn" and parts[1].isdigit() and parts[2].isdigit():
        return {"name": "wrn", "depth": int(parts[1]), "widen": int(parts[2])}
    raise ValueError(f"unknown model '{text}' (valid: {', '.join(IMAGE_MODELS)}, conv4-WIDTH, wrn-DEPTH-WIDEN, "
                     "timm:ARCHITECTURE)")


def build_model(spec: dict, *, input_shape: Sequence[int] | None = None, out_features: int | None = None) -> nn.Module:
    """The backbone ``spec`` names (``{"name": ..., **constructor arguments}``; see ``MODELS``).

    ``input_shape`` ((C, H, W) for images, (features,) for vectors) and ``out_features`` fill in the
    arguments a partial spec leaves to the data: channels and image size, input features, outputs.
    An argument both given in the spec and implied by them must agree. Raises ValueError naming an
    unknown model or argument.
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (known: {', '.join(MODELS)})")
    cls, inputs, output = MODELS[name]
    implied = dict(inputs(input_shape)) if input_shape is not None else {}
    if out_features is not None:
        implied[output] = out_features
    for key, value in implied.items():
        if key in spec and spec[key] != value:
            raise ValueError(f"model '{name}': the spec's {key}={spec[key]!r} disagrees with the data's {value!r}")
    arguments = {**implied, **spec}
    known = list(inspect.signature(cls).parameters)
    unknown = [k for k in arguments if k not in known]
    if unknown:
        raise ValueError(f"model '{name}' takes no argument '{unknown[0]}' (it takes: {', '.join(known)})")
    return cls(**arguments)


def spec_of(model: nn.Module) -> dict:
    """The spec :func:`build_model` rebuilds ``model`` from (its ``spec``, with the name added where the
    class leaves it out)."""
    for name, (cls, _, _) in MODELS.items():
        if type(model) is cls:
            return {"name": name, **{k: v for k, v in model.spec.items() if k != "name"}}
    raise ValueError(f"{type(model).__name__} is not a registered backbone (known: {', '.join(MODELS)})")
