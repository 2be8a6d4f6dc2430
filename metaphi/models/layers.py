from __future__ import annotations

import torch
from torch import Tensor, nn


class TaskBatchNorm(nn.Module):
    """Batch normalization with the statistics of the batch at hand, always; no running averages.

    This is BatchNorm as MAML uses it: each task is normalised with its own statistics, at training
    and at test time, so nothing leaks between tasks. It is written in plain tensor operations
    rather than with ``F.batch_norm`` because the fused kernel's double backward gives wrong
    meta-gradients under ``torch.func.vmap`` (torch 2.13; see tests/test_engine.py).
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, unbiased=False)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)
