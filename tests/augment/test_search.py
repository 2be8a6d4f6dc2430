"""Learned augmentation: the operations on hand-made images, the gates, the lookahead loss against an
independent computation, its meta-gradient against central finite differences in float64, and the
search's resumption."""
import math

import pytest
import torch
import torch.nn.functional as F

from metaphi.augment import ops
from metaphi.augment import policy as P
from metaphi.augment.search import LookaheadAugment, SearchConfig, lookahead_task, search, train_model
from metaphi.functional import params_of
from metaphi.models import MLP, Conv4
from metaphi.outer import build_estimator

D = torch.float64


def _image(h=6, w=6, seed=0):
    return torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(seed), dtype=D)


def _dot(h, w, u, v):
    """A one-pixel image with the dot at column u, row v."""
    x = torch.zeros(1, 1, h, w, dtype=D)
    x[0, 0, v, u] = 1.0
    return x


# --- operations --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(6, 6), (5, 5)])
def test_rotation_by_quarter_turns_is_rot90(size):
    x = _image(*size)
    assert torch.allclose(ops.rotate(x, math.pi / 2), torch.rot90(x, 1, (-2, -1)), atol=1e-9)
    assert torch.allclose(ops.rotate(x, -math.pi / 2), torch.rot90(x, -1, (-2, -1)), atol=1e-9)
    assert torch.allclose(ops.rotate(x, math.pi), torch.rot90(x, 2, (-2, -1)), atol=1e-9)
    assert torch.allclose(ops.rotate(x, 0.0), x, atol=1e-12)


def test_one_pixel_translation_shifts_and_fills_with_zero():
    x = _image(5, 7)
    right = torch.zeros_like(x)
    right[..., 1:] = x[..., :-1]
    down = torch.zeros_like(x)
    down[..., 1:, :] = x[..., :-1, :]
    assert torch.allclose(ops.translate(x, 1.0, 0.0), right, atol=1e-9)
    assert torch.allclose(ops.translate(x, 0.0, 1.0), down, atol=1e-9)
    # half a pixel is the average of neighbours (bilinear)
    half = ops.translate(x, 0.5, 0.0)
    assert torch.allclose(half[..., 1:], (x[..., 1:] + x[..., :-1]) / 2, atol=1e-9)


def test_shear_and_scale_move_a_dot_where_the_matrix_says():
    # 7x7: the centre is pixel (3, 3); a dot one row below centre shears one column right per unit of k
    x = _dot(7, 7, 3, 4)
    assert torch.allclose(ops.shear(x, 1.0), _dot(7, 7, 4, 4), atol=1e-9)
    assert torch.allclose(ops.shear(x, -2.0), _dot(7, 7, 1, 4), atol=1e-9)
    # scaling by 2 about the centre sends the dot at offset (1, 1) to offset (2, 2), with value 1 there
    y = ops.scale(_dot(7, 7, 4, 4), 2.0)
    assert abs(float(y[0, 0, 5, 5]) - 1.0) < 1e-9
    assert abs(float(y.sum()) - 4.0) < 1e-9  # a 2x larger bilinear blob: area × 4
    # composition: shift then rotate a quarter turn about the centre
    a = ops.rotation(torch.tensor([math.pi / 2], dtype=D), x) @ ops.translation(torch.tensor([1.0], dtype=D),
                                                                                  torch.tensor([0.0], dtype=D), x)
    dot = _dot(7, 7, 3, 3)  # the centre moves to (1, 0), then a counter-clockwise quarter turn takes it up
    assert torch.allclose(ops.warp(dot, a), _dot(7, 7, 3, 2), atol=1e-9)


