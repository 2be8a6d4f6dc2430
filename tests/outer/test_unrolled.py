"""Meta-gradients against independent computations in float64."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaphi.algorithms import CLASSIFICATION, REGRESSION
from metaphi.algorithms.maml import MAML
from metaphi.inner import SGD, MetaSGD
from metaphi.functional import prefixed
from metaphi.models import MLP, Conv4, TaskBatchNorm
from metaphi.outer import Reptile, Unrolled
from metaphi.tasks import Task

pytestmark = pytest.mark.usefixtures("float64")


def maml(model, problem, inner_lr, inner_steps):
    return MAML(model, problem, SGD(inner_lr), inner_steps)


def fomaml(model, problem, inner_lr, inner_steps):
    return MAML(model, problem, SGD(inner_lr), inner_steps, estimators=("first-order", "second-order"))


def anil(model, problem, inner_lr, inner_steps):
    return MAML(model, problem, SGD(inner_lr), inner_steps, trainable="head")


def metasgd(model, problem, inner_lr, inner_steps):
    return MAML(model, problem, MetaSGD(inner_lr), inner_steps)


def reptile(model, problem, inner_lr, inner_steps):
    return MAML(model, problem, SGD(inner_lr), inner_steps, estimators=("reptile",))


def regression_tasks(n=3, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ys, xq, yq = (torch.randn(n, k, 2, generator=g) for _ in range(4))
    return Task((xs, ys[..., :1]), (xq, yq[..., :1]))


def classification_tasks(n=3, ways=3, shots=2, seed=0, size=12):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(n, ways * shots, 1, size, size, generator=g)
    xq = torch.rand(n, ways * shots, 1, size, size, generator=g)
    y = torch.arange(ways).repeat_interleave(shots).expand(n, -1)
    return Task((xs, y), (xq, y))


def small_mlp():
    torch.manual_seed(0)
    return MLP(2, 1, (5,), activation="tanh").double()


def reference_maml_loss(model, phi_init, tasks, lr, steps, loss_fn, create_graph=True):
    """MAML written out with torch.autograd.grad, independently of metaphi's engine."""
    total = 0.0
    for (xs, ys), (xq, yq) in zip(zip(*tasks.support), zip(*tasks.query)):
        params = dict(phi_init)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, params, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {k: v - lr * g for (k, v), g in zip(params.items(), grads)}
        total = total + loss_fn(functional_call(model, params, (xq,)), yq)
    return total / tasks.support[0].shape[0]


def as_list(grads, phi):
    return [grads[k] for k in phi]


def test_maml_meta_gradient_equals_plain_autograd_loop():
    model = small_mlp()
    algo = maml(model, REGRESSION, inner_lr=0.1, inner_steps=3)
    phi = algo.init_meta_params()
    tasks = regression_tasks()
    grads, _ = Unrolled(first_order=False)(algo, phi, tasks)
    init = prefixed(phi, "init")
    ref = torch.autograd.grad(reference_maml_loss(model, init, tasks, 0.1, 3, nn.functional.mse_loss),
                              list(init.values()))
    for k, r in zip(init, ref):
        torch.testing.assert_close(grads["init." + k], r, rtol=1e-10, atol=1e-12)


def test_maml_meta_gradient_matches_central_finite_differences():
    model = small_mlp()
    algo = maml(model, REGRESSION, inner_lr=0.1, inner_steps=2)
    phi = algo.init_meta_params()
    tasks = regression_tasks(n=2)
    grads, _ = Unrolled()(algo, phi, tasks)

    def loss_at(values):
        p = {k: v.detach().clone() for k, v in phi.items()}
        p.update(values)
        return float(sum(algo.task_loss(p, t)[0] for t in tasks.unstack()) / 2)

    eps = 1e-6
    g = torch.Generator().manual_seed(1)
    for key in phi:
        flat = phi[key].detach().flatten()
        for i in torch.randperm(flat.numel(), generator=g)[:3].tolist():
            plus, minus = flat.clone(), flat.clone()
            plus[i] += eps
            minus[i] -= eps
            fd = (loss_at({key: plus.view_as(phi[key])}) - loss_at({key: minus.view_as(phi[key])})) / (2 * eps)
            assert abs(fd - float(grads[key].flatten()[i])) < 1e-7, key


