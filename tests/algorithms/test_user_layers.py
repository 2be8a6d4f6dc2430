"""Standard torch layers in a user's model ("bring your own model"): each works with MAML (second- and
first-order, looped and vmapped) and ProtoNet, with meta-gradients equal to an independent float64
computation, or is refused before anything is learned with one line naming the layer and the fix.

The reference is the user's own module, copied before metaphi converts its layers, run by plain
``torch.autograd`` one task at a time (no ``torch.func``, no ``vmap``): in training mode torch's own
layers compute there what the user meant, whatever their kernels do under ``vmap``. Weight tying gets
a forward written out by hand instead, since the library and ``functional_call`` would share the tying.

What the probe of these layers found before metaphi handled them (float64, 2 tasks, 2 inner steps):
``nn.InstanceNorm2d`` and ``nn.LayerNorm`` with affine weights gave second-order meta-gradients under
``vmap`` off by 0.1-30% (torch's fused kernels' batching rules); instance norm with running statistics
and ``nn.SyncBatchNorm`` raised torch errors (in-place running averages under the transforms); lazy
layers raised torch's error on their uninitialised parameters; LSTM/GRU raised torch errors under
``vmap``; a forward that counts its calls in a buffer raised torch's in-place error in MAML; frozen
parameters were meta-learned and adapted all the same.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metaphi.algorithms.base import CLASSIFICATION, REGRESSION
from metaphi.algorithms.imaml import IMAML
from metaphi.algorithms.maml import MAML, select_parameters
from metaphi.algorithms.protonet import ProtoNet
from metaphi.inner import SGD
from metaphi.outer import build_estimator
from metaphi.tasks import Task
from tiny import random_task

pytestmark = pytest.mark.usefixtures("float64", "one_thread")

WAYS, SHOTS, QUERY, SIZE = 2, 2, 2, 6
LR, STEPS = 0.4, 2
EXACT = dict(rtol=1e-9, atol=1e-12)
PATHS = {"loop": {"loop": True}, "vmap": {}}


# --- what a user writes -----------------------------------------------------------------------------

class ConvNorm(nn.Module):
    """conv, a normalisation layer of the user's choice, relu and a linear head (no conv bias: the
    normalisation would cancel it, and its meta-gradient would be zero)."""

    def __init__(self, norm, channels=2):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, bias=False)
        self.norm = norm
        self.fc = nn.Linear(channels * 16, WAYS)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


class Tied(nn.Module):
    """Two linear layers sharing one weight matrix (weight tying)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(SIZE * SIZE, SIZE * SIZE)
        self.b = nn.Linear(SIZE * SIZE, SIZE * SIZE)
        self.b.weight = self.a.weight
        self.fc = nn.Linear(SIZE * SIZE, WAYS)

    def forward(self, x):
        return self.fc(torch.tanh(self.b(torch.tanh(self.a(x.flatten(1))))))


def tied_by_hand(p, x):
    h = torch.tanh(F.linear(x.flatten(1), p["a.weight"], p["a.bias"]))
    h = torch.tanh(F.linear(h, p["a.weight"], p["b.bias"]))  # the one matrix, used twice
    return F.linear(h, p["fc.weight"], p["fc.bias"])


class Frozen(nn.Module):
    """A frozen conv (``requires_grad=False``, as for a pretrained feature extractor) and a trained head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(32, WAYS)
        self.conv.requires_grad_(False)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Embedded(nn.Module):
    """Token ids [n, 5] -> embeddings, averaged, and a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.fc = nn.Linear(3, WAYS)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x).mean(1)))


class Recurrent(nn.Module):
    """The rows of the image as a sequence through an LSTM or GRU, the last state to a linear head."""

    def __init__(self, cell, outputs=WAYS):
        super().__init__()
        self.rnn = cell(SIZE, 4, batch_first=True)
        self.fc = nn.Linear(4, outputs)

    def forward(self, x):
        out, _ = self.rnn(x.flatten(1, 2))
        return self.fc(out[:, -1])