def test_erasing_a_known_box():
    x = torch.ones(2, 1, 6, 6, dtype=D)
    center = torch.tensor([[2.0, 3.0], [4.5, 1.5]], dtype=D)
    size = torch.tensor([2.0, 3.0], dtype=D)
    hard = ops.erase(x, center, size, softness=0.0)
    expected = torch.ones_like(x)
    expected[0, 0, 2:4, 1:3] = 0   # corner between pixels at (2, 3), side 2: columns 1-2, rows 2-3
    expected[1, 0, 0:3, 3:6] = 0   # centre of pixel (4, 1), side 3: columns 3-5, rows 0-2
    assert torch.equal(hard, expected)
    soft = ops.erase(x, center, size, softness=1e-3)
    assert torch.allclose(soft, expected, atol=1e-6)
    # weight blends, and a soft box is differentiable in its size
    assert torch.allclose(ops.erase(x, center, size, 0.0, weight=0.25), 1 - 0.25 * (1 - expected))
    size = torch.tensor(2.0, dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(ops.erase(x, center, size, softness=0.5).sum(), size)
    assert g < 0


def test_elastic_noise_and_identity():
    x = _image(8, 8)
    field = 2 * torch.rand(1, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=D) - 1
    assert torch.allclose(ops.elastic(x, field, 0.0, 1.2), x, atol=1e-12)
    d = ops.smooth_field(field, 1.2)
    assert abs(float(d.pow(2).mean()) - 1.0) < 1e-9
    # a constant field is a translation by alpha pixels (unit RMS after smoothing with zero padding is
    # not constant at the border, so compare inside)
    assert not torch.allclose(ops.elastic(x, field, 1.0, 1.2), x)
    eps = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=D)
    assert torch.allclose(ops.gaussian_noise(x, eps, 0.3), x + 0.3 * eps)
    with pytest.raises(ValueError, match="float"):
        ops.rotate(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 0.1)


def test_policy_apply_is_each_operation_on_its_own():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 8, 8, generator=g, dtype=D)
    noise = P.draw_noise(4, (1, 8, 8), g, D)
    m = torch.full((len(P.OPS),), 0.6, dtype=D)
    space = P.Space()

    def only(k):
        gates = torch.zeros(4, len(P.OPS), dtype=D)
        gates[:, k] = 1
        return P.apply(x, gates, m, noise, space)

    s = noise["sign"]
    assert torch.allclose(only(0), torch.cat([ops.rotate(x[i:i + 1], 0.6 * math.radians(30) * s[i, 0])
                                              for i in range(4)]), atol=1e-9)
    assert torch.allclose(only(1), ops.translate(x, 0.6 * 0.25 * 8 * s[:, 1], 0.6 * 0.25 * 8 * s[:, 2]), atol=1e-9)
    assert torch.allclose(only(2), ops.scale(x, 1 + 0.6 * 0.3 * s[:, 3]), atol=1e-9)
    assert torch.allclose(only(3), ops.shear(x, 0.6 * 0.4 * s[:, 4]), atol=1e-9)
    assert torch.allclose(only(4), ops.elastic(x, noise["field"], 0.6 * 0.1 * 8, 0.15 * 8), atol=1e-9)
    assert torch.allclose(only(5), x + 0.6 * 0.5 * noise["eps"], atol=1e-12)
    assert torch.allclose(only(6), ops.erase(x, noise["center"], 0.6 * 0.5 * 8, 0.5), atol=1e-12)
    assert torch.allclose(P.apply(x, torch.zeros(4, len(P.OPS), dtype=D), m, noise, space), x, atol=1e-12)


def test_gates_hard_frequency_and_relaxed_limit():
    g = torch.Generator().manual_seed(4)
    prob = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 0.3, 0.7])
    u = P.draw_noise(20000, (1, 2, 2), g)["gate"]
    freq = P.hard_gates(prob, u).mean(0)
    assert torch.allclose(freq, prob, atol=0.015)
    logit = torch.log(prob.clamp(1e-6, 1 - 1e-6) / (1 - prob.clamp(1e-6, 1 - 1e-6)))
    cold = P.relaxed_gates(logit, u[:500], temperature=1e-4)
    assert (cold.round() == P.hard_gates(prob, u[:500])).float().mean() > 0.999
    st = P.relaxed_gates(logit.requires_grad_(), u[:10], 0.5, straight_through=True)
    assert torch.allclose(st, st.round(), atol=1e-6) and set(st.round().unique().tolist()) == {0.0, 1.0}
    (grad,) = torch.autograd.grad(st.sum(), logit)
    assert grad.abs().sum() > 0


def test_policy_round_trip_and_random_policy_is_seeded():
    a = P.random_policy(torch.Generator().manual_seed(5))
    b = P.random_policy(torch.Generator().manual_seed(5))
    assert torch.equal(a.prob, b.prob) and torch.equal(a.magnitude, b.magnitude)
    back = P.Policy.from_dict(a.to_dict())
    assert torch.allclose(back.prob, a.prob, atol=1e-4)
    with pytest.raises(ValueError, match="missing"):
        P.Policy.from_dict({"rotate": {"prob": 0.1, "magnitude": 0.1}})
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(P.augment(x, P.no_policy(), torch.Generator().manual_seed(0)), x)


# --- the lookahead loss and its meta-gradient -------------------------------------------------------

