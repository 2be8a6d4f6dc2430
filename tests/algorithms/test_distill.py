"""Distillation, the method: KD reduces to plain training, the teacher's meta-gradient against finite
differences in float64, and the pilot update leaves the real student alone."""
import copy
import dataclasses

import torch
import torch.nn.functional as F

from metaphi.algorithms.distill import (DistillOptions, kd_loss, meta_distill_step, pilot_update, plain_step,
                                        quiz_loss, teacher_meta_grad)
from metaphi.functional import params_of
from metaphi.inner.rules import Adam, build_rule
from metaphi.models import MLP


def _problem(dtype=torch.float64, n=12, classes=3, features=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module construction only
    teacher = MLP(features, classes, (7,), activation="tanh").to(dtype)
    student = MLP(features, classes, (4,), activation="tanh").to(dtype)
    x = torch.randn(n, features, generator=g, dtype=dtype)
    y = torch.randint(classes, (n,), generator=g)
    xq = torch.randn(n, features, generator=g, dtype=dtype)
    yq = torch.randint(classes, (n,), generator=g)
    return teacher, student, (x, y), (xq, yq), g


def test_kd_with_t1_and_zero_soft_weight_is_plain_training():
    teacher, student, (x, y), _, g = _problem()
    s_logits, t_logits = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.allclose(kd_loss(s_logits, t_logits, labels, 1.0, 0.0), F.cross_entropy(s_logits, labels))
    # KD training (T=1, λ=0) against an independent loop: the module itself with torch.optim.Adam
    cfg = DistillOptions(temperature=1.0, soft_weight=0.0, lr=1e-2)
    params, t_params = params_of(student), params_of(teacher)
    state = Adam(cfg.lr).init(params)
    reference = copy.deepcopy(student)
    opt = torch.optim.Adam(reference.parameters(), lr=cfg.lr)
    for step in range(5):
        idx = torch.arange(step, step + 6) % len(y)
        params, state, _ = plain_step(student, params, state, x[idx], y[idx], cfg.lr, teacher, t_params, cfg)
        opt.zero_grad()
        F.cross_entropy(reference(x[idx]), y[idx]).backward()
        opt.step()
    for k, v in reference.named_parameters():
        assert torch.allclose(params[k], v.detach(), atol=1e-12), k


def test_adam_rule_is_rebuilt_from_its_spec():
    rule = Adam(0.01, b2=0.99)
    again = build_rule(rule.spec())
    assert isinstance(again, Adam) and again.spec() == rule.spec() and rule.meta_params({"w": torch.ones(2)}) == {}


def test_soft_term_pulls_student_towards_teacher():
    t = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    loss_same = kd_loss(t.clone(), t, torch.tensor([0]), 3.0, 1.0)
    loss_other = kd_loss(-t, t, torch.tensor([0]), 3.0, 1.0)
    assert abs(float(loss_same)) < 1e-12 and float(loss_other) > 0.1


def _quiz_of_phi(student, theta, teacher, phi, batch, quiz, cfg):
    return quiz_loss(student, pilot_update(student, theta, teacher, phi, *batch, cfg), quiz)


def test_teacher_meta_gradient_matches_finite_differences():
    teacher, student, batch, quiz, g = _problem()
    cfg = DistillOptions(temperature=2.0, soft_weight=0.7, pilot_lr=0.5)
    theta, phi = params_of(student, False), params_of(teacher, False)
    grads, _ = teacher_meta_grad(student, theta, teacher, phi, batch, quiz, cfg, "second")
    h = 1e-6
    for k in phi:
        flat = phi[k].reshape(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
            e = torch.zeros_like(flat)
            e[i] = h
            plus = {**phi, k: (flat + e).view_as(phi[k])}
            minus = {**phi, k: (flat - e).view_as(phi[k])}
            with torch.enable_grad():
                fd = (_quiz_of_phi(student, theta, teacher, plus, batch, quiz, cfg)
                      - _quiz_of_phi(student, theta, teacher, minus, batch, quiz, cfg)) / (2 * h)
            assert abs(float(fd) - float(grads[k].reshape(-1)[i])) < 1e-7, (k, i)
    # the first-order variant approximates the same vector by a difference of first-order gradients
    approx, _ = teacher_meta_grad(student, theta, teacher, phi, batch, quiz, dataclasses.replace(cfg, fd_eps=1e-4),
                                  "first")
    flat_true = torch.cat([grads[k].reshape(-1) for k in phi])
    flat_approx = torch.cat([approx[k].reshape(-1) for k in phi])
    assert torch.allclose(flat_approx, flat_true, atol=1e-6 * float(flat_true.abs().max()) + 1e-9)


def test_pilot_update_leaves_real_student_unchanged():
    teacher, student, batch, quiz, g = _problem()
    cfg = DistillOptions()
    theta, phi = params_of(student, False), params_of(teacher, True)
    before = {k: v.clone() for k, v in theta.items()}
    pilot = pilot_update(student, theta, teacher, phi, *batch, cfg)
    assert any(not torch.equal(pilot[k], before[k]) for k in before)
    assert all(torch.equal(theta[k], before[k]) for k in before)
    module_before = {k: v.clone() for k, v in student.named_parameters()}
    # the meta step's student update is the plain KD step taken from the untouched θ with the new teacher
    s_state, t_state = Adam(cfg.lr).init(theta), Adam(cfg.teacher_lr).init(phi)
    new_theta, _, new_phi, _, _ = meta_distill_step(student, theta, s_state, teacher, phi, t_state, batch, quiz, cfg)
    assert all(torch.equal(theta[k], before[k]) for k in before)
    assert all(torch.equal(v, module_before[k]) for k, v in student.named_parameters())
    expected, _, _ = plain_step(student, before, Adam(cfg.lr).init(before), *batch, cfg.lr, teacher, new_phi, cfg)
    assert all(torch.allclose(new_theta[k], expected[k], atol=1e-12) for k in before)
    assert any(not torch.allclose(new_phi[k], phi[k]) for k in phi)
