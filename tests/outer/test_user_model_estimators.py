"""Every meta-gradient estimator on models a user brings ("bring your own model"), against independent
float64 computations written here with plain ``torch.autograd``.

The models are ordinary ``nn.Module`` classes as a user writes them: a small CNN with the standard
``nn.BatchNorm2d``, a ResNet basic block of the user's own (conv-bn-relu-conv-bn plus a conv-bn
shortcut, then a head), and a network whose last layer is called ``fc``, adapted ANIL-style with
``trainable="fc.*"``. The library turns their batch norms into per-task batch norm, so each model's
reference is a forward pass written out with ``torch.nn.functional`` whose batch norm normalises by
the batch at hand (``F.batch_norm(x, None, None, w, b, training=True)``); that it is the user's model
is checked against the module itself before the library converts it.

Compared, on a meta-batch of two tasks:

* second-order and first-order MAML, on every path of ``UnrolledOptions`` except ``compile`` (a loop
  over tasks, one vmap batch, vmap chunks of one task, a checkpointed inner loop; compiling takes tens
  of seconds on a CPU and tests/outer/test_compiled.py checks it against the eager estimator): the MAML
  meta-gradient unrolled by hand, with and without ``create_graph``;
* Reptile, with and without minibatches: the mean over tasks of φ minus the weights after SGD on the
  task's support and query data, the minibatches drawn from the estimator's own seeded generator;
* the implicit estimator on iMAML (MAML with a proximal inner problem, the MAML-family algorithm that
  states its bilevel problem), looped and vmapped: ∂_φf − (∂²_φθ g)(∂²_θθ g)⁻¹ ∂_θ f at θ* from an
  explicitly built Hessian and mixed derivative solved with ``torch.linalg.solve``, θ* itself found by
  gradient descent written by hand;
* ES, looped, vmapped and vmapped in chunks, with and without rank shaping: the antithetic formula
  Σᵢ [u(φ + σεᵢ) − u(φ − σεᵢ)] εᵢ / (2nσ) over the estimator's own draws εᵢ (the same seeded
  generator), each member scored by the hand-written MAML loss.

REINFORCE is not compared: it estimates gradients of logits of discrete choices that an algorithm
declares (``algorithm.discrete``), and MAML classification has none; a test checks that it refuses
MAML on a user's model instead of returning something.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaphi.algorithms.base import CLASSIFICATION
from metaphi.algorithms.imaml import IMAML, IMAMLOptions
from metaphi.algorithms.maml import MAML
from metaphi.inner import SGD
from metaphi.outer import build_estimator
from metaphi.outer.es import derived_seed
from metaphi.tasks import Task
from tiny import random_task

pytestmark = pytest.mark.usefixtures("float64", "one_thread")  # tiny tensors: one thread is faster

WAYS, SHOTS, QUERY, SIZE = 2, 2, 2, 6
EPS = 1e-5  # nn.BatchNorm2d's default, kept by the library's conversion
EXACT = dict(rtol=1e-9, atol=1e-12)


# --- what a user writes -----------------------------------------------------------------------------

class BatchNormCNN(nn.Module):
    """A small CNN with the standard batch norm (running statistics on, as torch's default)."""

    def __init__(self, ways=WAYS):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.classifier = nn.Linear(4 * 4 * 4, ways)

    def forward(self, x):
        return self.classifier(torch.relu(self.bn(self.conv(x))).flatten(1))


class BasicBlockNet(nn.Module):
    """A ResNet basic block of the user's own: conv-bn-relu-conv-bn plus a conv-bn shortcut, relu,
    global average pooling and a linear head."""

    def __init__(self, ways=WAYS, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential(nn.Conv2d(1, width, 1, bias=False), nn.BatchNorm2d(width))
        self.linear = nn.Linear(width, ways)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        return self.linear(out.mean((2, 3)))


class FcNet(nn.Module):
    """Features (conv-bn-relu-maxpool) and a last layer called ``fc``, as torchvision names it."""

    def __init__(self, ways=WAYS):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, ways)

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


# --- the same models written out as functions of their parameters --------------------------------

def bn(p, name, x):
    """Batch norm with the statistics of the batch at hand: each task its own."""
    return F.batch_norm(x, None, None, p[f"{name}.weight"], p[f"{name}.bias"], training=True, eps=EPS)


def cnn_forward(p, x):
    h = torch.relu(bn(p, "bn", F.conv2d(x, p["conv.weight"])))
    return F.linear(h.flatten(1), p["classifier.weight"], p["classifier.bias"])


def block_forward(p, x):
    out = torch.relu(bn(p, "bn1", F.conv2d(x, p["conv1.weight"], padding=1)))
    out = bn(p, "bn2", F.conv2d(out, p["conv2.weight"], padding=1))
    out = torch.relu(out + bn(p, "shortcut.1", F.conv2d(x, p["shortcut.0.weight"])))
    return F.linear(out.mean((2, 3)), p["linear.weight"], p["linear.bias"])


def fc_forward(p, x):
    h = F.max_pool2d(torch.relu(bn(p, "bn", F.conv2d(x, p["conv.weight"]))), 2)
    return F.linear(h.flatten(1), p["fc.weight"], p["fc.bias"])


# name: (the user's module, its forward by hand, what the inner loop adapts)
MODELS = {
    "cnn-batchnorm": (BatchNormCNN, cnn_forward, "all"),
    "resnet-basic-block": (BasicBlockNet, block_forward, "all"),
    "anil-fc": (FcNet, fc_forward, "fc.*"),
}


def tasks_of(seeds=(1, 2)):
    parts = [random_task(ways=WAYS, shots=SHOTS, query=QUERY, seed=s, size=SIZE) for s in seeds]
    return parts, Task.stack(parts)


def build(name, make_algorithm):
    """The user's module (its forward checked against the hand-written one while it still has torch's
    batch norm), the algorithm ``make_algorithm(module, trainable)`` built on it (which warns that the
    batch norm is now per task), the hand-written forward and the names the inner loop adapts."""
    cls, forward, trainable = MODELS[name]
    torch.manual_seed(0)
    model = cls().double()
    x = random_task(ways=WAYS, shots=SHOTS, seed=9, size=SIZE).support[0]
    torch.testing.assert_close(forward(dict(model.named_parameters()), x), model(x), rtol=1e-12, atol=1e-12)
    with pytest.warns(UserWarning, match=f"of {cls.__name__} now normalises each task by its own batch statistics"):
        algo = make_algorithm(model, trainable)
    names = [k for k, _ in model.named_parameters()]
    adapted = names if trainable == "all" else [k for k in names if k.startswith("fc.")]
    return algo, forward, names, adapted


def initial(phi, names):
    """θ₀ from φ as fresh float64 leaves, by the model's own parameter names."""
    assert sorted(phi) == sorted(f"init.{k}" for k in names)
    return {k: phi[f"init.{k}"].detach().clone().requires_grad_() for k in names}


def sgd(forward, params, adapted, x, y, lr, steps, create_graph):
    """``steps`` of SGD on the cross-entropy of (x, y), on the ``adapted`` entries of ``params``."""
    for _ in range(steps):
        loss = F.cross_entropy(forward(params, x), y)
        grads = torch.autograd.grad(loss, [params[k] for k in adapted], create_graph=create_graph)
        params = {**params, **{k: params[k] - lr * g for k, g in zip(adapted, grads)}}
    return params


def maml_loss(forward, theta, adapted, tasks, lr, steps, create_graph=True):
    """The mean over tasks of the query loss after ``steps`` of SGD on the support set."""
    total = 0.0
    for task in tasks:
        (xs, ys), (xq, yq) = task.support, task.query
        fast = sgd(forward, theta, adapted, xs, ys, lr, steps, create_graph)
        total = total + F.cross_entropy(forward(fast, xq), yq) / len(tasks)
    return total


def assert_nontrivial(expected, keys):
    for k in keys:
        assert float(expected[k].abs().max()) > 1e-6, f"the meta-gradient of {k} is zero: nothing is compared"


def assert_equal_grads(grads, expected, where, **tolerance):
    assert set(grads) == {f"init.{k}" for k in expected}, where
    for k, e in expected.items():
        torch.testing.assert_close(grads[f"init.{k}"], e, **(tolerance or EXACT),
                                   msg=lambda m, k=k: f"{where}, {k}: {m}")


# --- second-order and first-order MAML -----------------------------------------------------------

UNROLLED_PATHS = {"loop": {"loop": True}, "vmap": {}, "vmap-chunks-of-one": {"task_chunk": 1},
                  "checkpointed": {"checkpoint_inner": True}}
LR, STEPS = 0.4, 2


def maml_on(model):
    return build(model, lambda m, trainable: MAML(m, CLASSIFICATION, SGD(LR), inner_steps=STEPS, trainable=trainable))


@pytest.mark.parametrize("model", list(MODELS))
def test_second_order_maml_on_a_users_model_equals_the_inner_loop_differentiated_by_hand(model):
    algo, forward, names, adapted = maml_on(model)
    phi = algo.init_meta_params()
    parts, stacked = tasks_of()
    theta = initial(phi, names)
    loss = maml_loss(forward, theta, adapted, parts, LR, STEPS, create_graph=True)
    expected = dict(zip(names, torch.autograd.grad(loss, list(theta.values()))))
    assert_nontrivial(expected, names)
    for path, options in UNROLLED_PATHS.items():
        grads, metrics = build_estimator("second-order", options)(algo, phi, stacked)
        assert_equal_grads(grads, expected, f"second-order, {path}")
        assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)


