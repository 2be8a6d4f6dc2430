"""Continual-learning metrics from the accuracy matrix.

The accuracy matrix of a stream of T experiences is

    R[i, j] = test accuracy on experience j after learning experiences 0..i      (i, j in 0..T-1)

(Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning", §5). Row i is one
evaluation of the learner on every experience's test set; entries with j > i are experiences the
learner has not met yet. From it:

* **Average accuracy** after the whole stream (Lopez-Paz & Ranzato's ACC):
  ``A = (1/T) Σ_j R[T-1, j]``.
* **Accuracy over time**, the average accuracy on the experiences seen so far after each one:
  ``a_i = (1/(i+1)) Σ_{j<=i} R[i, j]``; ``a_{T-1} = A``. This is the curve of the PNG plot (OML's
  "accuracy on all classes seen so far").
* **Backward transfer** (Lopez-Paz & Ranzato's BWT), how learning later experiences changed the
  accuracy on earlier ones, measured from the moment each was learned:
  ``BWT = (1/(T-1)) Σ_{j<T-1} (R[T-1, j] - R[j, j])``; negative is forgetting.
* **Forgetting** (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", eq. 2), how
  far each earlier experience fell from the best accuracy it ever had:
  ``f_j = max_{l in 0..T-2} R[l, j] - R[T-1, j]`` for ``j < T-1``, and
  ``F = (1/(T-1)) Σ_{j<T-1} f_j``. The maximum runs over every earlier row, as in the paper; rows
  ``l < j`` hold the accuracy before experience j was trained (near chance), so in practice the
  best is at some ``l >= j``. ``F >= -BWT``; they differ when an experience's accuracy peaked
  after it was learned (positive transfer that was later lost).
* **Forward transfer** (Lopez-Paz & Ranzato's FWT), given accuracies ``b_j`` of the initial,
  untrained learner: ``FWT = (1/(T-1)) Σ_{j>=1} (R[j-1, j] - b_j)``.

Every function takes R as a T x T nested list or tensor. Entries R[i, j] with j > i (experiences not
met yet) enter only F's maximum and FWT. With one experience BWT, F and FWT are 0 by definition.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _matrix(R) -> Tensor:
    R = torch.as_tensor(R, dtype=torch.float64)
    if R.dim() != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"the accuracy matrix must be T x T with T >= 1, got shape {tuple(R.shape)}")
    return R


def average_accuracy(R) -> float:
    R = _matrix(R)
    return float(R[-1].mean())


def accuracy_over_time(R) -> list[float]:
    R = _matrix(R)
    return [float(R[i, : i + 1].mean()) for i in range(R.shape[0])]


def backward_transfer(R) -> float:
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float((R[-1, :-1] - R.diagonal()[:-1]).mean())


def forgetting(R) -> float:
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    best = R[:-1, :-1].max(dim=0).values
    return float((best - R[-1, :-1]).mean())


def forward_transfer(R, initial) -> float:
    R = _matrix(R)
    b = torch.as_tensor(initial, dtype=torch.float64)
    T = R.shape[0]
    if b.shape != (T,):
        raise ValueError(f"initial accuracies must have T = {T} entries, got shape {tuple(b.shape)}")
    if T == 1:
        return 0.0
    return float((R[:-1].diagonal(offset=1) - b[1:]).mean())


def summary(R, initial=None) -> dict:
    out = {"average_accuracy": average_accuracy(R), "backward_transfer": backward_transfer(R),
           "forgetting": forgetting(R), "accuracy_over_time": accuracy_over_time(R)}
    if initial is not None:
        out["forward_transfer"] = forward_transfer(R, initial)
    return out