class Counter(nn.Module):
    """A forward that counts its calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(32, WAYS)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class LazyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.LazyLinear(WAYS)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


# name: (the user's module, a forward by hand where the module itself cannot be the reference, the names
# φ holds where not all of the module's, the warning metaphi gives where it changes what the model computes)
HANDLED = {
    "instance-norm-running-stats": (lambda: ConvNorm(nn.InstanceNorm2d(2, affine=True, track_running_stats=True)),
                                    None, None, "instance norm norm of ConvNorm normalises each example"),
    "instance-norm": (lambda: ConvNorm(nn.InstanceNorm2d(2, affine=True)), None, None, None),
    "layer-norm": (lambda: ConvNorm(nn.LayerNorm([2, 4, 4])), None, None, None),
    "sync-batch-norm": (lambda: ConvNorm(nn.SyncBatchNorm(2)), None, None,
                        "batch norm norm of ConvNorm now normalises each task by its own batch statistics"),
    "group-norm": (lambda: ConvNorm(nn.GroupNorm(2, 4), channels=4), None, None, None),
    "embedding": (Embedded, None, None, None),
    "tied-weights": (Tied, tied_by_hand, ["a.weight", "a.bias", "b.bias", "fc.weight", "fc.bias"], None),
    "frozen-conv": (Frozen, None, ["fc.weight", "fc.bias"], None),
}


def tasks_of(case, seeds=(1, 2)):
    parts = []
    for s in seeds:
        task = random_task(ways=WAYS, shots=SHOTS, query=QUERY, seed=s, size=SIZE)
        if case == "embedding":  # token ids instead of images, the same labels
            g = torch.Generator().manual_seed(s)
            task = Task((torch.randint(10, (WAYS * SHOTS, 5), generator=g), task.support[1]),
                        (torch.randint(10, (WAYS * QUERY, 5), generator=g), task.query[1]))
        parts.append(task)
    return parts, Task.stack(parts)


def built(case, make_algorithm):
    """(algorithm, reference forward (params, x), the names φ holds); checks the warnings metaphi gives."""
    make, by_hand, names, warns = HANDLED[case]
    torch.manual_seed(0)
    model = make().double()
    reference = copy.deepcopy(model)  # the user's layers, before metaphi converts them
    names = names or [k for k, _ in model.named_parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        algo = make_algorithm(model)
    said = [str(w.message) for w in caught if str(w.message).startswith("metaphi:")]
    assert len(said) == (1 if warns else 0) and all(warns in s for s in said), said
    forward = by_hand or (lambda p, x: functional_call(reference, p, (x,)))
    return algo, forward, names


def maml_by_hand(forward, theta, tasks, create_graph):
    """The mean query loss after STEPS of SGD on each task's support set, by plain autograd."""
    total = 0.0
    for task in tasks:
        (xs, ys), (xq, yq) = task.support, task.query
        fast = dict(theta)
        for _ in range(STEPS):
            grads = torch.autograd.grad(F.cross_entropy(forward(fast, xs), ys), list(fast.values()),
                                        create_graph=create_graph)
            fast = {k: v - LR * g for (k, v), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(forward(fast, xq), yq) / len(tasks)
    return total


def protonet_by_hand(forward, theta, tasks):
    """The mean query cross-entropy over negative squared distances to the class means, by plain autograd."""
    total = 0.0
    for task in tasks:
        (xs, ys), (xq, yq) = task.support, task.query
        z = forward(theta, torch.cat([xs, xq])).flatten(1)
        zs, zq = z[: len(xs)], z[len(xs):]
        prototypes = torch.stack([zs[ys == c].mean(0) for c in range(WAYS)])
        total = total + F.cross_entropy(-((zq[:, None] - prototypes[None]) ** 2).sum(-1), yq) / len(tasks)
    return total


def leaves(phi, prefix, names):
    assert sorted(phi) == sorted(f"{prefix}.{k}" for k in names)
    return {k: phi[f"{prefix}.{k}"].detach().clone().requires_grad_() for k in names}


def assert_equal_grads(grads, expected, prefix, where):
    assert set(grads) == {f"{prefix}.{k}" for k in expected}, where
    for k, e in expected.items():
        torch.testing.assert_close(grads[f"{prefix}.{k}"], e, **EXACT, msg=lambda m, k=k: f"{where}, {k}: {m}")


def one_line_error(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- handled: exact, looped and vmapped ---------------------------------------------------------------

@pytest.mark.parametrize("case", list(HANDLED))
def test_maml_on_a_users_layer_gets_the_meta_gradient_of_plain_autograd_looped_and_vmapped(case):
    algo, forward, names = built(case, lambda m: MAML(m, CLASSIFICATION, SGD(LR), inner_steps=STEPS))
    phi = algo.init_meta_params()
    parts, stacked = tasks_of(case)
    for order, create_graph in (("second-order", True), ("first-order", False)):
        theta = leaves(phi, "init", names)
        loss = maml_by_hand(forward, theta, parts, create_graph)
        expected = dict(zip(names, torch.autograd.grad(loss, list(theta.values()))))
        assert all(float(e.abs().max()) > 1e-6 for e in expected.values()), "a zero meta-gradient compares nothing"
        for path, options in PATHS.items():
            grads, metrics = build_estimator(order, options)(algo, phi, stacked)
            assert_equal_grads(grads, expected, "init", f"{case}, {order}, {path}")
            assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-12)


@pytest.mark.parametrize("case", list(HANDLED))
def test_protonet_on_a_users_layer_gets_the_gradient_of_plain_autograd_looped_and_vmapped(case):
    algo, forward, names = built(case, ProtoNet)
    phi = algo.init_meta_params()
    parts, stacked = tasks_of(case)
    theta = leaves(phi, "embed", names)
    expected = dict(zip(names, torch.autograd.grad(protonet_by_hand(forward, theta, parts), list(theta.values()))))
    assert float(max(e.abs().max() for e in expected.values())) > 1e-6
    for path, options in PATHS.items():
        grads, _ = build_estimator("first-order", options)(algo, phi, stacked)
        assert_equal_grads(grads, expected, "embed", f"{case}, {path}")


def test_instance_norm_keeps_no_running_statistics_and_normalises_each_example_by_its_own_at_test_time_too():
    model = ConvNorm(nn.InstanceNorm2d(2, affine=True, track_running_stats=True)).double()
    weight = model.norm.weight
    with pytest.warns(UserWarning, match="running statistics are not kept"):
        algo = MAML(model, CLASSIFICATION, SGD(LR))
    assert not [k for k, _ in model.named_buffers() if "running" in k]
    assert algo.model.norm.weight is weight  # the user's parameter, under the same name
    x = random_task(ways=WAYS, shots=SHOTS, seed=3, size=SIZE).support[0]
    trained = model(x)
    model.eval()  # where torch's layer would use its running averages
    torch.testing.assert_close(model(x), trained, **EXACT)
    torch.testing.assert_close(model(x[:1]), trained[:1], **EXACT)  # each example alone: the same


def test_a_frozen_parameter_is_neither_meta_learned_nor_adapted_and_naming_it_trainable_is_refused():
    # (that the inner loop leaves it as it is, the meta-gradients above say: the reference holds it constant)
    assert sorted(MAML(Frozen(), CLASSIFICATION, SGD(LR)).init_meta_params()) == ["init.fc.bias", "init.fc.weight"]
    assert sorted(ProtoNet(Frozen()).init_meta_params()) == ["embed.fc.bias", "embed.fc.weight"]
    with pytest.raises(ValueError, match=r"trainable names 'conv.weight', which is frozen in Frozen") as error:
        MAML(Frozen(), CLASSIFICATION, SGD(LR), trainable=["conv.weight"])
    one_line_error(error)
    names = ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match=r"selects no parameter .*fc.bias; frozen: conv.weight, conv.bias"):
        select_parameters(names, "conv.*", "Frozen", frozen=["conv.weight", "conv.bias"])