def _lookahead_problem(seed=0, n=12, classes=3):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Conv4(1, classes, hidden=4, image_size=8).to(D)
    theta = params_of(model, False)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=D)
    y = torch.randint(classes, (n,), generator=g)
    xv = torch.rand(n, 1, 8, 8, generator=g, dtype=D)
    yv = torch.randint(classes, (n,), generator=g)
    noise = P.draw_noise(n, (1, 8, 8), g, D)
    return model, theta, x, y, xv, yv, noise


def _manual_lookahead(model, theta, x_aug, y, xv, yv, lr):
    """One SGD step with torch.autograd on the module itself, then the validation loss."""
    from torch.func import functional_call
    p = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    grads = torch.autograd.grad(F.cross_entropy(functional_call(model, p, (x_aug,)), y), list(p.values()))
    stepped = {k: v - lr * gk for (k, v), gk in zip(p.items(), grads)}
    return F.cross_entropy(functional_call(model, stepped, (xv,)), yv)


def test_discrete_choice_lookahead_matches_a_manual_step():
    model, theta, x, y, xv, yv, noise = _lookahead_problem()
    algo = LookaheadAugment(model, 0.3, parametrization="discrete")
    task = lookahead_task(theta, x, y, noise, xv, yv).unstack()[0]
    k = len(P.OPS)
    off = {"aug.apply": torch.zeros(k, dtype=D), "aug.level": F.one_hot(torch.zeros(k, dtype=torch.long), 5).to(D)}
    loss, _ = algo.task_loss(off, task)
    assert torch.allclose(loss, _manual_lookahead(model, theta, x, y, xv, yv, 0.3), atol=1e-10)
    rot = {"aug.apply": F.one_hot(torch.tensor(0), k).to(D), "aug.level": off["aug.level"].clone()}
    rot["aug.level"][0] = F.one_hot(torch.tensor(4), 5).to(D)  # level 5/5: up to 30 degrees
    x_rot = torch.cat([ops.rotate(x[i:i + 1], math.radians(30) * noise["sign"][i, 0]) for i in range(len(x))])
    loss_rot, _ = algo.task_loss(rot, task)
    assert torch.allclose(loss_rot, _manual_lookahead(model, theta, x_rot, y, xv, yv, 0.3), atol=1e-10)
    assert not torch.allclose(loss_rot, loss)


def test_relaxed_meta_gradient_matches_finite_differences():
    """∂L_val(θ'(φ))/∂φ from the second-order estimator vs central differences, in float64, with the
    relaxation noise (gates, signs, field, pixel noise, box centres) fixed."""
    model, theta, x, y, xv, yv, noise = _lookahead_problem(seed=1)
    algo = LookaheadAugment(model, 0.5, temperature=0.7)
    g = torch.Generator().manual_seed(7)
    phi = {"aug.logit": (torch.randn(len(P.OPS), generator=g, dtype=D) * 0.5).requires_grad_(),
           "aug.magnitude": torch.randn(len(P.OPS), generator=g, dtype=D).requires_grad_()}
    tasks = lookahead_task(theta, x, y, noise, xv, yv)
    grads, metrics = build_estimator("second-order", {"loop": True})(algo, phi, tasks)

    def value(p):
        with torch.no_grad():
            return float(algo.task_loss(p, tasks.unstack()[0])[0])

    assert abs(value(phi) - metrics["loss"]) < 1e-12
    eps = 1e-5
    for key in phi:
        for i in range(len(P.OPS)):
            plus = {k: v.detach().clone() for k, v in phi.items()}
            minus = {k: v.detach().clone() for k, v in phi.items()}
            plus[key][i] += eps
            minus[key][i] -= eps
            fd = (value(plus) - value(minus)) / (2 * eps)
            assert abs(float(grads[key][i]) - fd) < 1e-9 + 1e-7 * abs(fd), (key, P.OPS[i], float(grads[key][i]), fd)
    # every operation's magnitude and probability matter here: a gradient that is zero would pass the
    # comparison trivially
    assert (grads["aug.logit"].abs() > 1e-6).all() and (grads["aug.magnitude"].abs() > 1e-6).all()


def test_first_order_is_refused_but_values_for_es_are_allowed():
    model, theta, x, y, xv, yv, noise = _lookahead_problem()
    algo = LookaheadAugment(model, 0.1)
    phi = P.init_relaxed(dtype=D)
    tasks = lookahead_task(theta, x, y, noise, xv, yv)
    with pytest.raises(ValueError, match="zero"):
        build_estimator("first-order")(algo, phi, tasks)
    es = build_estimator("es", {"population": 4, "sigma": 0.1, "loop": True})
    es.start(0)
    grads, metrics = es(algo, phi, tasks)
    assert math.isfinite(metrics["loss"]) and grads["aug.logit"].abs().sum() > 0