def test_first_order_equals_query_gradient_at_adapted_params():
    model = small_mlp()
    algo = fomaml(model, REGRESSION, inner_lr=0.1, inner_steps=2)
    phi = algo.init_meta_params()
    tasks = regression_tasks(n=2)
    grads, _ = Unrolled(first_order=True)(algo, phi, tasks)
    init = {k: v.detach() for k, v in prefixed(phi, "init").items()}
    expected = {k: torch.zeros_like(v) for k, v in init.items()}
    for (xs, ys), (xq, yq) in zip(zip(*tasks.support), zip(*tasks.query)):
        params = dict(init)
        for _ in range(2):
            p = {k: v.clone().requires_grad_() for k, v in params.items()}
            g = torch.autograd.grad(nn.functional.mse_loss(functional_call(model, p, (xs,)), ys), list(p.values()))
            params = {k: v - 0.1 * gi for (k, v), gi in zip(params.items(), g)}
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        gq = torch.autograd.grad(nn.functional.mse_loss(functional_call(model, p, (xq,)), yq), list(p.values()))
        for k, gi in zip(p, gq):
            expected[k] += gi / 2
    for k in init:
        torch.testing.assert_close(grads["init." + k], expected[k], rtol=1e-10, atol=1e-12)


def test_reptile_direction_is_init_minus_trained_weights():
    model = small_mlp()
    algo = reptile(model, REGRESSION, inner_lr=0.05, inner_steps=4)
    phi = algo.init_meta_params()
    tasks = regression_tasks(n=2)
    direction, _ = Reptile(minibatches=False)(algo, phi, tasks)
    init = {k: v.detach() for k, v in prefixed(phi, "init").items()}
    expected = {k: torch.zeros_like(v) for k, v in init.items()}
    for (xs, ys), (xq, yq) in zip(zip(*tasks.support), zip(*tasks.query)):
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        params = {k: v.clone().requires_grad_() for k, v in init.items()}
        for _ in range(4):
            g = torch.autograd.grad(nn.functional.mse_loss(functional_call(model, params, (x,)), y),
                                    list(params.values()))
            params = {k: (v - 0.05 * gi).detach().requires_grad_() for (k, v), gi in zip(params.items(), g)}
        for k in init:
            expected[k] += (init[k] - params[k].detach()) / 2
    for k in init:
        torch.testing.assert_close(direction["init." + k], expected[k], rtol=1e-10, atol=1e-12)


def test_reptile_minibatches_take_a_different_part_of_the_task_at_each_step():
    from metaphi.outer.es import derived_seed
    model = small_mlp()
    algo = reptile(model, REGRESSION, inner_lr=0.05, inner_steps=3)
    phi = algo.init_meta_params()
    tasks = regression_tasks(n=2)
    estimator = Reptile(minibatches=True)
    estimator.start(7)
    direction, _ = estimator(algo, phi, tasks)
    assert estimator.state_dict() == {"seed": 7, "step": 1}
    generator = torch.Generator().manual_seed(derived_seed(7, 0))
    init = {k: v.detach() for k, v in prefixed(phi, "init").items()}
    expected = {k: torch.zeros_like(v) for k, v in init.items()}
    for (xs, ys), (xq, yq) in zip(zip(*tasks.support), zip(*tasks.query)):
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        order = torch.randperm(x.shape[0], generator=generator)
        seen = []
        params = {k: v.clone().requires_grad_() for k, v in init.items()}
        for batch in torch.tensor_split(order, 3):
            seen += batch.tolist()
            g = torch.autograd.grad(nn.functional.mse_loss(functional_call(model, params, (x[batch],)), y[batch]),
                                    list(params.values()))
            params = {k: (v - 0.05 * gi).detach().requires_grad_() for (k, v), gi in zip(params.items(), g)}
        assert sorted(seen) == list(range(x.shape[0]))  # one pass over the task's data
        for k in init:
            expected[k] += (init[k] - params[k].detach()) / 2
    for k in init:
        torch.testing.assert_close(direction["init." + k], expected[k], rtol=1e-10, atol=1e-12)
    full, _ = Reptile(minibatches=False)(algo, phi, tasks)
    assert max((full[k] - direction[k]).abs().max() for k in full) > 1e-6


