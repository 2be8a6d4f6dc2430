"""Models users bring (plain torch layers, their own names) with the library's algorithms: the right
parameters adapt, a selection of none is refused, and the meta-gradients equal independent float64
computations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaphi.algorithms.base import CLASSIFICATION
from metaphi.algorithms.maml import MAML, select_parameters
from metaphi.algorithms.protonet import ProtoNet
from metaphi.inner import SGD
from metaphi.outer import build_estimator
from metaphi.tasks import Task
from tiny import random_task


class UserNet(nn.Module):
    """What a user writes: a conv, a flatten and a last layer called ``fc``."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 8 * 8, ways)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def batch(task: Task) -> Task:
    """One task as a meta-batch of one."""
    (xs, ys), (xq, yq) = task.support, task.query
    return Task((xs[None], ys[None]), (xq[None], yq[None]))


def test_the_adapted_parameters_are_chosen_by_name_pattern_list_or_predicate():
    names = [k for k, _ in UserNet().named_parameters()]
    assert select_parameters(names, "fc.*") == ["fc.weight", "fc.bias"]
    assert select_parameters(names, "conv.*, fc.bias") == ["conv.weight", "conv.bias", "fc.bias"]
    assert select_parameters(names, ["fc.weight"]) == ["fc.weight"]
    assert select_parameters(names, lambda k: k.endswith("bias")) == ["conv.bias", "fc.bias"]
    assert select_parameters(names, "all") == names
    # ANIL's "head" on a model whose last layer is not called head adapts nothing: refused, naming them
    with pytest.raises(ValueError, match=r"selects no parameter of UserNet.*conv.weight, conv.bias, fc.weight"):
        MAML(UserNet(), CLASSIFICATION, SGD(0.1), trainable="head")
    with pytest.raises(ValueError, match="does not have"):
        select_parameters(names, ["head.weight"])


def test_anil_on_a_user_model_matches_an_independent_float64_meta_gradient(float64):
    torch.manual_seed(0)
    model = UserNet().double()
    algo = MAML(model, CLASSIFICATION, SGD(0.3), inner_steps=2, trainable="fc.*")
    phi = algo.init_meta_params()
    task = random_task(ways=3, shots=2, query=2, seed=1)
    grads, _ = build_estimator("second-order", {"loop": True})(algo, phi, batch(task))
    # the same by hand: two SGD steps on fc alone, then the query loss, differentiated through both
    theta = {k.removeprefix("init."): v.detach().clone().requires_grad_() for k, v in phi.items()}
    (xs, ys), (xq, yq) = task.support, task.query
    fast = dict(theta)
    for _ in range(2):
        loss = F.cross_entropy(functional_call(model, fast, (xs,)), ys)
        g = torch.autograd.grad(loss, [fast["fc.weight"], fast["fc.bias"]], create_graph=True)
        fast = {**fast, "fc.weight": fast["fc.weight"] - 0.3 * g[0], "fc.bias": fast["fc.bias"] - 0.3 * g[1]}
    expected = torch.autograd.grad(F.cross_entropy(functional_call(model, fast, (xq,)), yq), list(theta.values()))
    for (k, e) in zip(theta, expected):
        torch.testing.assert_close(grads[f"init.{k}"], e, rtol=1e-9, atol=1e-12)
    assert algo.spec()["args"]["trainable"] == "fc.*"


def test_protonet_takes_a_plain_encoder(float64):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))  # no features(), no head
    algo = ProtoNet(encoder.double())
    phi = algo.init_meta_params()
    assert sorted(phi) == sorted(f"embed.{k}" for k, _ in encoder.named_parameters())
    task = random_task(ways=3, shots=2, query=2, seed=2)
    grads, _ = build_estimator("first-order", {"loop": True})(algo, phi, batch(task))
    # by hand: embeddings flattened, class means, squared euclidean distances, cross-entropy on queries
    theta = {k.removeprefix("embed."): v.detach().clone().requires_grad_() for k, v in phi.items()}
    (xs, ys), (xq, yq) = task.support, task.query
    z = functional_call(encoder, theta, (torch.cat([xs, xq]),)).flatten(1)
    zs, zq = z[: len(xs)], z[len(xs):]
    prototypes = torch.stack([zs[ys == c].mean(0) for c in range(3)])
    loss = F.cross_entropy(-torch.cdist(zq, prototypes) ** 2, yq)
    expected = torch.autograd.grad(loss, list(theta.values()))
    for k, e in zip(theta, expected):
        torch.testing.assert_close(grads[f"embed.{k}"], e, rtol=1e-7, atol=1e-10)


