"""The outer step size's schedule (cosine decay after a linear warm-up, resumed exactly) and the
best-validation checkpoint (best.pt written on each improvement, in the direction the problem says)."""
import json
import math

import pytest
import torch

import metaphi.train as train
from metaphi.algorithms import create_algorithm
from metaphi.outer import build_estimator
from metaphi.tasks.registry import build_benchmark
from metaphi.train import BEST, LAST, TrainConfig, check_schedule, choose_checkpoint, load_checkpoint, lr_factor, \
    meta_train


class Line:
    """φ = w in R^3; its 'tasks' are numbers drawn from the run's generator (so a resume must restore it)."""

    name = "line"

    def init_meta_params(self):
        return {"w": torch.zeros(3, dtype=torch.float64)}

    def spec(self):
        return {"name": "line"}


def draw(n, generator):
    return torch.rand(n, generator=generator, dtype=torch.float64)


def constant_gradient(algorithm, phi, tasks):
    """dL/dw = 1 everywhere: plain SGD then moves w by exactly minus the sum of the step sizes."""
    return {k: torch.ones_like(v) for k, v in phi.items()}, {"loss": 0.0}


def pull(algorithm, phi, tasks):
    """The gradient of ½‖w − mean(tasks)‖²: depends on the drawn tasks and on φ."""
    w = phi["w"].detach()
    return {"w": w - tasks.mean()}, {"loss": float(((w - tasks.mean()) ** 2).sum())}


def cosine_reference(t, lr, total, warmup, floor):
    """The step size of 0-based step t, written out from the schedule's definition."""
    if t < warmup:
        return lr * (t + 1) / warmup
    p = (t - warmup) / (total - 1 - warmup)
    return lr * (floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2)


def test_cosine_schedule_steps_follow_the_formula(tmp_path):
    config = TrainConfig(iterations=10, meta_batch=2, meta_lr=0.1, optimizer="sgd", lr_schedule="cosine", warmup=2,
                         lr_min_factor=0.1)
    state = meta_train(Line(), constant_gradient, draw, config, out_dir=str(tmp_path), progress=False)
    logged = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl")]
    expected = [cosine_reference(t, 0.1, 10, 2, 0.1) for t in range(10)]
    assert logged == pytest.approx(expected, rel=1e-12)
    # landmarks: half way through the warm-up, the peak right after it, the floor at the last iteration
    assert logged[0] == pytest.approx(0.05) and logged[2] == pytest.approx(0.1) and logged[9] == pytest.approx(0.01)
    assert logged[2] > logged[5] > logged[8] > logged[9]
    # the optimizer took those steps: w moved by minus their sum, not by 10 × meta_lr
    assert state.phi["w"].detach() == pytest.approx(torch.full((3,), -sum(expected), dtype=torch.float64), rel=1e-12)


def test_constant_schedule_with_warm_up_and_the_factor_function():
    factor = lr_factor(TrainConfig(iterations=8, warmup=4))
    assert [factor(t) for t in range(8)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]
    cosine = lr_factor(TrainConfig(iterations=5, lr_schedule="cosine"))
    assert [cosine(t) for t in range(5)] == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                                           (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])


def test_no_schedule_is_the_plain_optimizer(tmp_path):
    state = meta_train(Line(), constant_gradient, draw, TrainConfig(iterations=3, meta_lr=0.1, optimizer="sgd"),
                       out_dir=str(tmp_path), progress=False)
    assert state.scheduler is None and load_checkpoint(str(tmp_path / LAST))["scheduler"] is None
    assert "lr" not in json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert state.phi["w"].detach() == pytest.approx(torch.full((3,), -0.3, dtype=torch.float64))


@pytest.mark.parametrize("changes, message", [
    ({"lr_schedule": "linear"}, "unknown --lr-schedule 'linear'"),
    ({"lr_min_factor": 0.5}, "--lr-min-factor applies to --lr-schedule cosine only"),
    ({"lr_schedule": "cosine", "lr_min_factor": 1.5}, "--lr-min-factor must be in [0, 1]"),
    ({"warmup": 10}, "--warmup 10 leaves none of the 10 iterations"),
    ({"warmup": -1}, "--warmup must be >= 0"),
])
def test_schedules_that_cannot_run_are_refused(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_schedule(TrainConfig(iterations=10, **changes))


def test_resume_continues_the_schedule_exactly(tmp_path):
    """A real algorithm and estimator (MAML, second order, Adam): killed after 3 of 7 iterations and
    resumed, the run ends with the same φ, bit for bit, as one that ran straight through."""
    bench = build_benchmark("sinusoid")
    torch.manual_seed(0)
    algo = create_algorithm("maml", bench, 1, 0.01, 1, 2)
    sample = algo.training_tasks(bench, 1, 5, 5)
    est = build_estimator("second-order")
    settings = dict(meta_batch=4, checkpoint_every=3, meta_lr=0.01, lr_schedule="cosine", warmup=2, lr_min_factor=0.05)
    straight = meta_train(algo, est, sample, TrainConfig(iterations=7, **settings), out_dir=str(tmp_path / "a"),
                          progress=False)
    # the kill: a run that stopped at its checkpoint at iteration 3 (its schedule still meant for 7)
    with pytest.raises(KeyboardInterrupt):
        meta_train(algo, est, sample, TrainConfig(iterations=7, val_every=1, **settings), out_dir=str(tmp_path / "b"),
                   validate=Interrupt(at=4), progress=False)
    assert load_checkpoint(str(tmp_path / "b" / LAST))["iteration"] == 3
    resumed = meta_train(algo, est, sample, TrainConfig(iterations=7, **settings), out_dir=str(tmp_path / "b"),
                         resume=True, progress=False)
    for k in straight.phi:
        assert torch.equal(straight.phi[k], resumed.phi[k]), k
    log = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["lr"] for r in log] == [r["lr"] for r in straight.history]
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 7
    # a checkpoint written with one schedule is not continued with another
    with pytest.raises(ValueError, match=r"written with --warmup 2 \(this run: 1\)"):
        meta_train(algo, est, sample, TrainConfig(iterations=8, **{**settings, "warmup": 1}),
                   out_dir=str(tmp_path / "b"), resume=True, progress=False)
    with pytest.raises(ValueError, match=r"written with --lr-schedule cosine \(this run: constant\)"):
        meta_train(algo, est, sample, TrainConfig(iterations=8, **{**settings, "lr_schedule": "constant",
                                                                   "lr_min_factor": 0.0}),
                   out_dir=str(tmp_path / "b"), resume=True, progress=False)


