import json

import pytest
import torch

from metaphi.algorithms import build_algorithm, create_algorithm
from metaphi.tasks.registry import build_benchmark
from metaphi.evaluate import confidence95, evaluate
from metaphi.outer import build_estimator
from metaphi.train import DIVERGENCE, Diverged, NonFiniteLoss, TrainConfig, load_checkpoint, meta_train


def setup(name="maml"):
    bench = build_benchmark("sinusoid")
    torch.manual_seed(0)
    algo = create_algorithm(name, bench, 1, 0.01, 1, 2)
    return bench, algo, algo.training_tasks(bench, 1, 5, 5)


def test_resume_continues_to_the_same_result(tmp_path):
    bench, algo, sample = setup()
    est = build_estimator("second-order")
    straight = meta_train(algo, est, sample, TrainConfig(iterations=6, meta_batch=4, checkpoint_every=3),
                          out_dir=str(tmp_path / "a"), progress=False)
    meta_train(algo, est, sample, TrainConfig(iterations=3, meta_batch=4, checkpoint_every=3),
               out_dir=str(tmp_path / "b"), progress=False)
    resumed = meta_train(algo, est, sample, TrainConfig(iterations=6, meta_batch=4, checkpoint_every=3),
                         out_dir=str(tmp_path / "b"), resume=True, progress=False)
    for k in straight.phi:
        assert torch.equal(straight.phi[k], resumed.phi[k]), k
    log = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log] == [r["loss"] for r in straight.history]


class NaNAt:
    """An estimator that returns a NaN loss at a given call, else delegates."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def __call__(self, algorithm, phi, tasks):
        self.calls += 1
        grads, metrics = self.inner(algorithm, phi, tasks)
        if self.calls == self.at:
            metrics["loss"] = float("nan")
        return grads, metrics


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    bench, algo, sample = setup()
    est = NaNAt(build_estimator("second-order", {"loop": True}), at=4)
    with pytest.raises(NonFiniteLoss, match="iteration 4"):
        meta_train(algo, est, sample, TrainConfig(iterations=10, meta_batch=2, checkpoint_every=2),
                   out_dir=str(tmp_path), progress=False)
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ck["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ck["phi"].values())


class BlowsUpAt:
    """An estimator whose reported loss is multiplied by ``factor`` for ``length`` calls from call ``at``
    (the update is the real one)."""

    def __init__(self, inner, at, factor, length=10 ** 9):
        self.inner, self.at, self.factor, self.length, self.calls = inner, at, factor, length, 0

    def __call__(self, algorithm, phi, tasks):
        self.calls += 1
        grads, metrics = self.inner(algorithm, phi, tasks)
        if self.at <= self.calls < self.at + self.length:
            metrics["loss"] = metrics["loss"] * self.factor
        return grads, metrics


def test_a_loss_that_stays_past_the_bound_stops_the_run(tmp_path):
    bench, algo, sample = setup()
    est = BlowsUpAt(build_estimator("first-order", {"loop": True}), at=6, factor=1e6)
    with pytest.raises(Diverged, match=r"above .* \(100 x its first iteration's\) for 20 iterations, up to "
                                       r"iteration 25 .*keeps iteration 4, saved before it left that bound"):
        meta_train(algo, est, sample, TrainConfig(iterations=100, meta_batch=2, checkpoint_every=2),
                   out_dir=str(tmp_path), progress=False)
    assert DIVERGENCE["patience"] == 20 and est.calls == 25
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["iteration"] == 4  # none written while past the bound


def test_a_shorter_stretch_past_the_bound_is_not_divergence():
    bench, algo, sample = setup()
    est = BlowsUpAt(build_estimator("first-order", {"loop": True}), at=6, factor=1e6,
                    length=DIVERGENCE["patience"] - 1)
    assert meta_train(algo, est, sample, TrainConfig(iterations=40, meta_batch=2), progress=False).iteration == 40


def test_checkpoint_rebuilds_the_algorithm(tmp_path):
    bench, algo, sample = setup("metasgd")
    state = meta_train(algo, build_estimator("second-order", {"loop": True}), sample, TrainConfig(iterations=2, meta_batch=2),
                       out_dir=str(tmp_path), progress=False)
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    rebuilt = build_algorithm(ck["algorithm"])
    sampler = bench.episodes("test", 1, 5, 20)
    a = evaluate(algo, state.phi, sampler, 10, seed=3)
    b = evaluate(rebuilt, ck["phi"], sampler, 10, seed=3)
    assert a["per_step"] == b["per_step"]


def test_batched_evaluation_equals_one_task_at_a_time():
    bench, algo, _ = setup()
    phi = algo.init_meta_params()
    sampler = bench.episodes("test", 1, 5, 20)
    batched = evaluate(algo, phi, sampler, 12, seed=0, chunk=5)
    algo.batched_eval = False
    single = evaluate(algo, phi, sampler, 12, seed=0)
    for a, b in zip(batched["per_step"], single["per_step"]):
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-5)


def test_confidence_interval():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert confidence95(values) == pytest.approx(1.96 * values.std().item() / 2)


def test_pretrain_baseline_learns_the_mean_function():
    bench, algo, sample = setup("pretrain")
    phi0 = {k: v.clone() for k, v in algo.init_meta_params().items()}
    state = meta_train(algo, build_estimator("first-order", {"loop": True}), sample,
                       TrainConfig(iterations=150, meta_batch=8, meta_lr=1e-2), progress=False)
    sampler = bench.episodes("test", 1, 5, 50)
    before = evaluate(algo, phi0, sampler, 50, seed=0, steps=0)["mean"]
    after = evaluate(algo, state.phi, sampler, 50, seed=0, steps=0)["mean"]
    assert after < before