# --- refused, before anything is learned --------------------------------------------------------------

@pytest.mark.parametrize("make_algorithm", [lambda m: MAML(m, CLASSIFICATION, SGD(LR)), ProtoNet],
                         ids=["maml", "protonet"])
def test_a_lazy_layer_is_refused_when_the_algorithm_is_built_and_works_once_the_model_has_run(make_algorithm):
    model = LazyHead().double()
    with pytest.raises(ValueError, match=r"^layer 'fc' \(LazyLinear\) has not made its parameters yet .*model\(x\)"
                       ) as error:
        make_algorithm(model)
    one_line_error(error)
    parts, stacked = tasks_of("lazy")
    model(parts[0].support[0])  # the fix the message gives
    algo = make_algorithm(model)
    grads, _ = build_estimator("first-order")(algo, algo.init_meta_params(), stacked)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_a_recurrent_layer_trains_looped_exactly_and_the_vmapped_estimators_refuse_it_before_any_step(cell, tmp_path):
    from metaphi.train import TrainConfig, meta_train

    torch.manual_seed(0)
    model = Recurrent(cell).double()
    reference = copy.deepcopy(model)
    algo = MAML(model, CLASSIFICATION, SGD(LR), inner_steps=STEPS)
    phi = algo.init_meta_params()
    parts, stacked = tasks_of("recurrent")
    names = [k for k, _ in reference.named_parameters()]
    theta = leaves(phi, "init", names)
    loss = maml_by_hand(lambda p, x: functional_call(reference, p, (x,)), theta, parts, create_graph=True)
    expected = dict(zip(names, torch.autograd.grad(loss, list(theta.values()))))
    grads, _ = build_estimator("second-order", {"loop": True})(algo, phi, stacked)
    assert_equal_grads(grads, expected, "init", f"{cell.__name__}, looped")
    refusal = rf"^layer 'rnn' \({cell.__name__}\) does not run under torch.func.vmap.*estimator option loop"
    imaml = IMAML(Recurrent(cell).double(), CLASSIFICATION, LR, STEPS)
    for name, algorithm in (("second-order", algo), ("first-order", algo), ("implicit", imaml)):
        with pytest.raises(ValueError, match=refusal) as error:
            build_estimator(name)(algorithm, algorithm.init_meta_params(), stacked)
        one_line_error(error)
    sample = lambda n, g: stacked
    with pytest.raises(ValueError, match=refusal):
        meta_train(algo, build_estimator("second-order"), sample, TrainConfig(iterations=2, meta_batch=2),
                   out_dir=str(tmp_path), progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()  # nothing trained, nothing saved
    # a regression model is scored one task at a time, not under vmap
    assert not MAML(Recurrent(cell, outputs=1).double(), REGRESSION, SGD(LR)).batched_eval


@pytest.mark.parametrize("make_algorithm", [lambda m: MAML(m, CLASSIFICATION, SGD(LR)), ProtoNet],
                         ids=["maml", "protonet"])
def test_a_forward_that_changes_a_buffer_is_refused_at_the_first_step_and_nothing_trains(make_algorithm, tmp_path):
    from metaphi.train import TrainConfig, meta_train

    model = Counter().double()
    algo = make_algorithm(model)
    phi = algo.init_meta_params()
    before = {k: v.detach().clone() for k, v in phi.items()}
    _, stacked = tasks_of("counter")
    refusal = r"^the model \(Counter\) changes its buffer 'calls' when it runs: .*keep such state outside forward"
    estimators = {"second-order": {}, "first-order": {"loop": True}, "es": {"population": 2}}
    if isinstance(algo, MAML):
        estimators["reptile"] = {}
    for name, options in estimators.items():
        with pytest.raises(ValueError, match=refusal) as error:
            build_estimator(name, options)(algo, phi, stacked)
        one_line_error(error)
    assert int(model.calls) == 0  # the trial run's count put back
    sample = lambda n, g: stacked
    with pytest.raises(ValueError, match=refusal):
        meta_train(algo, build_estimator(algo.estimators[0]), sample, TrainConfig(iterations=2, meta_batch=2),
                   out_dir=str(tmp_path), progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()
    assert all(torch.equal(phi[k], v) for k, v in before.items())


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm writes it: batch norm, then dropout and an activation, in one layer with a forward of its own."""

    def __init__(self, channels):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ScaledBatchNorm(nn.BatchNorm2d):
    """A batch norm whose own forward computes something else: it cannot be turned without changing that."""

    def forward(self, x):
        return 2 * super().forward(x)


class Plain(nn.BatchNorm2d):
    """A subclass that keeps torch's forward."""


def test_batch_norm_subclasses_are_turned_where_their_forward_is_known_and_refused_otherwise():
    from metaphi.models.layers import TaskBatchNorm, TaskBatchNormAct, task_batch_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), BatchNormAct2d(3), nn.Conv2d(3, 3, 3), Plain(3))
    model[1].weight.data.uniform_(0.5, 1.5)
    model[1].bias.data.uniform_(-1, 1)
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():  # batch statistics, as the turned layers use at training and at test
        want = model.train()(x)
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("running_mean", "running_var",
                                                                                       "num_batches_tracked"))}
    assert task_batch_norm(model) == ["1", "3"]
    assert type(model[1]) is TaskBatchNormAct and type(model[3]) is TaskBatchNorm
    assert isinstance(model[1].act, nn.ReLU)
    assert {k: v for k, v in model.state_dict().items()}.keys() == weights.keys()  # the same names
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want)  # the activation is kept; eval uses the batch's statistics
    with pytest.raises(ValueError, match=r"layer '0' \(ScaledBatchNorm\) is a batch norm with a forward of its own"):
        task_batch_norm(nn.Sequential(ScaledBatchNorm(1)))
