"""Learned update rules and LearnedOptimizer, against plain computations."""
import io
import math

import pytest
import torch
from torch import nn

from metaphi.inner import SGD, adapt_steps, build_rule
from metaphi.inner.learned import LSTMRule, MLPRule, PerLayerSGD, ScheduledSGD, preprocess_gradient
from metaphi.inner.optim import LearnedOptimizer, load_learned, save_learned


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)


def sgd_by_hand(model, x, y, lr):
    """One SGD step written out, θ ← θ − α ∇L, on the squared error of ``model`` on (x, y)."""
    grads = torch.autograd.grad((model(x) - y).pow(2).mean(), list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.copy_(p - lr * g)


def train(model, opt, steps, seed=0):
    x, y = data(seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


SHARED_RULES = [LSTMRule(hidden=6, seed=1), MLPRule(hidden=(5,), lr=0.05, init="random", seed=2),
                ScheduledSGD(0.05, steps=4)]


def test_preprocessing_is_the_papers():
    p = 10.0
    g = torch.tensor([3.0, -1e-2, 1e-6, -1e-5, 0.0], dtype=torch.float64)
    out = preprocess_gradient(g, p)
    for value, (a, b) in zip(g.tolist(), out.tolist()):
        if abs(value) >= math.exp(-p):
            assert a == pytest.approx(math.log(abs(value)) / p) and b == math.copysign(1.0, value)
        else:
            assert a == -1.0 and b == pytest.approx(math.exp(p) * value)


@pytest.mark.parametrize("rule", SHARED_RULES, ids=lambda r: r.spec()["name"])
def test_state_dict_round_trips(rule, tmp_path):
    meta = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) if v.is_floating_point() else v
            for k, v in rule.meta_params({"w": torch.zeros(2)}).items()}
    save_learned(tmp_path / "opt.pt", rule, meta)
    straight = small_net()
    opt = LearnedOptimizer(straight.parameters(), tmp_path / "opt.pt")
    train(straight, opt, 6)

    model = small_net()
    opt = LearnedOptimizer(model.parameters(), tmp_path / "opt.pt")
    train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert saved["opt"]["learned"]["rule"] == rule.spec()
    # a fresh optimizer built from a different learned file restores the saved rule and state whole
    other = LSTMRule(hidden=3, seed=9)
    save_learned(tmp_path / "other.pt", other, other.meta_params())
    resumed = small_net(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = LearnedOptimizer(resumed.parameters(), tmp_path / "other.pt")
    opt2.load_state_dict(saved["opt"])
    assert opt2.rule.spec() == rule.spec()
    train(resumed, opt2, 3)
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make", [lambda lr: LSTMRule(hidden=5, sgd_lr=lr), lambda lr: MLPRule(lr=lr, init="sgd"),
                                  lambda lr: ScheduledSGD(lr, steps=3), lambda lr: PerLayerSGD(lr)],
                         ids=["lstm", "mlp-rule", "schedule-sgd", "per-layer-sgd"])
def test_rule_initialised_as_sgd_gives_sgds_trajectory_exactly(make):
    lr = 0.1
    rule = make(lr)
    reference, learned = small_net(), small_net()
    x, y = data()
    opt = LearnedOptimizer(learned.named_parameters(), (rule, rule.meta_params(dict(learned.named_parameters()))))
    for _ in range(8):
        sgd_by_hand(reference, x, y, lr)
        opt.zero_grad()
        (learned(x) - y).pow(2).mean().backward()
        opt.step()
        for a, b in zip(weights(reference), weights(learned)):
            assert torch.equal(a, b)
    # and the same in the functional inner loop, against metaphi's own SGD rule
    params = {k: v.detach() for k, v in small_net().named_parameters()}
    model = small_net()
    loss_fn = lambda p: (torch.func.functional_call(model, p, (x,)) - y).pow(2).mean()
    meta = rule.meta_params(params)
    for a, b in zip(adapt_steps(loss_fn, params, SGD(lr), {}, 5), adapt_steps(loss_fn, params, rule, meta, 5)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_mlp_rule_initialised_as_adam_follows_adam():
    torch.set_default_dtype(torch.float64)
    try:
        reference, learned = small_net().double(), small_net().double()
        rule = MLPRule(lr=0.01, init="adam")
        ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
        opt = LearnedOptimizer(learned.parameters(), (rule, rule.meta_params()))
        x, y = (t.double() for t in data())
        for _ in range(10):
            for model, o in ((reference, ref_opt), (learned, opt)):
                o.zero_grad()
                (model(x) - y).pow(2).mean().backward()
                o.step()
        for a, b in zip(weights(reference), weights(learned)):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_per_layer_rule_needs_the_names_it_was_trained_on():
    model = small_net()
    rule = PerLayerSGD(0.1)
    meta = rule.meta_params(dict(model.named_parameters()))
    with pytest.raises(ValueError, match="named parameters"):
        LearnedOptimizer(model.parameters(), (rule, meta))
    other = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="no meta-parameters"):
        LearnedOptimizer(other.named_parameters(), (rule, meta))
    LearnedOptimizer(model.named_parameters(), (rule, meta))