@pytest.mark.parametrize("model", list(MODELS))
def test_first_order_maml_on_a_users_model_equals_the_query_gradient_with_inner_gradients_held_constant(model):
    algo, forward, names, adapted = maml_on(model)
    phi = algo.init_meta_params()
    parts, stacked = tasks_of()
    theta = initial(phi, names)
    # without create_graph the inner gradients are constants: θ_k = θ₀ − α Σ g_s with dθ_k/dθ₀ = I,
    # and the parameters that are not adapted (ANIL's body) reach the query loss directly
    loss = maml_loss(forward, theta, adapted, parts, LR, STEPS, create_graph=False)
    expected = dict(zip(names, torch.autograd.grad(loss, list(theta.values()))))
    assert_nontrivial(expected, names)
    second = torch.autograd.grad(maml_loss(forward, theta, adapted, parts, LR, STEPS), list(theta.values()))
    # the comparison can tell the two apart: they differ far beyond its tolerance
    assert max(float((e - s).abs().max()) for e, s in zip(expected.values(), second)) > 1e-4
    for path, options in UNROLLED_PATHS.items():
        grads, metrics = build_estimator("first-order", options)(algo, phi, stacked)
        assert_equal_grads(grads, expected, f"first-order, {path}")
        assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)


# --- Reptile ----------------------------------------------------------------------------------------

