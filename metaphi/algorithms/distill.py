"""Knowledge distillation, plain and with a teacher that learns to teach: the method.

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
teacher on its own labels, which holds its accuracy up while it learns to teach.
∇_φ L_q = −α (∂²L_KD/∂φ∂θ) v with v = ∇_θ' L_q:

- second order: autograd through the pilot step (``metaphi.inner.adapt`` with one SGD step; its
  ``torch.func.grad`` is differentiated by the outer ``autograd.grad``);
- first order: the mixed product from two first-order teacher gradients by a central difference,
  the approximation of DARTS (Liu, Simonyan & Yang 2019):
  (∂²L/∂φ∂θ) v ≈ [∇_φ L_KD(θ + εv; φ) − ∇_φ L_KD(θ − εv; φ)] / 2ε with ε = ε₀ / ‖v‖.

Everything is functional: parameters are dicts run with ``torch.func.functional_call``; the student
and the teacher are updated by the Adam update rule of ``metaphi.inner.rules`` (pure ``init`` /
``update``). This file is the method only: the loop over batches is ``metaphi.train_online``'s, with
the step and the epochs written in ``metaphi.experiments.distill``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.config import option
from metaphi.functional import Params, call, detach, grads_or_zeros, norm
from metaphi.inner import SGD, adapt
from metaphi.inner.rules import Adam

#: how a student is trained: alone on the labels, from a fixed teacher, or with a teacher that learns
#: to teach (second-order or first-order meta-gradient)
METHODS = ("alone", "kd", "meta", "meta-fo")


@dataclass
class DistillOptions:
    """The method's hyperparameters."""

    temperature: float = option(4.0, "temperature T of the soft term", check="positive")
    soft_weight: float = option(0.5, "weight λ of the soft term", check="unit")
    lr: float = option(3e-3, "Adam step size of the real student", check="positive")
    pilot_lr: float = option(0.1, "SGD step size α of the pilot update", check="positive")
    teacher_lr: float = option(1e-4, "Adam step size of the teacher in meta distillation", check="positive")
    teacher_ce_weight: float = option(0.0, "μ, weight of the teacher's own CE (0: MetaDistil's quiz loss alone)",
                                      check="nonneg")
    fd_eps: float = option(0.01, "ε₀ of the first-order variant's central difference", check="positive")


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
                      y: Tensor, opts: DistillOptions) -> Callable[[Params], Tensor]:
    """θ ↦ L_KD(θ; φ, x, y); the teacher's logits are computed once and keep their graph to φ."""
    teacher_logits = None if teacher is None else call(teacher, teacher_params, x)
    return lambda theta: kd_loss(call(student, theta, x), teacher_logits, y, opts.temperature, opts.soft_weight)


