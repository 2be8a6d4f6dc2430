"""Gradient checkpointing of the inner loop: the same meta-gradient, with memory that does not grow
with the steps by a graph per step."""
import json

import pytest
import torch

from metaphi.algorithms import CLASSIFICATION
from metaphi.algorithms.maml import MAML
from metaphi.cli import main
from metaphi.functional import call, prefixed
from metaphi.inner import SGD, MetaSGD, Unroll, adapt
from metaphi.memory import PeakTensorMemory
from metaphi.models import Conv4
from metaphi.outer import Unrolled, build_estimator
from metaphi.tasks import Task
from metaphi.train import load_checkpoint


pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def tasks(n=2, ways=3, shots=2, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(n, ways * shots, 1, size, size, generator=g)
    xq = torch.rand(n, ways * shots, 1, size, size, generator=g)
    y = torch.arange(ways).repeat_interleave(shots).expand(n, -1).contiguous()
    return Task((xs, y), (xq, y))


def algorithm(steps, rule="sgd", trainable="all", hidden=6):
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=hidden, image_size=12)
    return MAML(model, CLASSIFICATION, SGD(0.3) if rule == "sgd" else MetaSGD(0.3), steps, trainable=trainable)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("rule,trainable", [("sgd", "all"), ("sgd", "head"), ("meta-sgd", "all")])
def test_checkpointed_and_plain_inner_loops_give_the_same_meta_gradient(first_order, rule, trainable):
    algo = algorithm(4, rule, trainable)
    phi = algo.init_meta_params()
    batch = tasks()
    plain, m_plain = Unrolled(first_order)(algo, phi, batch)
    checked, m_checked = Unrolled(first_order, checkpoint=True)(algo, phi, batch)
    assert m_checked["loss"] == pytest.approx(m_plain["loss"], rel=1e-12)
    for k in phi:
        torch.testing.assert_close(checked[k], plain[k], rtol=1e-10, atol=1e-13)
    # and the plain loop is exact: against a hand-written unroll with torch.autograd.grad
    if rule == "sgd" and trainable == "all" and not first_order:
        init = prefixed(phi, "init")
        total = 0.0
        for task in batch.unstack():
            params = dict(init)
            for _ in range(4):
                loss = CLASSIFICATION.loss(call(algo.model, params, task.support[0]), task.support[1])
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                params = {k: v - 0.3 * g for (k, v), g in zip(params.items(), grads)}
            total = total + CLASSIFICATION.loss(call(algo.model, params, task.query[0]), task.query[1]) / 2
        ref = torch.autograd.grad(total, list(init.values()))
        for k, r in zip(init, ref):
            torch.testing.assert_close(checked["init." + k], r, rtol=1e-10, atol=1e-13)


def test_checkpointed_steps_are_recomputed_in_the_backward():
    algo = algorithm(3)
    phi = algo.init_meta_params()
    task = tasks(n=1).unstack()[0]
    calls = []

    def support_loss(p):
        calls.append(1)
        return CLASSIFICATION.loss(call(algo.model, p, task.support[0]), task.support[1])

    counts = []
    for checkpoint in (False, True):
        calls.clear()
        params = adapt(support_loss, prefixed(phi, "init"), SGD(0.3), {}, 3, Unroll(checkpoint=checkpoint))
        query = CLASSIFICATION.loss(call(algo.model, params, task.query[0]), task.query[1])
        torch.autograd.grad(query, list(phi.values()))
        counts.append(len(calls))
    # one support loss per step, and again when checkpointed: for the outer backward, and (torch's
    # checkpoint hands out the step's saved tensors only by recomputing them) for the inner gradient
    assert counts == [3, 9]


def peak_bytes(steps, checkpoint, task):
    algo = algorithm(steps, hidden=4)
    phi = algo.init_meta_params()
    with PeakTensorMemory() as memory:
        loss, _ = algo.task_loss(phi, task, Unroll(checkpoint=checkpoint))
        torch.autograd.grad(loss, list(phi.values()))
        del loss
    return memory.peak


def test_peak_memory_does_not_grow_with_the_steps_by_a_graph_when_checkpointed():
    task = tasks(n=1, shots=4).unstack()[0]
    growth = {ck: (peak_bytes(5, ck, task) - peak_bytes(1, ck, task)) / 4 for ck in (False, True)}
    params = sum(v.numel() * v.element_size() for v in algorithm(1, hidden=4).init_meta_params().values())
    assert growth[False] > 5 * params  # a double-backward graph per step
    assert growth[True] <= 1.5 * params  # about one set of parameters per step


def test_the_estimator_option_runs_tasks_in_a_loop():
    est = build_estimator("second-order", {"checkpoint_inner": True})
    assert est.checkpoint and not est.vectorize
    algo = algorithm(2)
    phi = algo.init_meta_params()
    batch = tasks(n=3)
    got, _ = est(algo, phi, batch)
    want, _ = Unrolled(vectorize=True)(algo, phi, batch)
    for k in phi:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)


def test_a_checkpointed_inner_loop_refuses_vmap():
    algo = algorithm(1)
    phi = algo.init_meta_params()
    with pytest.raises(ValueError, match="one task at a time"):
        torch.func.vmap(lambda t: algo.task_loss(phi, t, Unroll(checkpoint=True))[0])(tasks())


def test_run_with_checkpoint_inner_trains_the_same_as_the_loop(tmp_path):
    torch.set_default_dtype(torch.float32)
    args = ["run", "maml", "--benchmark", "sinusoid", "--iterations", "2", "--meta-batch", "3", "--inner-steps", "3",
            "--eval-tasks", "4", "--eval-steps", "1", "--val-tasks", "2", "--no-baselines", "--quiet", "--loop"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, "--checkpoint-inner", "--out", str(tmp_path / "checked")]) == 0
    a = load_checkpoint(str(tmp_path / "plain" / "checkpoint.pt"))["phi"]
    b = load_checkpoint(str(tmp_path / "checked" / "checkpoint.pt"))["phi"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "checked" / "result.json").read_text())["iterations"] == 2