REPTILE_STEPS, REPTILE_LR, REPTILE_SEED = 3, 0.3, 7


@pytest.mark.parametrize("minibatches", [False, True], ids=["full-batch", "minibatches"])
@pytest.mark.parametrize("model", list(MODELS))
def test_reptile_on_a_users_model_is_the_initialization_minus_the_weights_trained_by_hand(model, minibatches):
    algo, forward, names, adapted = build(model, lambda m, trainable: MAML(
        m, CLASSIFICATION, SGD(REPTILE_LR), inner_steps=1, trainable=trainable, estimators=("reptile",)))
    phi = algo.init_meta_params()
    parts, stacked = tasks_of()
    estimator = build_estimator("reptile", {"reptile_steps": REPTILE_STEPS, "minibatches": minibatches,
                                            "estimator_seed": REPTILE_SEED})
    direction, _ = estimator(algo, phi, stacked)
    # the estimator's first call draws from derived_seed(seed, 0); the permutations go task after task
    generator = torch.Generator().manual_seed(derived_seed(REPTILE_SEED, 0))
    theta = {k: v.detach() for k, v in initial(phi, names).items()}
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for task in parts:
        x, y = (torch.cat([s, q]) for s, q in zip(task.support, task.query))  # all the task's data
        params = {k: v.clone().requires_grad_() for k, v in theta.items()}
        if minibatches:  # each step a different part of the data, one pass over it
            batches = torch.tensor_split(torch.randperm(len(x), generator=generator), REPTILE_STEPS)
            assert sorted(torch.cat(batches).tolist()) == list(range(len(x)))
        else:
            batches = [torch.arange(len(x))] * REPTILE_STEPS
        for batch in batches:
            params = sgd(forward, params, adapted, x[batch], y[batch], REPTILE_LR, 1, create_graph=False)
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
        for k in names:
            expected[k] += (theta[k] - params[k].detach()) / len(parts)
    assert_nontrivial(expected, adapted)
    for k in set(names) - set(adapted):  # ANIL's body does not move in the inner loop
        assert not expected[k].any()
    assert_equal_grads(direction, expected, f"reptile, minibatches={minibatches}")


