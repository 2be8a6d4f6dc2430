"""The compiled estimator (``Unrolled(compile=True)``, ``metaphi run --compile``) in float64.

Its meta-gradient is ``torch.func.grad`` of the task loss compiled by ``torch.compile``; it must equal
the eager estimator's (itself checked against hand-written references in test_speed_parity.py and
test_engine.py) for second-order MAML with the task batch norm and the convolutions that compiled
code runs as matrix products (8x8 images: every layer), for Meta-SGD's learned step sizes, and for
first-order MAML in vmap chunks. Each case compiles a small graph (seconds to tens of seconds).
"""
import json

import pytest
import torch
from torch._dynamo.utils import counters

from metaphi.algorithms import CLASSIFICATION
from metaphi.algorithms.maml import MAML
from metaphi.cli import main
from metaphi.inner import SGD, MetaSGD
from metaphi.models import Conv4
from metaphi.models.layers import Conv2d, conv2d_gemm
from metaphi.models.mlp import MLP
from metaphi.outer import Unrolled
from metaphi.tasks import Task

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def image_tasks(n, ways=3, shots=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda k: torch.rand(n, ways * k, 1, size, size, generator=g)
    y = lambda k: torch.arange(ways).repeat_interleave(k).expand(n, -1).contiguous()
    return Task((x(shots), y(shots)), (x(shots), y(shots)))


def vector_tasks(n, ways=2, per_class=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randn(n, ways * per_class, 5, generator=g)
    y = lambda: torch.arange(ways).repeat_interleave(per_class).expand(n, -1).contiguous()
    return Task((x(), y()), (x(), y()))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def compiled_graphs():
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("size, stride, padding, kernel, bias", [
    (7, (2, 2), (1, 1), 3, True), (4, (2, 2), (1, 1), 3, False), (8, (1, 1), (1, 1), 3, True),
    (5, (1, 2), (0, 1), 2, True), (6, (1, 1), (2, 0), 5, False),
])
def test_conv2d_as_a_matrix_product_equals_the_library_convolution(size, stride, padding, kernel, bias):
    g = torch.Generator().manual_seed(size)
    x = torch.randn(3, 4, size, size + 1, generator=g, requires_grad=True)
    w = torch.randn(5, 4, kernel, kernel, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True) if bias else None
    want = torch.nn.functional.conv2d(x, w, b, stride, padding)
    got = conv2d_gemm(x, w, b, stride, padding)
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-12
    v = torch.randn(want.shape, generator=g)
    inputs = [x, w] + ([b] if bias else [])
    for a, c in zip(torch.autograd.grad((got * v).sum(), inputs), torch.autograd.grad((want * v).sum(), inputs)):
        assert float((a - c).abs().max()) < 1e-12


def test_conv2d_is_the_library_convolution_outside_compiled_code():
    layer = Conv2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(2, 2, 4, 4)
    assert torch.equal(layer(x), torch.nn.functional.conv2d(x, layer.weight, layer.bias, 2, 1))
    assert list(layer.state_dict()) == ["weight", "bias"]


def test_second_order_conv4_with_task_batch_norm_matches_eager():
    torch.manual_seed(0)
    algo = MAML(Conv4(1, 3, hidden=4, image_size=8), CLASSIFICATION, SGD(0.4), inner_steps=1)
    phi = algo.init_meta_params()
    tasks = image_tasks(3)
    before = compiled_graphs()
    got, got_metrics = Unrolled(compile=True)(algo, phi, tasks)
    assert compiled_graphs() > before  # it did compile (not an eager fallback)
    want, want_metrics = Unrolled()(algo, phi, tasks)
    assert max_diff(got, want) < 1e-12
    assert got_metrics["loss"] == pytest.approx(want_metrics["loss"], abs=1e-12)
    assert got_metrics["accuracy"] == pytest.approx(want_metrics["accuracy"])
    # the whole meta-batch as one compiled vmap (what `metaphi run --compile` does without --loop)
    batched, _ = Unrolled(vectorize=True, compile=True)(algo, phi, tasks)
    assert max_diff(batched, want) < 1e-12
    # the next meta-batch (other φ, other tasks of the same shapes) reuses the graph
    estimator = Unrolled(compile=True)
    estimator(algo, phi, tasks)
    graphs = compiled_graphs()
    estimator(algo, {k: (v + 0.01).detach().requires_grad_() for k, v in phi.items()}, image_tasks(3, seed=1))
    assert compiled_graphs() == graphs


def test_metasgd_step_sizes_and_first_order_chunks_match_eager():
    torch.manual_seed(1)
    algo = MAML(MLP(5, 2, [8]), CLASSIFICATION, MetaSGD(0.1), inner_steps=1)
    phi = algo.init_meta_params()
    tasks = vector_tasks(5)
    got, _ = Unrolled(compile=True)(algo, phi, tasks)
    want, _ = Unrolled()(algo, phi, tasks)
    assert any(k.startswith("rule.") for k in got) and max_diff(got, want) < 1e-12
    # first order, vmap in chunks of 2 (2 + 2 + 1 tasks: two shapes, two graphs), weighted by chunk size
    got, _ = Unrolled(first_order=True, vectorize=True, chunk=2, compile=True)(algo, phi, tasks)
    want, _ = Unrolled(first_order=True)(algo, phi, tasks)
    assert max_diff(got, want) < 1e-12


def test_each_algorithm_gets_graphs_of_its_own_under_a_recompile_limit_of_one():
    # one shared code object would hit torch.compile's recompile limit and run the rest uncompiled
    tasks = vector_tasks(2)
    with torch._dynamo.config.patch(recompile_limit=1):
        for seed in range(3):
            torch.manual_seed(seed)
            algo = MAML(MLP(5, 2, [6]), CLASSIFICATION, SGD(0.1), inner_steps=1)
            phi = algo.init_meta_params()
            before = compiled_graphs()
            got, _ = Unrolled(compile=True)(algo, phi, tasks)
            assert compiled_graphs() == before + 1
            assert max_diff(got, Unrolled()(algo, phi, tasks)[0]) < 1e-12


def test_compile_refuses_checkpointing():
    with pytest.raises(ValueError, match="compile and checkpoint"):
        Unrolled(compile=True, checkpoint=True)


def test_run_compile_trains_and_refuses_estimators_it_does_not_apply_to(tmp_path, capsys):
    fast = ["--benchmark", "sinusoid", "--iterations", "3", "--meta-batch", "2", "--eval-tasks", "10",
            "--val-tasks", "5", "--quiet", "--no-baselines"]
    assert main(["run", "maml", *fast, "--compile", "--loop", "--out", str(tmp_path / "c")]) == 0
    assert main(["run", "maml", *fast, "--loop", "--out", str(tmp_path / "e")]) == 0
    compiled = json.loads((tmp_path / "c" / "result.json").read_text())
    eager = json.loads((tmp_path / "e" / "result.json").read_text())
    assert compiled["mean"] == pytest.approx(eager["mean"], rel=1e-4)
    capsys.readouterr()
    assert main(["run", "reptile", *fast, "--compile", "--out", str(tmp_path / "r")]) == 2
    assert "--compile applies to the second-order and first-order estimators" in capsys.readouterr().err