class Interrupt:
    """A validation that stops the run (as a kill would) when it is called at iteration ``at``."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, phi):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return 0.0


class Scripted:
    """A validation returning the scores given, one per call, and keeping the φ it was shown."""

    def __init__(self, scores):
        self.scores, self.seen = list(scores), []

    def __call__(self, phi):
        self.seen.append({k: v.detach().clone() for k, v in phi.items()})
        return self.scores[len(self.seen) - 1]


def best_writes(monkeypatch):
    """The iterations at which best.pt was written, recorded from the one checkpoint writer."""
    writes = []
    save = train.save_checkpoint

    def recording(path, algorithm, state, config, run):
        if path.endswith(BEST):
            writes.append(state.iteration)
        return save(path, algorithm, state, config, run)

    monkeypatch.setattr(train, "save_checkpoint", recording)
    return writes


@pytest.mark.parametrize("higher, scores, improved", [
    (True, [0.5, 0.7, 0.6, float("nan"), 0.9, 0.9, 0.1], [1, 2, 5]),
    (False, [0.5, 0.7, 0.3, float("nan"), 0.3, 0.2, 0.4], [1, 3, 6]),
])
def test_best_checkpoint_is_written_only_on_improvement(tmp_path, monkeypatch, higher, scores, improved):
    writes = best_writes(monkeypatch)
    validate = Scripted(scores)
    config = TrainConfig(iterations=7, meta_batch=2, meta_lr=0.1, val_every=1)
    state = meta_train(Line(), pull, draw, config, out_dir=str(tmp_path), validate=validate, progress=False,
                       higher_is_better=higher)
    assert writes == improved
    best = load_checkpoint(str(tmp_path / BEST))
    at = improved[-1]
    assert best["iteration"] == at and best["best"] == {"iteration": at, "val": scores[at - 1]}
    assert torch.equal(best["phi"]["w"], validate.seen[at - 1]["w"])  # the φ that scored best, not the last
    assert not torch.equal(best["phi"]["w"], state.phi["w"].detach())
    assert state.best == best["best"] and load_checkpoint(str(tmp_path / LAST))["best"] == best["best"]
    assert best.keys() == load_checkpoint(str(tmp_path / LAST)).keys()  # the same format as checkpoint.pt


def test_the_direction_defaults_to_the_algorithms_problem(tmp_path, monkeypatch):
    writes = best_writes(monkeypatch)
    bench = build_benchmark("sinusoid")  # regression: a lower mse is better
    torch.manual_seed(0)
    algo = create_algorithm("fomaml", bench, 1, 0.01, 1, 1)
    meta_train(algo, build_estimator("first-order"), algo.training_tasks(bench, 1, 5, 5),
               TrainConfig(iterations=4, meta_batch=2, val_every=1), out_dir=str(tmp_path),
               validate=Scripted([3.0, 1.0, 2.0, 0.5]), progress=False)
    assert writes == [1, 2, 4]  # 1.0 and 0.5 improve on 3.0 (lower); 2.0 does not


def test_resume_keeps_the_best_so_far_and_a_fresh_run_drops_a_stale_best(tmp_path, monkeypatch):
    writes = best_writes(monkeypatch)
    scores = Scripted([0.2, 0.9, 0.4, 0.5, 0.8, 0.6])
    config = TrainConfig(iterations=6, meta_batch=2, val_every=1, checkpoint_every=3)
    meta_train(Line(), pull, draw, TrainConfig(**{**config.__dict__, "iterations": 3}), out_dir=str(tmp_path),
               validate=scores, progress=False, higher_is_better=True)
    state = meta_train(Line(), pull, draw, config, out_dir=str(tmp_path), validate=scores, resume=True,
                       progress=False, higher_is_better=True)
    assert writes == [1, 2]  # 0.5 and 0.8 after the resume do not beat the 0.9 kept from before it
    assert state.best == {"iteration": 2, "val": 0.9}
    assert load_checkpoint(str(tmp_path / BEST))["iteration"] == 2
    meta_train(Line(), pull, draw, config, out_dir=str(tmp_path), progress=False)  # no validation: no best
    assert not (tmp_path / BEST).exists()


def test_choose_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LAST).write_bytes(b"")
    folder, last, best = str(run), str(run / LAST), str(run / BEST)
    assert choose_checkpoint(folder) == last and choose_checkpoint(last) == last  # no best kept
    (run / BEST).write_bytes(b"")
    assert choose_checkpoint(folder) == best and choose_checkpoint(last) == best and choose_checkpoint(best) == best
    assert choose_checkpoint(folder, last=True) == last and choose_checkpoint(best, last=True) == last
    other = str(tmp_path / "model.pt")
    assert choose_checkpoint(other) == other
    with pytest.raises(ValueError, match="--last: .*model.pt is not a run folder"):
        choose_checkpoint(other, last=True)
    assert choose_checkpoint(str(tmp_path / "empty")) == str(tmp_path / "empty")