def _with_grad(params: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def plain_step(model: nn.Module, params: Params, state: dict, x: Tensor, y: Tensor, lr: float,
               teacher: nn.Module | None = None, teacher_params: Params | None = None,
               opts: DistillOptions | None = None) -> tuple[Params, dict, Tensor]:
    """One Adam step (step size ``lr``; ``state`` from ``Adam.init``) of a student on L_KD, on plain CE
    when there is no teacher. The teacher is held fixed."""
    opts = opts or DistillOptions()
    theta = _with_grad(params)
    loss = student_objective(model, teacher, None if teacher_params is None else detach(teacher_params), x, y,
                             opts)(theta)
    grads = grads_or_zeros(loss, theta)
    new, state = Adam(lr).update(detach(params), grads, state, {})
    return new, state, loss.detach()


def pilot_update(student: nn.Module, student_params: Params, teacher: nn.Module, teacher_params: Params, x: Tensor,
                 y: Tensor, opts: DistillOptions) -> Params:
    """θ'(φ) = θ − α ∇_θ L_KD(θ; φ, x, y): a new dict; the student's own params are never written."""
    return adapt(student_objective(student, teacher, teacher_params, x, y, opts), dict(student_params),
                 SGD(opts.pilot_lr), {}, 1)


def quiz_loss(student: nn.Module, params: Params, quiz: tuple[Tensor, Tensor]) -> Tensor:
    """L_q = CE(s_θ(x_q), y_q)."""
    return F.cross_entropy(call(student, params, quiz[0]), quiz[1])


def teacher_meta_grad(student: nn.Module, student_params: Params, teacher: nn.Module, teacher_params: Params,
                      batch: tuple[Tensor, Tensor], quiz: tuple[Tensor, Tensor], opts: DistillOptions,
                      order: str = "second") -> tuple[Params, Tensor]:
    """∇_φ L_q(φ), the quiz loss of the pilot student, by second-order autograd or (``order="first"``)
    by the central difference of two first-order teacher gradients. Returns (grads, quiz loss)."""
    x, y = batch
    theta = detach(student_params)
    if order == "second":
        phi = _with_grad(teacher_params)
        q = quiz_loss(student, pilot_update(student, theta, teacher, phi, x, y, opts), quiz)
        return grads_or_zeros(q, phi), q.detach()
    if order != "first":
        raise ValueError(f"order must be 'second' or 'first', got {order!r}")
    phi = detach(teacher_params)
    pilot = _with_grad(pilot_update(student, _with_grad(theta), teacher, phi, x, y, opts))
    q = quiz_loss(student, pilot, quiz)
    v = grads_or_zeros(q, pilot)
    eps = opts.fd_eps / (float(norm(v)) + 1e-12)

    def teacher_grad(sign: float) -> Params:
        shifted = {k: theta[k] + sign * eps * v[k] for k in theta}
        p = _with_grad(phi)
        return grads_or_zeros(student_objective(student, teacher, p, x, y, opts)(shifted), p)

    plus, minus = teacher_grad(1.0), teacher_grad(-1.0)
    return {k: -opts.pilot_lr * (plus[k] - minus[k]) / (2 * eps) for k in phi}, q.detach()


def teacher_step(student: nn.Module, student_params: Params, teacher: nn.Module, teacher_params: Params,
                 teacher_state: dict, batch: tuple[Tensor, Tensor], quiz: tuple[Tensor, Tensor],
                 opts: DistillOptions, order: str = "second") -> tuple[Params, dict, Tensor]:
    """φ ← Adam(φ, ∇_φ L_q(φ) + μ ∇_φ CE(t_φ(x), y)). Returns (teacher params, teacher state, quiz loss)."""
    meta, q = teacher_meta_grad(student, student_params, teacher, teacher_params, batch, quiz, opts, order)
    if opts.teacher_ce_weight:
        phi = _with_grad(teacher_params)
        own = F.cross_entropy(call(teacher, phi, batch[0]), batch[1])
        meta = {k: g + opts.teacher_ce_weight * h for (k, g), h in zip(meta.items(), grads_or_zeros(own, phi).values())}
    teacher_params, teacher_state = Adam(opts.teacher_lr).update(detach(teacher_params), meta, teacher_state, {})
    return teacher_params, teacher_state, q


def meta_distill_step(student: nn.Module, student_params: Params, student_state: dict, teacher: nn.Module,
                      teacher_params: Params, teacher_state: dict, batch: tuple[Tensor, Tensor],
                      quiz: tuple[Tensor, Tensor], opts: DistillOptions, order: str = "second"):
    """One MetaDistil step: pilot → teacher update from the quiz → real student update.

    Returns (student_params, student_state, teacher_params, teacher_state, metrics)."""
    teacher_params, teacher_state, q = teacher_step(student, student_params, teacher, teacher_params, teacher_state,
                                                    batch, quiz, opts, order)
    student_params, student_state, loss = plain_step(student, student_params, student_state, batch[0], batch[1],
                                                     opts.lr, teacher, teacher_params, opts)
    return student_params, student_state, teacher_params, teacher_state, {"loss": float(loss), "quiz": float(q)}
