"""The speed benchmark's workloads, at small size, against a plain torch.autograd reference in float64.

benchmarks/speed.py times metaphi against higher and TorchOpt on MAML (second-order, one and five
inner steps), FOMAML and ProtoNet with a Conv4 on 28x28 images. Here the same computations are
written out by hand (F.conv2d, batch norm from its formula, torch.autograd.grad, a loop over tasks)
and metaphi's meta-gradients, looped and vmapped, must agree with them. The fast paths of the task
batch norm (torch's fused kernel outside vmap, the folded kernel under vmap) are checked here too.
"""
import pytest
import torch
import torch.nn.functional as F

from metaphi.algorithms import CLASSIFICATION
from metaphi.algorithms.maml import MAML
from metaphi.algorithms.protonet import ProtoNet
from metaphi.functional import prefixed
from metaphi.inner import SGD
from metaphi.models import Conv4, TaskBatchNorm
from metaphi.models.layers import task_batch_norm_reference
from metaphi.outer import Unrolled
from metaphi.tasks import Task


pytestmark = pytest.mark.usefixtures("float64", "one_thread")

HIDDEN, SIZE = 6, 28


def episodes(n, ways, shots, query, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(n, ways * shots, 1, SIZE, SIZE, generator=g)
    xq = torch.rand(n, ways * query, 1, SIZE, SIZE, generator=g)
    ys = torch.arange(ways).repeat_interleave(shots).expand(n, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(query).expand(n, -1).contiguous()
    return Task((xs, ys), (xq, yq))


def features(w, x):
    """Conv4 (stride 2) written out: conv, batch norm with the batch's statistics, ReLU; mean over space."""
    h = x
    for i in range(4):
        h = F.conv2d(h, w[f"body.{3 * i}.weight"], w[f"body.{3 * i}.bias"], stride=2, padding=1)
        mean = h.mean(dim=(0, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5)
        h = h * w[f"body.{3 * i + 1}.weight"].view(1, -1, 1, 1) + w[f"body.{3 * i + 1}.bias"].view(1, -1, 1, 1)
        h = torch.relu(h)
    return h.mean(dim=(2, 3))


def logits(w, x):
    return features(w, x) @ w["head.weight"].T + w["head.bias"]


def reference_maml(init, tasks, lr, steps, first_order):
    """MAML's meta-gradient, the mean over tasks, with torch.autograd.grad in a loop."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in init.items()}
    n = tasks.support[0].shape[0]
    total = 0.0
    for (xs, ys), (xq, yq) in zip(zip(*tasks.support), zip(*tasks.query)):
        w = dict(leaves)
        for _ in range(steps):
            loss = F.cross_entropy(logits(w, xs), ys)
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=not first_order)
            w = {k: v - lr * g for (k, v), g in zip(w.items(), grads)}
        total = total + F.cross_entropy(logits(w, xq), yq) / n
    return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


WORKLOADS = {  # name: (ways, shots, query, inner steps, inner lr, first order)
    "maml-5w1s-q1": (5, 1, 1, 1, 0.4, False),
    "maml-5w1s-q15": (5, 1, 15, 1, 0.4, False),
    "maml-20w1s-5steps": (20, 1, 1, 5, 0.1, False),
    "fomaml-5w1s-q15": (5, 1, 15, 1, 0.4, True),
}


@pytest.mark.parametrize("mode", ["loop", "vmap", "vmap-chunks"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_maml_workloads_match_the_autograd_reference(name, mode):
    ways, shots, query, steps, lr, first_order = WORKLOADS[name]
    torch.manual_seed(0)
    algo = MAML(Conv4(1, ways, HIDDEN, SIZE), CLASSIFICATION, SGD(lr), steps)
    phi = algo.init_meta_params()
    tasks = episodes(3, ways, shots, 2 if query > 1 else 1)
    estimator = Unrolled(first_order, vectorize=mode != "loop", chunk=2 if mode == "vmap-chunks" else None)
    grads, _ = estimator(algo, phi, tasks)
    ref = reference_maml(prefixed(phi, "init"), tasks, lr, steps, first_order)
    for k, r in ref.items():
        torch.testing.assert_close(grads["init." + k], r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vmap"])
def test_protonet_workload_matches_the_autograd_reference(vectorize):
    torch.manual_seed(0)
    algo = ProtoNet(Conv4(1, 5, HIDDEN, SIZE))
    phi = algo.init_meta_params()
    tasks = episodes(2, 5, 1, 2)
    grads, _ = Unrolled(True, vectorize=vectorize)(algo, phi, tasks)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in prefixed(phi, "embed").items()}
    total = 0.0
    for (xs, ys), (xq, yq) in zip(zip(*tasks.support), zip(*tasks.query)):
        z = features(leaves, torch.cat([xs, xq]))
        zs, zq = z[: len(xs)], z[len(xs):]
        protos = torch.stack([zs[ys == c].mean(0) for c in range(5)])
        total = total + F.cross_entropy(-((zq[:, None] - protos[None]) ** 2).sum(-1), yq) / 2
    ref = torch.autograd.grad(total, list(leaves.values()))
    for k, r in zip(leaves, ref):
        torch.testing.assert_close(grads["embed." + k], r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("transform", ["none", "grad", "vmap", "vmap-grad", "vmap-grad-grad"])
def test_task_batch_norm_fast_paths_equal_the_formula(transform):
    """Values and first and second derivatives of the fused and folded paths against the formula."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, 6, generator=g)  # tasks, N, C, H, W
    w = torch.rand(3, 5, generator=g) + 0.5
    b = torch.randn(3, 5, generator=g)
    probe = torch.randn(3, 4, 5, 6, 6, generator=g)
    bn = TaskBatchNorm(5)

    def fast(x, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,))

    def loss(f):
        return lambda x, w, b: (f(x, w, b) * probe_of(x)).sum()

    def probe_of(x):
        return probe[0] if x.dim() == 4 else probe

    def formula(x, w, b):
        return task_batch_norm_reference(x, w, b, 1e-5)

    def run(f):
        if transform == "none":
            return torch.stack([f(x[i], w[i], b[i]) for i in range(3)])
        if transform == "grad":
            return torch.stack([torch.cat([t.flatten() for t in torch.func.grad(loss(f), (0, 1, 2))(x[i], w[i], b[i])])
                                for i in range(3)])
        if transform == "vmap":
            return torch.func.vmap(f)(x, w, b)
        per_task = lambda x, w, b: (f(x, w, b) * probe[0]).sum()  # noqa: E731
        inner = torch.func.grad(per_task, (0, 1, 2))
        if transform == "vmap-grad":
            out = torch.func.vmap(inner)(x, w, b)
            return torch.cat([t.flatten() for t in out])
        # second derivatives under vmap: the gradient of a function of the inner gradient
        outer = torch.func.grad(lambda x, w, b: sum((t ** 2).sum() for t in inner(x, w, b)), (0, 1, 2))
        return torch.cat([t.flatten() for t in torch.func.vmap(outer)(x, w, b)])

    torch.testing.assert_close(run(fast), run(formula), rtol=1e-10, atol=1e-11)


def test_second_derivatives_through_the_vmapped_batch_norm_match_the_loop():
    """The meta-gradient path: outer autograd over vmap over torch.func.grad (MAML's composition)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 6, 6, generator=g)
    w = (torch.rand(5, generator=g) + 0.5).requires_grad_()
    b = torch.randn(5, generator=g).requires_grad_()
    bn = TaskBatchNorm(5)

    def task_value(x, w, b):
        inner = torch.func.grad(lambda w, b: (torch.func.functional_call(bn, {"weight": w, "bias": b}, (x,)) ** 3)
                                .sum(), (0, 1))(w, b)
        w2, b2 = w - 0.1 * inner[0], b - 0.1 * inner[1]
        return torch.func.functional_call(bn, {"weight": w2, "bias": b2}, (x * 2,)).sin().sum()

    vmapped = torch.autograd.grad(torch.func.vmap(task_value, (0, None, None))(x, w, b).sum(), (w, b))
    looped = torch.autograd.grad(sum(task_value(x[i], w, b) for i in range(3)), (w, b))
    for a, r in zip(vmapped, looped):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)


def test_run_with_task_chunks_trains_the_same_as_one_vmap(tmp_path):
    from metaphi.cli import main
    from metaphi.train import load_checkpoint

    torch.set_default_dtype(torch.float32)
    args = ["run", "maml", "--benchmark", "sinusoid", "--iterations", "2", "--meta-batch", "5", "--eval-tasks", "4",
            "--eval-steps", "1", "--val-tasks", "2", "--no-baselines", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--task-chunk", "2", "--out", str(tmp_path / "chunks")]) == 0
    a = load_checkpoint(str(tmp_path / "whole" / "checkpoint.pt"))["phi"]
    b = load_checkpoint(str(tmp_path / "chunks" / "checkpoint.pt"))["phi"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert main([*args, "--task-chunk", "0", "--out", str(tmp_path / "bad")]) == 2


def test_the_task_chunk_option_reaches_the_unrolled_estimators_only():
    from metaphi.outer import build_estimator

    assert build_estimator("second-order", {"task_chunk": 4}).chunk == 4
    assert build_estimator("first-order", {"task_chunk": 4}).chunk == 4
    assert build_estimator("second-order").chunk is None
