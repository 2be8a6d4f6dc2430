"""MLDG, first-order MLDG and ERM against independent float64 computations (the domaingen command:
tests/cli/test_domaingen.py)."""
import pytest
import torch
import torch.nn.functional as F

from metaphi.algorithms import build_algorithm
from metaphi.algorithms.mldg import ERM, MLDG, create, mldg_from_spec
from metaphi.models import GroupNorm
from metaphi.models import GroupNormConvNet as ConvNet
from metaphi.functional import prefixed
from metaphi.inner import Unroll
from metaphi.models import MLP
from metaphi.outer import Unrolled
from metaphi.tasks import ImageClasses, Task
from metaphi.tasks.domains import DomainSet, instance_split
from metaphi.train import TrainConfig, meta_train


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_mlp(seed=0, features=4, classes=3):
    torch.manual_seed(seed)
    return MLP(features, classes, (5,), activation="tanh")  # smooth, so finite differences are exact to O(h²)


def domain_task(train_domains=2, test_domains=1, batch=4, features=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(train_domains, batch, features, generator=g)
    ys = torch.randint(classes, (train_domains, batch), generator=g)
    xq = torch.randn(test_domains, batch, features, generator=g)
    yq = torch.randint(classes, (test_domains, batch), generator=g)
    return Task((xs, ys), (xq, yq))


def mlp_mldg(first_order=False, inner_lr=0.3, beta=0.7):
    return MLDG(tiny_mlp(), inner_lr=inner_lr, beta=beta, first_order=first_order, adapt_params="all")


def flat_loss(algo, phi, task, first_order):
    loss, _ = algo.task_loss(phi, task, Unroll(first_order=first_order))
    return loss


# ------------------------------------------------------------------------------ the gradient of MLDG
def test_mldg_gradient_matches_central_finite_differences(float64):
    algo = mlp_mldg()
    phi = algo.init_meta_params()
    task = domain_task()
    grads, _ = Unrolled(first_order=False)(algo, phi, Task.stack([task]))
    h = 1e-6
    for k, v in phi.items():
        for i in range(v.numel()):
            plus = {n: p.detach().clone() for n, p in phi.items()}
            minus = {n: p.detach().clone() for n, p in phi.items()}
            plus[k].view(-1)[i] += h
            minus[k].view(-1)[i] -= h
            numeric = (flat_loss(algo, plus, task, False) - flat_loss(algo, minus, task, False)) / (2 * h)
            assert float(grads[k].view(-1)[i]) == pytest.approx(float(numeric), abs=1e-7, rel=1e-6), (k, i)


def test_mldg_gradient_is_the_papers_formula(float64):
    """∇F(θ) + β (I − α ∇²F(θ)) ∇G(θ'), with θ' = θ − α∇F(θ), from plain autograd on flat vectors."""
    algo = mlp_mldg(inner_lr=0.3, beta=0.7)
    phi = algo.init_meta_params()
    task = domain_task(train_domains=3, test_domains=1)
    keys = list(phi)
    shapes = [phi[k].shape for k in keys]
    theta0 = torch.cat([phi[k].detach().flatten() for k in keys])

    def unflat(t):
        out, i = {}, 0
        for k, s in zip(keys, shapes):
            out[k[len("init."):]] = t[i:i + s.numel()].view(s)
            i += s.numel()
        return out

    def loss_on(batch):
        x, y = batch[0].flatten(0, 1), batch[1].flatten(0, 1)
        return lambda t: F.cross_entropy(torch.func.functional_call(algo.model, unflat(t), (x,)), y)

    Fn, Gn = loss_on(task.support), loss_on(task.query)
    theta = theta0.clone().requires_grad_()
    gF = torch.autograd.grad(Fn(theta), theta)[0]
    stepped = (theta0 - 0.3 * gF).detach().requires_grad_()
    gG = torch.autograd.grad(Gn(stepped), stepped)[0]
    theta = theta0.clone().requires_grad_()
    (gF2,) = torch.autograd.grad(Fn(theta), theta, create_graph=True)
    hvp = torch.autograd.grad(gF2 @ gG, theta)[0]
    expected = gF + 0.7 * (gG - 0.3 * hvp)
    grads, _ = Unrolled(first_order=False)(algo, phi, Task.stack([task]))
    got = torch.cat([grads[k].flatten() for k in keys])
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)
    # first order: the Hessian term dropped
    fo, _ = Unrolled(first_order=True)(algo, phi, Task.stack([task]))
    torch.testing.assert_close(torch.cat([fo[k].flatten() for k in keys]), gF + 0.7 * gG, atol=1e-10, rtol=1e-9)