def test_learned_file_and_build_rule(tmp_path):
    rule = LSTMRule(hidden=4, layers=1, sgd_lr=0.2, seed=3)
    save_learned(tmp_path / "f.pt", rule, rule.meta_params(), {"note": 1})
    loaded, meta, info = load_learned(tmp_path / "f.pt")
    assert loaded.spec() == rule.spec() == build_rule(rule.spec()).spec() and info == {"note": 1}
    assert all(torch.equal(meta[k], v) for k, v in rule.meta_params().items())
    torch.save({"something": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a learned optimizer"):
        load_learned(tmp_path / "bad.pt")


def test_learned_rule_in_maml_is_vmappable_and_gets_meta_gradients():
    from metaphi.algorithms import REGRESSION
    from metaphi.algorithms.maml import MAML
    from metaphi.models import MLP
    from metaphi.outer import Unrolled
    from metaphi.tasks import Task

    g = torch.Generator().manual_seed(0)
    tasks = Task((torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 1, generator=g)),
                 (torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 1, generator=g)))
    for rule in (LSTMRule(hidden=4), MLPRule(hidden=(4,), init="random"), ScheduledSGD(0.1, 2, per_layer=True)):
        torch.manual_seed(0)
        algo = MAML(MLP(2, 1, (4,)), REGRESSION, rule, inner_steps=2)
        phi = algo.init_meta_params()
        looped, _ = Unrolled(vectorize=False)(algo, phi, tasks)
        batched, _ = Unrolled(vectorize=True)(algo, phi, tasks)
        rule_keys = [k for k in phi if k.startswith("rule.")]
        assert rule_keys and any(looped[k].abs().sum() > 0 for k in rule_keys)
        for k in phi:
            assert torch.allclose(looped[k], batched[k], atol=1e-5), k


def test_learned_file_is_plain_data_and_a_foreign_pickle_is_refused(tmp_path):
    rule = MLPRule(hidden=(3,), init="random", seed=1)
    save_learned(tmp_path / "f.pt", rule, rule.meta_params(), {"family": {"name": "quadratic", "dim": 10}})
    assert torch.load(tmp_path / "f.pt", weights_only=True)["rule"] == rule.spec()
    LearnedOptimizer(small_net().parameters(), tmp_path / "f.pt")
    # a file that would run code when unpickled is refused before anything in it is built
    torch.save({"format": "metaphi-learned-optimizer-1", "rule": rule.spec(), "meta": {}, "info": Exception("x")},
               tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="asks to call .*Exception, not plain data"):
        load_learned(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="asks to call .*Exception, not plain data"):
        LearnedOptimizer(small_net().parameters(), tmp_path / "evil.pt")


def test_torch_schedulers_drive_the_learned_step():
    """lr scales each learned step: with a rule that is SGD at 0.1, lr 0.5 is SGD at 0.05, and a
    StepLR halving it every 2 steps gives SGD at 0.1, 0.1, 0.05, 0.05, ..."""
    rule = PerLayerSGD(0.1)
    reference, learned = small_net(), small_net()
    x, y = data()
    opt = LearnedOptimizer(learned.named_parameters(), (rule, rule.meta_params(dict(learned.named_parameters()))))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(6):
        alpha = 0.1 * 0.5 ** (step // 2)
        sgd_by_hand(reference, x, y, alpha)
        opt.zero_grad()
        (learned(x) - y).pow(2).mean().backward()
        opt.step()
        scheduler.step()
        for a, b in zip(weights(reference), weights(learned)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        LearnedOptimizer(small_net().named_parameters(), (rule, rule.meta_params(dict(small_net().named_parameters()))),
                         lr=float("nan"))
