"""The distillation study: the student/teacher training loop, and the study's rows, resumption and
refusals."""
import pytest
import torch

import metaphi.experiments.distill as study_module
from metaphi.algorithms.distill import DistillOptions
from metaphi.experiments.distill import DistillConfig, study, train_student
from metaphi.functional import params_of
from metaphi.models import Conv4


def test_meta_distillation_trains_conv_student_from_wide_conv_teacher():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher, student = Conv4(1, 4, hidden=8, image_size=8), Conv4(1, 4, hidden=4, image_size=8)
    x = torch.randn(16, 1, 8, 8, generator=g)
    y = torch.arange(16) % 4
    for method in ("alone", "kd", "meta", "meta-fo"):
        p, t = train_student(student, params_of(student, False), (x, y), 1, 8, torch.Generator().manual_seed(1),
                             method, DistillOptions(), teacher, params_of(teacher, False), (x, y))
        assert all(torch.isfinite(v).all() for v in p.values()), method
        if method.startswith("meta"):
            assert any(not torch.equal(t[k], v.detach()) for k, v in teacher.named_parameters())


def tiny_store(*args, **kwargs):
    from metaphi.tasks.base import ImageClasses
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(4).repeat_interleave(4)
    images = (torch.rand(16, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    return ImageClasses(images, targets, [f"c{i}" for i in range(4)])


def test_study_resumes_from_its_checkpoint_and_refuses_another_study(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "load_data", tiny_store)
    config = DistillConfig(methods=["alone", "kd", "meta"], teacher_epochs=[1], epochs=1, seeds=[0], per_class=[2, 1, 1],
                           batch=4)
    path = str(tmp_path / "checkpoint.pt")
    first = study(config, path, log=lambda *a: None)
    assert [r["method"] for r in first["rows"]] == ["alone", "kd", "meta"]
    assert [e["method"] for e in first["summary"]] == ["alone", "kd", "meta"]
    assert "teacher_acc_after" in first["summary"][2] and "teacher_acc" not in first["summary"][0]
    # the folder and the output switches are not part of what the checkpoint computes
    again = study(DistillConfig(**{**config.__dict__, "quiet": True, "out": "elsewhere"}), path, log=lambda *a: None)
    assert again["rows"] == first["rows"]
    with pytest.raises(ValueError, match="different configuration"):
        study(DistillConfig(**{**config.__dict__, "lr": 1e-2}), path, log=lambda *a: None)


def test_a_nan_loss_stops_training_with_the_epoch_named():
    from metaphi.train import NonFiniteLoss
    torch.manual_seed(0)
    teacher, student = Conv4(1, 2, hidden=4, image_size=8), Conv4(1, 2, hidden=4, image_size=8)
    x, y = torch.full((4, 1, 8, 8), float("nan")), torch.tensor([0, 1, 0, 1])
    with pytest.raises(NonFiniteLoss, match="epoch 1: loss became nan at step 1"):
        train_student(student, params_of(student, False), (x, y), 2, 2, torch.Generator().manual_seed(0), "meta",
                      DistillOptions(), teacher, params_of(teacher, False), (x, y))