def test_first_order_flag_of_the_algorithm_is_its_default(float64):
    phi = mlp_mldg().init_meta_params()
    task = domain_task()
    fo_algo = mlp_mldg(first_order=True)
    a = torch.autograd.grad(fo_algo.task_loss(phi, task)[0], list(phi.values()))
    b = torch.autograd.grad(mlp_mldg().task_loss(phi, task, Unroll(first_order=True))[0], list(phi.values()))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_vmapped_meta_batch_matches_the_loop_with_a_convnet(float64):
    torch.manual_seed(0)
    algo = MLDG(ConvNet(1, 3, hidden=8, blocks=2, groups=2), inner_lr=0.2)
    phi = algo.init_meta_params()
    g = torch.Generator().manual_seed(1)
    tasks = Task((torch.rand(3, 2, 4, 1, 8, 8, generator=g), torch.randint(3, (3, 2, 4), generator=g)),
                 (torch.rand(3, 1, 4, 1, 8, 8, generator=g), torch.randint(3, (3, 1, 4), generator=g)))
    for first_order in (False, True):
        loop, _ = Unrolled(first_order, vectorize=False)(algo, phi, tasks)
        vmapped, _ = Unrolled(first_order, vectorize=True)(algo, phi, tasks)
        for k in phi:
            torch.testing.assert_close(vmapped[k], loop[k], atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------- one source domain is ERM
def one_domain_set(n_classes=3, per_class=9, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n_classes * per_class, 1, size, size, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    data = ImageClasses(images, labels, [f"c{i}" for i in range(n_classes)])
    roles = instance_split(data, 2, 2)
    part = {r: ImageClasses(data.images[i], data.targets[i], data.classes) for r, i in roles.items()}
    other = {r: ImageClasses(255 - p.images, p.targets, p.classes) for r, p in part.items()}
    return DomainSet("two", ["a", "b"], [part, other])


@pytest.mark.parametrize("method", ["mldg", "mldg-fo"])
def test_with_one_source_domain_mldg_update_is_erms(method):
    split = one_domain_set().leave_one_out("b")  # one source domain left: "a"
    sampler = split.source_batches(4)
    task = sampler.sample_batch(2, torch.Generator().manual_seed(0))
    assert task.query[0].shape[1] == 0, "no domain is left to meta-test on"

    def build(m):
        torch.manual_seed(0)
        return create(m, ConvNet(1, 3, hidden=8, blocks=2, groups=2), inner_lr=0.5)

    mldg, erm = build(method), build("erm")
    phi = erm.init_meta_params()
    for first_order in (False, True):
        g_m, _ = Unrolled(first_order)(mldg, phi, task)
        g_e, _ = Unrolled(first_order)(erm, phi, task)
        for k in phi:
            torch.testing.assert_close(g_m[k], g_e[k], rtol=0, atol=0)
    # and whole training runs stay identical
    states = []
    for algo in (build(method), build("erm")):
        estimator = Unrolled(getattr(algo, "first_order", False))
        states.append(meta_train(algo, estimator, sampler.sample_batch,
                                 TrainConfig(iterations=3, meta_batch=1, meta_lr=1e-2, seed=0), progress=False))
    for k in states[0].phi:
        torch.testing.assert_close(states[0].phi[k], states[1].phi[k], rtol=0, atol=0)


def test_beta_zero_is_erm_on_the_meta_train_domains(float64):
    task = domain_task()
    mldg = mlp_mldg(beta=0.0)
    erm = ERM(tiny_mlp(), adapt_params="all")
    phi = mldg.init_meta_params()
    only_train = Task(task.support, (task.query[0][:0], task.query[1][:0]))
    torch.testing.assert_close(mldg.task_loss(phi, task)[0], erm.task_loss(phi, only_train)[0])


def test_erm_pools_the_meta_train_and_meta_test_domains(float64):
    task = domain_task(train_domains=2, test_domains=1)
    erm = ERM(tiny_mlp(), adapt_params="all")
    phi = erm.init_meta_params()
    x = torch.cat([task.support[0], task.query[0]]).flatten(0, 1)
    y = torch.cat([task.support[1], task.query[1]]).flatten(0, 1)
    expected = F.cross_entropy(torch.func.functional_call(erm.model, prefixed(phi, "init"), (x,)), y)
    torch.testing.assert_close(erm.task_loss(phi, task)[0], expected)


# ---------------------------------------------------------------------------- model and adaptation
def test_group_norm_is_per_example():
    torch.manual_seed(0)
    net = ConvNet(1, 4, hidden=8, blocks=2, groups=2)
    x = torch.rand(5, 1, 12, 12)
    alone = net(x[:1])
    together = net(torch.cat([x[:1], 100 * x[1:]]))[:1]
    torch.testing.assert_close(alone, together)
    gn = GroupNorm(8, 2)
    h = torch.randn(3, 8, 4, 4)
    torch.testing.assert_close(gn(h), F.group_norm(h, 2, gn.weight, gn.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapt_params", ["head", "all"])
def test_evaluate_and_predict_fine_tune_on_the_support(adapt_params):
    torch.manual_seed(0)
    algo = create("mldg", ConvNet(1, 3, hidden=8, blocks=2, groups=2), adapt_lr=0.5, eval_steps=4,
                  adapt_params=adapt_params)
    phi = algo.init_meta_params()
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(6, 1, 8, 8, generator=g), torch.arange(3).repeat(2)
    xq, yq = torch.rand(9, 1, 8, 8, generator=g), torch.arange(3).repeat(3)
    scores = algo.evaluate(phi, Task((xs, ys), (xq, yq)))
    assert scores.shape == (5,)
    empty = algo.evaluate(phi, Task((xs[:0], ys[:0]), (xq, yq)))
    assert empty.shape == (1,) and float(empty[0]) == float(scores[0])
    out = algo.predict(phi, (xs, ys), xq)
    assert float((out.argmax(1) == yq).float().mean()) == pytest.approx(float(scores[-1]))
    # fine-tuning lowers the support loss and never touches φ
    before = {k: v.clone() for k, v in phi.items()}
    start = algo.predict(phi, (xs, ys), xs, steps=0)
    end = algo.predict(phi, (xs, ys), xs, steps=20)
    assert F.cross_entropy(end, ys) < F.cross_entropy(start, ys)
    for k in phi:
        assert torch.equal(phi[k], before[k])


def test_head_adaptation_needs_a_model_that_stops_at_features():
    with pytest.raises(ValueError, match="features"):
        ERM(tiny_mlp(), adapt_params="head")


@pytest.mark.parametrize("method", ["erm", "mldg", "mldg-fo"])
def test_spec_round_trip(method):
    algo = create(method, ConvNet(1, 5, hidden=8, blocks=2, groups=2), inner_lr=0.2, beta=0.5, adapt_lr=0.3,
                  eval_steps=7)
    again = build_algorithm(algo.spec())
    assert again.spec() == algo.spec() and type(again) is type(algo)
    assert mldg_from_spec(algo.spec()).name == method


def test_training_tasks_come_from_the_source_domains():
    split = one_domain_set().leave_one_out("a")
    algo = create("mldg", ConvNet(1, 3, hidden=8, blocks=2, groups=2))
    task = algo.training_tasks(split, query=4)(2, torch.Generator().manual_seed(0))
    assert task.support[0].shape == (2, 1, 4, 1, 8, 8)
