"""Knowledge distillation, plain and with a teacher that learns to teach.

Plain KD (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural network"). The student
s_θ learns from the hard labels and from the teacher's temperature-softened distribution:

    L_KD(θ; φ, x, y) = (1 − λ) CE(s_θ(x), y) + λ T² KL( softmax(t_φ(x)/T) ‖ softmax(s_θ(x)/T) )

T² keeps the soft term's gradient on the scale of the hard one as T grows. With λ = 0 (and any T)
it is plain training on the labels.

Meta distillation (MetaDistil; Zhou, Xu & McAuley 2022, "BERT learns to teach: knowledge
distillation with meta learning"; in the spirit of Fan et al. 2018, "Learning to teach"). φ — the
teacher — is a meta-parameter: it is judged by how well the student does on a held-out quiz batch
after learning from it. One step, on a training batch (x, y) and a quiz batch (x_q, y_q):

    pilot:    θ'(φ) = θ − α ∇_θ L_KD(θ; φ, x, y)          (a copy of the student; θ is untouched)
    quiz:     L_q(φ) = CE(s_θ'(φ)(x_q), y_q)
    teacher:  φ ← Adam(φ, ∇_φ L_q(φ) + μ ∇_φ CE(t_φ(x), y))
    student:  θ ← Adam(θ, ∇_θ L_KD(θ; φ_new, x, y))       (the real update, with the updated teacher)

MetaDistil's teacher follows the quiz loss alone (μ = 0, the default); μ > 0 also keeps training the
teacher on its own labels, which holds its accuracy up while it learns to teach. ∇_φ L_q = −α (∂²L_KD/∂φ∂θ) v with v = ∇_θ' L_q:

- second order: autograd through the pilot step (``metaphi.inner.adapt`` with one SGD step; its
  ``torch.func.grad`` is differentiated by the outer ``autograd.grad``);
- first order: the mixed product from two first-order teacher gradients by a central difference,
  the approximation of DARTS (Liu, Simonyan & Yang 2019):
  (∂²L/∂φ∂θ) v ≈ [∇_φ L_KD(θ + εv; φ) − ∇_φ L_KD(θ − εv; φ)] / 2ε with ε = ε₀ / ‖v‖.

Everything is functional: parameters are dicts run with ``torch.func.functional_call`` and the
optimizer (Adam, ``adam_init``/``adam_update``) is a pair of pure functions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.functional import Params, call, detach, grads_or_zeros, norm
from metaphi.inner import SGD, adapt

METHODS = ("alone", "kd", "meta", "meta-fo")


@dataclass
class DistillConfig:
    temperature: float = 4.0
    soft_weight: float = 0.5        # λ, the weight of the soft term
    lr: float = 3e-3                # Adam step size of the real student
    pilot_lr: float = 0.1           # α, SGD step size of the pilot update
    teacher_lr: float = 1e-4        # Adam step size of the teacher in meta distillation
    teacher_ce_weight: float = 0.0  # μ; MetaDistil's teacher follows the quiz loss alone
    fd_eps: float = 0.01            # ε₀ of the first-order variant

    def to_dict(self) -> dict:
        return asdict(self)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, temperature: float,
            soft_weight: float) -> Tensor:
    """(1 − λ) CE + λ T² KL(teacher ‖ student) at temperature T (Hinton et al. 2015)."""
    hard = F.cross_entropy(student_logits, labels)
    if teacher_logits is None:
        return hard
    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True)
    return (1 - soft_weight) * hard + soft_weight * t * t * soft


def student_objective(student: nn.Module, teacher: nn.Module | None, teacher_params: Params | None, x: Tensor,
                      y: Tensor, cfg: DistillConfig) -> Callable[[Params], Tensor]:
    """θ ↦ L_KD(θ; φ, x, y); the teacher's logits are computed once and keep their graph to φ."""
    teacher_logits = None if teacher is None else call(teacher, teacher_params, x)
    return lambda theta: kd_loss(call(student, theta, x), teacher_logits, y, cfg.temperature, cfg.soft_weight)


# -- a functional Adam (Kingma & Ba 2015), the optimizer of the real student and of the teacher --

def adam_init(params: Params) -> dict:
    return {"m": {k: torch.zeros_like(v) for k, v in params.items()},
            "v": {k: torch.zeros_like(v) for k, v in params.items()}, "t": 0}