# --- the implicit estimator on iMAML ---------------------------------------------------------------

REG, IMAML_LR, IMAML_STEPS = 2.0, 0.2, 6
SOLVER = {"solver": "cg", "solver_steps": 80, "solver_tol": 1e-14}


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def implicit_gradient(forward, theta0, adapted, task):
    """∂_φ f − (∂²_φθ g)ᵀ (∂²_θθ g)⁻¹ ∂_θ f at θ* for the proximal inner problem
    g(θ, φ) = L_S(θ, φ_fixed) + λ/2 ‖θ − φ_adapted‖² and f(θ, φ) = L_Q(θ, φ_fixed), with the Hessian
    and mixed derivative built row by row (plain autograd, no vmap) and solved with linalg.solve.
    Returns (the gradient by the names of θ₀, f at θ*, the smallest eigenvalue of ∂²_θθ g)."""
    (xs, ys), (xq, yq) = task.support, task.query
    names = list(theta0)

    def inner(th, ph):
        params = {**ph, **th}
        prox = sum(((th[k] - ph[k]) ** 2).sum() for k in adapted)
        return F.cross_entropy(forward(params, xs), ys) + 0.5 * REG * prox

    # θ*: IMAML_STEPS of gradient descent on g from θ₀
    phi = {k: v.detach() for k, v in theta0.items()}
    star = {k: phi[k].clone() for k in adapted}
    for _ in range(IMAML_STEPS):
        th = {k: v.requires_grad_() for k, v in star.items()}
        grads = torch.autograd.grad(inner(th, phi), list(th.values()))
        star = {k: (v - IMAML_LR * g).detach() for (k, v), g in zip(th.items(), grads)}

    th = {k: v.clone().requires_grad_() for k, v in star.items()}
    ph = {k: v.clone().requires_grad_() for k, v in phi.items()}
    outer = F.cross_entropy(forward({**ph, **th}, xq), yq)
    f_theta = flat(torch.autograd.grad(outer, list(th.values()), retain_graph=True))
    f_phi = flat(g if g is not None else torch.zeros_like(p)
                 for g, p in zip(torch.autograd.grad(outer, list(ph.values()), allow_unused=True), ph.values()))
    g_theta = flat(torch.autograd.grad(inner(th, ph), list(th.values()), create_graph=True))
    hessian_rows, mixed_rows = [], []
    for i in range(g_theta.numel()):
        rows = torch.autograd.grad(g_theta[i], list(th.values()) + list(ph.values()), retain_graph=True,
                                   allow_unused=True)
        rows = [torch.zeros_like(p) if r is None else r for r, p in zip(rows, list(th.values()) + list(ph.values()))]
        hessian_rows.append(flat(rows[:len(th)]))
        mixed_rows.append(flat(rows[len(th):]))
    hessian, mixed = torch.stack(hessian_rows), torch.stack(mixed_rows)  # [θ, θ], [θ, φ]
    torch.testing.assert_close(hessian, hessian.T, rtol=1e-10, atol=1e-12)
    gradient = f_phi - mixed.T @ torch.linalg.solve(hessian, f_theta)
    out, i = {}, 0
    for k in names:
        n = phi[k].numel()
        out[k] = gradient[i:i + n].view_as(phi[k])
        i += n
    return out, float(outer.detach()), float(torch.linalg.eigvalsh(hessian).min())


