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
