"""Sinusoid regression as in the MAML paper (Finn et al. 2017, §5.1).

A task is y = A sin(x − b) with amplitude A ~ U[0.1, 5.0], phase b ~ U[0, π], and inputs
x ~ U[−5, 5]; the learner sees K support points and is scored by mean squared error on the query.
"""
from __future__ import annotations

import math

import torch

from metaphi.tasks.base import DataError, Task


class SinusoidTasks:
    def __init__(self, shots: int, query: int, amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
        for label, value in (("shots", shots), ("query", query)):
            if value < 1:
                raise DataError(f"{label} must be a positive integer, got {value}")
        self.shots, self.query = shots, query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def _uniform(self, n: int, lo_hi, generator: torch.Generator) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def sample_batch(self, n: int, generator: torch.Generator) -> Task:
        amp = self._uniform(n, self.amplitude, generator).view(n, 1, 1)
        phase = self._uniform(n, self.phase, generator).view(n, 1, 1)
        x = self._uniform(n * (self.shots + self.query), self.x_range, generator).view(n, -1, 1)
        y = amp * torch.sin(x - phase)
        s = self.shots
        return Task((x[:, :s], y[:, :s]), (x[:, s:], y[:, s:]))

    def sample(self, generator: torch.Generator) -> Task:
        batch = self.sample_batch(1, generator)
        return batch.unstack()[0]
