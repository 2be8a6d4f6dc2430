"""Distillation: KD reduces to plain training, the teacher's meta-gradient against finite
differences in float64, and the pilot update leaves the real student alone."""
import copy

import torch
import torch.nn.functional as F

from metaphi.algorithms.distill import (DistillConfig, adam_init, kd_loss, meta_distill_step, pilot_update,
                                        plain_step, quiz_loss, teacher_meta_grad, train_student)
from metaphi.functional import params_of
from metaphi.models import MLP, Conv4


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
    cfg = DistillConfig(temperature=1.0, soft_weight=0.0, lr=1e-2)
    params, state, t_params = params_of(student), adam_init(params_of(student)), params_of(teacher)
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


def test_soft_term_pulls_student_towards_teacher():
    t = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64)
    loss_same = kd_loss(t.clone(), t, torch.tensor([0]), 3.0, 1.0)
    loss_other = kd_loss(-t, t, torch.tensor([0]), 3.0, 1.0)
    assert abs(float(loss_same)) < 1e-12 and float(loss_other) > 0.1


def _quiz_of_phi(student, theta, teacher, phi, batch, quiz, cfg):
    return quiz_loss(student, pilot_update(student, theta, teacher, phi, *batch, cfg), quiz)


def test_teacher_meta_gradient_matches_finite_differences():
    teacher, student, batch, quiz, g = _problem()
    cfg = DistillConfig(temperature=2.0, soft_weight=0.7, pilot_lr=0.5)
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
    approx, _ = teacher_meta_grad(student, theta, teacher, phi, batch, quiz,
                                  DistillConfig(**{**cfg.to_dict(), "fd_eps": 1e-4}), "first")
    flat_true = torch.cat([grads[k].reshape(-1) for k in phi])
    flat_approx = torch.cat([approx[k].reshape(-1) for k in phi])
    assert torch.allclose(flat_approx, flat_true, atol=1e-6 * float(flat_true.abs().max()) + 1e-9)


def test_pilot_update_leaves_real_student_unchanged():
    teacher, student, batch, quiz, g = _problem()
    cfg = DistillConfig()
    theta, phi = params_of(student, False), params_of(teacher, True)
    before = {k: v.clone() for k, v in theta.items()}
    pilot = pilot_update(student, theta, teacher, phi, *batch, cfg)
    assert any(not torch.equal(pilot[k], before[k]) for k in before)
    assert all(torch.equal(theta[k], before[k]) for k in before)
    module_before = {k: v.clone() for k, v in student.named_parameters()}
    # the meta step's student update is the plain KD step taken from the untouched θ with the new teacher
    s_state, t_state = adam_init(theta), adam_init(phi)
    new_theta, _, new_phi, _, _ = meta_distill_step(student, theta, s_state, teacher, phi, t_state, batch, quiz, cfg)
    assert all(torch.equal(theta[k], before[k]) for k in before)
    assert all(torch.equal(v, module_before[k]) for k, v in student.named_parameters())
    expected, _, _ = plain_step(student, before, adam_init(before), *batch, cfg.lr, teacher, new_phi, cfg)
    assert all(torch.allclose(new_theta[k], expected[k], atol=1e-12) for k in before)
    assert any(not torch.allclose(new_phi[k], phi[k]) for k in phi)


def test_meta_distillation_trains_conv_student_from_wide_conv_teacher():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher, student = Conv4(1, 4, hidden=8, image_size=8), Conv4(1, 4, hidden=4, image_size=8)
    x = torch.randn(16, 1, 8, 8, generator=g)
    y = torch.arange(16) % 4
    for method in ("alone", "kd", "meta", "meta-fo"):
        p, t = train_student(student, params_of(student, False), (x, y), 1, 8, torch.Generator().manual_seed(1),
                             method, DistillConfig(), teacher, params_of(teacher, False), (x, y))
        assert all(torch.isfinite(v).all() for v in p.values()), method
        if method.startswith("meta"):
            assert any(not torch.equal(t[k], v.detach()) for k, v in teacher.named_parameters())


def _tiny_store(*args, **kwargs):
    from metaphi.tasks.base import ImageClasses
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(4).repeat_interleave(4)
    images = (torch.rand(16, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    return ImageClasses(images, targets, [f"c{i}" for i in range(4)])


def test_cli_distill_writes_results_and_resumes(tmp_path, monkeypatch, capsys):
    import json

    import metaphi.experiments.distill as cli_distill
    from metaphi.cli import main
    monkeypatch.setattr(cli_distill, "load_data", _tiny_store)
    out = tmp_path / "d"
    argv = ["distill", "glyphs", "--pair", "mlp", "--methods", "alone,kd,meta-fo", "--teacher-epochs", "1,2",
            "--epochs", "1", "--seeds", "0,1", "--per-class", "2,1,1", "--batch", "4", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert len(result["rows"]) == 2 * (1 + 2 * 2) and (out / "checkpoint.pt").exists()
    assert {e["method"] for e in result["summary"]} == {"alone", "kd", "meta-fo"}
    assert main(argv) == 0  # every run is in the checkpoint: nothing is trained again
    assert json.loads((out / "result.json").read_text())["rows"] == result["rows"]
    assert main([*argv[:-3], "--lr", "1e-2", "--out", str(out), "--quiet"]) == 2
    assert main(["distill", "--methods", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown nope" in capsys.readouterr().err