def test_a_user_model_without_spec_saves_and_its_weights_load_into_the_users_module(tmp_path):
    from metaphi import checkpoint
    from metaphi.train import TrainConfig, load_model, meta_train

    torch.manual_seed(0)
    algo = MAML(UserNet(), CLASSIFICATION, SGD(0.1), trainable="fc.*")
    sample = lambda n, g: Task(*[(torch.rand(n, 6, 1, 10, 10, generator=g), torch.arange(3).repeat(2).expand(n, 6))
                                 for _ in range(2)])
    state = meta_train(algo, build_estimator("first-order"), sample, TrainConfig(iterations=2, meta_batch=2),
                       out_dir=str(tmp_path), progress=False)
    mine = UserNet()
    mine.load_state_dict(checkpoint.module_state(tmp_path / "checkpoint.pt"))  # every weight, the user's names
    assert torch.equal(mine.fc.weight, state.phi["init.fc.weight"].detach())
    # eval/predict cannot rebuild a module they do not know: one line saying what to do
    with pytest.raises(checkpoint.CheckpointError, match=r"your own .*UserNet.*module_state"):
        load_model(str(tmp_path / "checkpoint.pt"))


WARNS = pytest.warns(UserWarning, match="bn of BatchNormNet now normalises each task by its own batch statistics")


class BatchNormNet(nn.Module):
    """A user's CNN with the standard batch norm (running statistics on or off) and dropout."""

    def __init__(self, running=True, dropout=0.0, ways=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=running)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * 8 * 8, ways)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("running", [True, False], ids=["running-stats", "no-running-stats"])
def test_standard_batch_norm_gets_exact_per_task_meta_gradients_looped_and_vmapped(float64, running):
    torch.manual_seed(0)
    reference_model = BatchNormNet(running=False).double()  # plain autograd, batch statistics per call
    model = BatchNormNet(running=running).double()
    model.load_state_dict(reference_model.state_dict(), strict=False)
    with WARNS:
        algo = MAML(model, CLASSIFICATION, SGD(0.3), inner_steps=1)
    phi = algo.init_meta_params()
    tasks = [random_task(ways=3, shots=2, query=2, seed=s) for s in (3, 4)]
    stacked = Task.stack(tasks)
    looped, _ = build_estimator("second-order", {"loop": True})(algo, phi, stacked)
    vmapped, _ = build_estimator("second-order")(algo, phi, stacked)
    # by hand: each task's second-order MAML gradient through the user's own (unconverted) layers
    theta = {k.removeprefix("init."): v.detach().clone().requires_grad_() for k, v in phi.items()}
    total = 0
    for task in tasks:
        (xs, ys), (xq, yq) = task.support, task.query
        loss = F.cross_entropy(functional_call(reference_model, theta, (xs,)), ys)
        g = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        fast = {k: v - 0.3 * gk for (k, v), gk in zip(theta.items(), g)}
        total = total + F.cross_entropy(functional_call(reference_model, fast, (xq,)), yq) / len(tasks)
    expected = dict(zip(theta, torch.autograd.grad(total, list(theta.values()))))
    for k, e in expected.items():
        torch.testing.assert_close(looped[f"init.{k}"], e, rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(vmapped[f"init.{k}"], e, rtol=1e-8, atol=1e-11)


def test_dropout_runs_under_vmap_with_per_task_draws_and_is_off_when_scored(float64):
    from metaphi.evaluate import evaluate

    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        algo = MAML(BatchNormNet(running=False, dropout=0.5).double(), CLASSIFICATION, SGD(0.3))
    phi = algo.init_meta_params()
    stacked = Task.stack([random_task(ways=3, shots=2, query=2, seed=s) for s in (3, 4)])
    grads, _ = build_estimator("first-order")(algo, phi, stacked)  # vmapped: no randomness error
    assert all(torch.isfinite(g).all() for g in grads.values())
    sampler = lambda n, g: Task.stack([random_task(ways=3, shots=2, query=2,
                                                   seed=int(torch.randint(99, (1,), generator=g))) for _ in range(n)])
    first, second = (evaluate(algo, phi, sampler, 6, seed=1)["mean"] for _ in range(2))
    assert first == second  # dropout is off when scored: the same tasks give the same score
    assert algo.model.training  # and the model is back in training mode