@pytest.mark.parametrize("model", list(MODELS))
def test_implicit_estimator_on_imaml_with_a_users_model_equals_the_hessian_solved_exactly(model):
    algo, forward, names, adapted = build(model, lambda m, trainable: IMAML(
        m, CLASSIFICATION, IMAML_LR, IMAML_STEPS, options=IMAMLOptions(reg=REG), trainable=trainable))
    phi = algo.init_meta_params()
    parts, stacked = tasks_of()
    theta0 = initial(phi, names)
    expected = {k: torch.zeros_like(v) for k, v in theta0.items()}
    loss = 0.0
    for task in parts:
        grads, outer, smallest = implicit_gradient(forward, theta0, adapted, task)
        assert smallest > 0.1 * REG  # positive definite, well conditioned: CG converges
        for k in names:
            expected[k] += grads[k] / len(parts)
        loss += outer / len(parts)
    assert_nontrivial(expected, names)
    for path, loop in (("loop", True), ("vmap", False)):
        grads, metrics = build_estimator("implicit", {**SOLVER, "loop": loop})(algo, phi, stacked)
        assert_equal_grads(grads, expected, f"implicit, {path}", rtol=1e-8, atol=1e-11)
        assert metrics["residual"] < 1e-12, path
        assert metrics["loss"] == pytest.approx(loss, rel=1e-12)


# --- evolution strategies ---------------------------------------------------------------------------

POPULATION, SIGMA, ES_SEED = 8, 0.05, 3


def centred_ranks(losses):
    ranks = torch.empty_like(losses)
    ranks[losses.argsort()] = torch.arange(len(losses), dtype=losses.dtype)
    return ranks / (len(losses) - 1) - 0.5


@pytest.mark.parametrize("shaping", ["none", "centered_ranks"])
@pytest.mark.parametrize("model", list(MODELS))
def test_es_on_a_users_model_is_the_antithetic_formula_over_its_own_draws_scored_by_hand(model, shaping):
    algo, forward, names, adapted = maml_on(model)
    phi = algo.init_meta_params()
    parts, stacked = tasks_of()
    # ANIL-style: perturb only the last layer; the others perturb all of φ
    perturbed = [k for k in names if k in adapted] if model == "anil-fc" else names
    options = {"population": POPULATION, "sigma": SIGMA, "shaping": shaping, "estimator_seed": ES_SEED,
               "perturb": ["init.fc"] if model == "anil-fc" else None}
    theta = {k: v.detach() for k, v in initial(phi, names).items()}
    sizes = [theta[k].numel() for k in perturbed]
    # the estimator's own draws: its first call seeds a generator with derived_seed(seed, 0)
    pairs = POPULATION // 2
    noise = torch.randn(pairs, sum(sizes), generator=torch.Generator().manual_seed(derived_seed(ES_SEED, 0)))
    losses = []
    for member in torch.cat([flat(theta[k] for k in perturbed) + SIGMA * noise,
                             flat(theta[k] for k in perturbed) - SIGMA * noise]):
        values = dict(zip(perturbed, (v.view_as(theta[k]) for k, v in zip(perturbed, member.split(sizes)))))
        params = {k: values.get(k, theta[k]).clone().requires_grad_() for k in names}
        losses.append(float(maml_loss(forward, params, adapted, parts, LR, STEPS, create_graph=False).detach()))
    losses = torch.tensor(losses)
    u = centred_ranks(losses) if shaping == "centered_ranks" else losses
    estimate = ((u[:pairs] - u[pairs:])[:, None] * noise).sum(0) / (2 * pairs * SIGMA)
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    expected.update({k: v.view_as(theta[k]) for k, v in zip(perturbed, estimate.split(sizes))})
    assert_nontrivial(expected, perturbed)
    unperturbed = float(maml_loss(forward, initial(phi, names), adapted, parts, LR, STEPS, create_graph=False).detach())
    for path, more in (("loop", {"loop": True}), ("vmap", {}), ("vmap-chunks-of-three", {"population_chunk": 3})):
        estimator = build_estimator("es", {**options, **more})
        grads, metrics = estimator(algo, phi, stacked)
        if path != "loop":
            assert estimator._vmap_ok, "the population was not scored under vmap"
        assert_equal_grads(grads, expected, f"es ({shaping}), {path}")
        assert metrics["loss"] == pytest.approx(unperturbed, rel=1e-12)


# --- REINFORCE ---------------------------------------------------------------------------------------

def test_reinforce_refuses_maml_on_a_users_model_which_has_no_discrete_choice_to_sample():
    algo, *_ = maml_on("anil-fc")
    _, stacked = tasks_of()
    with pytest.raises(ValueError, match="declares no discrete meta-parameters"):
        build_estimator("reinforce")(algo, algo.init_meta_params(), stacked)
