"""Backbones: ordinary nn.Modules with a ``body`` (features) and a ``head`` (the last linear layer).

They keep no running statistics, so a functional call is a pure function of (params, input).
"""
from metaphi.models.layers import TaskBatchNorm
from metaphi.models.conv4 import Conv4
from metaphi.models.mlp import MLP

__all__ = ["TaskBatchNorm", "Conv4", "MLP", "build_model"]


def build_model(spec: dict):
    """Rebuild a backbone from the dict a checkpoint stores (``{"name": ..., **kwargs}``)."""
    spec = dict(spec)
    name = spec.pop("name")
    if name == "conv4":
        return Conv4(**spec)
    if name == "mlp":
        return MLP(**spec)
    raise ValueError(f"unknown model '{name}' (known: conv4, mlp)")