def adam_update(params: Params, grads: Params, state: dict, lr: float, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8) -> tuple[Params, dict]:
    t = state["t"] + 1
    m = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grads.items()}
    v = {k: b2 * state["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    new = {k: p - lr * (m[k] / c1) / ((v[k] / c2).sqrt() + eps) for k, p in params.items()}
    return new, {"m": m, "v": v, "t": t}


def _with_grad(params: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def plain_step(model: nn.Module, params: Params, state: dict, x: Tensor, y: Tensor, lr: float,
               teacher: nn.Module | None = None, teacher_params: Params | None = None,
               cfg: DistillConfig | None = None) -> tuple[Params, dict, Tensor]:
    """One Adam step of a student on L_KD (on plain CE when there is no teacher)."""
    cfg = cfg or DistillConfig()
    theta = _with_grad(params)
    loss = student_objective(model, teacher, None if teacher_params is None else detach(teacher_params), x, y,
                             cfg)(theta)
    grads = grads_or_zeros(loss, theta)
    new, state = adam_update(detach(params), grads, state, lr)
    return new, state, loss.detach()


def pilot_update(student: nn.Module, student_params: Params, teacher: nn.Module, teacher_params: Params, x: Tensor,
                 y: Tensor, cfg: DistillConfig) -> Params:
    """θ'(φ) = θ − α ∇_θ L_KD(θ; φ, x, y): a new dict; the student's own params are never written."""
    return adapt(student_objective(student, teacher, teacher_params, x, y, cfg), dict(student_params),
                 SGD(cfg.pilot_lr), {}, 1)


def quiz_loss(student: nn.Module, params: Params, quiz: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(call(student, params, quiz[0]), quiz[1])


def teacher_meta_grad(student: nn.Module, student_params: Params, teacher: nn.Module, teacher_params: Params,
                      batch: tuple[Tensor, Tensor], quiz: tuple[Tensor, Tensor], cfg: DistillConfig,
                      order: str = "second") -> tuple[Params, Tensor]:
    """∇_φ L_q(φ), the quiz loss of the pilot student, by second-order autograd or (``order="first"``)
    by the central difference of two first-order teacher gradients. Returns (grads, quiz loss)."""
    x, y = batch
    theta = detach(student_params)
    if order == "second":
        phi = _with_grad(teacher_params)
        q = quiz_loss(student, pilot_update(student, theta, teacher, phi, x, y, cfg), quiz)
        return grads_or_zeros(q, phi), q.detach()
    if order != "first":
        raise ValueError(f"order must be 'second' or 'first', got {order!r}")
    phi = detach(teacher_params)
    pilot = _with_grad(pilot_update(student, _with_grad(theta), teacher, phi, x, y, cfg))
    q = quiz_loss(student, pilot, quiz)
    v = grads_or_zeros(q, pilot)
    eps = cfg.fd_eps / (float(norm(v)) + 1e-12)

    def teacher_grad(sign: float) -> Params:
        shifted = {k: theta[k] + sign * eps * v[k] for k in theta}
        p = _with_grad(phi)
        return grads_or_zeros(student_objective(student, teacher, p, x, y, cfg)(shifted), p)

    plus, minus = teacher_grad(1.0), teacher_grad(-1.0)
    return {k: -cfg.pilot_lr * (plus[k] - minus[k]) / (2 * eps) for k in phi}, q.detach()


def meta_distill_step(student: nn.Module, student_params: Params, student_state: dict, teacher: nn.Module,
                      teacher_params: Params, teacher_state: dict, batch: tuple[Tensor, Tensor],
                      quiz: tuple[Tensor, Tensor], cfg: DistillConfig, order: str = "second"):
    """One MetaDistil step: pilot → teacher update from the quiz → real student update.

    Returns (student_params, student_state, teacher_params, teacher_state, metrics)."""
    meta, q = teacher_meta_grad(student, student_params, teacher, teacher_params, batch, quiz, cfg, order)
    if cfg.teacher_ce_weight:
        phi = _with_grad(teacher_params)
        own = F.cross_entropy(call(teacher, phi, batch[0]), batch[1])
        meta = {k: g + cfg.teacher_ce_weight * h for (k, g), h in zip(meta.items(), grads_or_zeros(own, phi).values())}
    teacher_params, teacher_state = adam_update(detach(teacher_params), meta, teacher_state, cfg.teacher_lr)
    student_params, student_state, loss = plain_step(student, student_params, student_state, batch[0], batch[1],
                                                     cfg.lr, teacher, teacher_params, cfg)
    return student_params, student_state, teacher_params, teacher_state, {"loss": float(loss), "quiz": float(q)}


def train_student(student: nn.Module, params: Params, train: tuple[Tensor, Tensor], epochs: int, batch: int,
                  generator: torch.Generator, method: str = "alone", cfg: DistillConfig | None = None,
                  teacher: nn.Module | None = None, teacher_params: Params | None = None,
                  quiz: tuple[Tensor, Tensor] | None = None, on_epoch: Callable[[int, dict], None] | None = None):
    """Train a student for ``epochs`` passes over ``train`` by ``method`` (one of ``METHODS``).

    "alone" ignores the teacher; "kd" distils from a fixed teacher; "meta"/"meta-fo" update the
    teacher as well, with quiz batches drawn from ``quiz``. Returns (student params, teacher params).
    ``generator`` decides the batch order (and the quiz batches) and nothing else."""
    cfg = cfg or DistillConfig()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "alone" and (teacher is None or teacher_params is None):
        raise ValueError(f"method {method!r} needs a teacher")
    if method.startswith("meta") and quiz is None:
        raise ValueError("meta distillation needs a quiz set")
    x, y = train
    state = adam_init(params)
    t_params = None if teacher_params is None else detach(teacher_params)
    t_state = None if t_params is None else adam_init(t_params)
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        losses = []
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            b = (x[idx], y[idx])
            if method.startswith("meta"):
                q_idx = torch.randint(len(quiz[1]), (min(batch, len(quiz[1])),), generator=generator)
                params, state, t_params, t_state, m = meta_distill_step(
                    student, params, state, teacher, t_params, t_state, b, (quiz[0][q_idx], quiz[1][q_idx]), cfg,
                    "first" if method == "meta-fo" else "second")
                losses.append(m["loss"])
            else:
                params, state, loss = plain_step(student, params, state, b[0], b[1], cfg.lr,
                                                 teacher if method == "kd" else None, t_params, cfg)
                losses.append(float(loss))
            if losses[-1] != losses[-1]:
                raise FloatingPointError(f"loss became NaN in epoch {epoch + 1}; lower --lr or --teacher-lr")
        if on_epoch is not None:
            on_epoch(epoch, {"loss": sum(losses) / len(losses), "params": params, "teacher_params": t_params})
    return params, t_params