def test_reinforce_estimator_on_the_discrete_policy():
    model, theta, x, y, xv, yv, noise = _lookahead_problem()
    algo = LookaheadAugment(model, 0.3, parametrization="discrete")
    phi = algo.init_meta_params(0.5)
    phi = {k: v.detach().to(D).requires_grad_() for k, v in phi.items()}
    est = build_estimator("reinforce", {"samples": 6})
    est.start(0)
    grads, metrics = est(algo, phi, lookahead_task(theta, x, y, noise, xv, yv))
    assert grads["aug.apply"].shape == (len(P.OPS),) and grads["aug.level"].shape == (len(P.OPS), P.LEVELS)
    assert grads["aug.apply"].abs().sum() > 0 and torch.isfinite(grads["aug.level"]).all()
    # categorical scores sum to zero over the levels of each operation
    assert torch.allclose(grads["aug.level"].sum(-1), torch.zeros(len(P.OPS), dtype=D), atol=1e-12)
    pol = P.policy_of(phi)
    assert torch.allclose(pol.prob, torch.full((len(P.OPS),), 0.5)) and torch.allclose(pol.magnitude,
                                                                                       torch.full((len(P.OPS),), 0.3))


@pytest.mark.parametrize("prob, magnitude", [(0.2, 0.3), (0.5, 0.6), (0.1, 0.9)])
def test_both_parametrizations_start_from_the_same_policy(prob, magnitude):
    relaxed, discrete = P.policy_of(P.init_relaxed(prob, magnitude)), P.policy_of(P.init_discrete(prob, magnitude))
    assert torch.allclose(relaxed.prob, discrete.prob) and torch.allclose(relaxed.magnitude, discrete.magnitude)
    assert torch.allclose(discrete.magnitude, torch.full((len(P.OPS),), magnitude), atol=1e-6)
    with pytest.raises(ValueError, match="strictly between"):
        P.init_discrete(prob, 0.1)


# --- training and the search loop ------------------------------------------------------------------

def _tiny_data(seed=0, n=30, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % classes
    x[:, :, :, :2] += y.view(-1, 1, 1, 1).float()  # learnable: the class is in the left columns
    return x, y


def test_train_model_matches_torch_sgd_without_augmentation():
    x, y = _tiny_data()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MLP(64, 3, (8,))
    ref = MLP(64, 3, (8,))
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    params = train_model(model, params_of(model, False), (x, y), P.no_policy(), 5, 10, 0.1,
                         torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randperm(len(y), generator=g)[:10]
        P.draw_noise(10, (1, 8, 8), g)  # the augmentation's draw, as train_model makes it
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    for k, v in ref.named_parameters():
        assert torch.allclose(params[k], v, atol=1e-6), k


@pytest.mark.parametrize("method", ["gradient", "reinforce"])
def test_search_resumes_to_the_same_policy(tmp_path, method):
    x, y = _tiny_data()
    xv, yv = _tiny_data(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Conv4(1, 3, hidden=4, image_size=8)
    init = params_of(model, False)
    cfg = SearchConfig(method=method, steps=6, batch=10, val_batch=10, lr=0.1, policy_lr=0.2, samples=2)
    full = search(model, init, (x, y), (xv, yv), cfg)
    ck = str(tmp_path / "search.pt")

    def stop(step, record):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(model, init, (x, y), (xv, yv), cfg, checkpoint=ck, checkpoint_every=2, on_step=stop)
    resumed = search(model, init, (x, y), (xv, yv), cfg, checkpoint=ck, checkpoint_every=2)
    for k in full["phi"]:
        assert torch.allclose(full["phi"][k], resumed["phi"][k], atol=1e-6), k
    assert len(resumed["history"]) == 6
    assert [h["val_loss"] for h in resumed["history"]] == pytest.approx([h["val_loss"] for h in full["history"]])
    # the policy moved from its start
    start = P.policy_of(LookaheadAugment(model, 0.1, parametrization="discrete" if method == "reinforce"
                                         else "relaxed").init_meta_params())
    assert not torch.allclose(full["policy"].prob, start.prob)
    with pytest.raises(ValueError, match="other settings"):
        search(model, init, (x, y), (xv, yv), SearchConfig(method=method, steps=7), checkpoint=ck)