def test_anil_adapts_the_head_only():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=12).double()
    algo = anil(model, CLASSIFICATION, inner_lr=0.5, inner_steps=2)
    phi = algo.init_meta_params()
    task = classification_tasks(n=1).unstack()[0]
    adapted = algo.learn(phi, task.support)
    init = prefixed(phi, "init")
    changed = {k for k in init if not torch.equal(adapted[k], init[k])}
    assert changed == {"head.weight", "head.bias"}
    # the body still receives a meta-gradient through the query loss and the head's inner steps
    grads, _ = Unrolled()(algo, phi, classification_tasks(n=2))
    assert grads["init.body.0.weight"].abs().sum() > 0


def test_metasgd_step_size_gradient_has_closed_form():
    # one inner step: θ' = θ − α ⊙ g_S, so dL_Q/dα = −g_S ⊙ ∇L_Q(θ') and dL_Q/dθ = (I − diag(α) H_S) ∇L_Q(θ')
    model = small_mlp()
    algo = metasgd(model, REGRESSION, inner_lr=0.1, inner_steps=1)
    phi = algo.init_meta_params()
    with torch.no_grad():
        for k, v in phi.items():
            if k.startswith("rule."):
                v.uniform_(0.01, 0.2, generator=torch.Generator().manual_seed(len(k)))
    tasks = regression_tasks(n=1)
    grads, _ = Unrolled()(algo, phi, tasks)
    (xs, ys), (xq, yq) = tasks.unstack()[0]
    init = {k: v.detach().clone().requires_grad_() for k, v in prefixed(phi, "init").items()}
    lr = {k: v.detach() for k, v in prefixed(phi, "rule").items()}
    gs = torch.autograd.grad(nn.functional.mse_loss(functional_call(model, init, (xs,)), ys), list(init.values()))
    adapted = {k: (init[k] - lr[k] * g).detach().requires_grad_() for k, g in zip(init, gs)}
    gq = torch.autograd.grad(nn.functional.mse_loss(functional_call(model, adapted, (xq,)), yq),
                             list(adapted.values()))
    for k, g_s, g_q in zip(init, gs, gq):
        torch.testing.assert_close(grads["rule." + k], -g_s * g_q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_vmapped_tasks_equal_the_loop_over_tasks(first_order):
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=6, image_size=12).double()
    algo = maml(model, CLASSIFICATION, inner_lr=0.4, inner_steps=2)
    phi = algo.init_meta_params()
    tasks = classification_tasks(n=4)
    g_loop, m_loop = Unrolled(first_order, vectorize=False)(algo, phi, tasks)
    g_vmap, m_vmap = Unrolled(first_order, vectorize=True)(algo, phi, tasks)
    assert m_loop["loss"] == pytest.approx(m_vmap["loss"], rel=1e-12)
    for k in phi:
        torch.testing.assert_close(g_vmap[k], g_loop[k], rtol=1e-9, atol=1e-12)


def test_task_batch_norm_matches_torch_batch_statistics():
    x = torch.randn(7, 3, 5, 5)
    ours = TaskBatchNorm(3).double()
    ref = nn.BatchNorm2d(3, track_running_stats=False).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    torch.testing.assert_close(ours(x), ref(x))
    # statistics are those of the batch at hand: a task never sees another task's
    torch.testing.assert_close(ours(x[:3]), ref(x[:3]))


def test_no_inner_state_leaks_between_tasks():
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=12).double()
    algo = maml(model, CLASSIFICATION, inner_lr=0.4, inner_steps=1)
    phi = algo.init_meta_params()
    a, b = classification_tasks(n=2).unstack()
    alone = algo.task_loss(phi, a)[0]
    algo.task_loss(phi, b)
    again = algo.task_loss(phi, a)[0]
    assert float(alone.detach()) == float(again.detach())
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())
