import pytest
import torch

from metaphi.algorithms import Algorithm
from metaphi.cli import main
from metaphi.inner import Unroll
from metaphi.outer import build_estimator
from metaphi.outer.reinforce import (Reinforce, baseline_init, baseline_update, log_prob, reinforce_gradient, sample,
                                     score)
from metaphi.tasks import Task
from metaphi.train import TrainConfig, load_checkpoint, meta_train


@pytest.mark.parametrize("kind, shape", [("categorical", (3, 5)), ("bernoulli", (4,))])
def test_score_is_the_gradient_of_the_log_probability(kind, shape):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64)
    for z in sample(logits, kind, g, 5):
        x = logits.clone().requires_grad_()
        expected = torch.autograd.grad(log_prob(x, z, kind).sum(), x)[0]
        assert torch.allclose(score(logits, z, kind), expected)


def test_categorical_samples_follow_the_probabilities():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64))
    z = sample(logits, "categorical", torch.Generator().manual_seed(0), 20000)
    freq = torch.bincount(z.long(), minlength=3).double() / z.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.015)


def test_reinforce_gradient_is_unbiased_for_the_expected_loss():
    logits = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=torch.float64)
    arm_loss = torch.tensor([1.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    x = logits.clone().requires_grad_()
    exact = torch.autograd.grad((torch.softmax(x, -1) * arm_loss).sum(), x)[0]
    z = sample(logits, "categorical", torch.Generator().manual_seed(1), 40000)
    for baseline in (0.0, 1.7):  # any baseline leaves the expectation unchanged
        est = reinforce_gradient(logits, z, arm_loss[z.long()], baseline, "categorical")
        assert torch.allclose(est, exact, atol=0.02)


def test_moving_average_baseline_starts_at_the_first_mean():
    b = baseline_update(baseline_init(), torch.tensor([2.0, 4.0]), 0.9)
    assert b == {"value": 3.0, "count": 1}
    assert baseline_update(b, torch.tensor([13.0]), 0.9)["value"] == pytest.approx(0.9 * 3 + 0.1 * 13)


class Bandit(Algorithm):
    """φ holds logits over arms (categorical) or per-switch logits (Bernoulli) and a continuous scale;
    a task is a noisy draw of each arm's loss."""

    name = "bandit"
    estimators = ("reinforce",)

    def __init__(self, arms, kind="categorical"):
        self.arms, self.discrete = arms, {"choice": kind}

    def init_meta_params(self):
        return {"choice": torch.zeros(self.arms, requires_grad=True), "scale": torch.tensor(0.0, requires_grad=True)}

    def task_loss(self, phi, task, unroll=Unroll()):
        costs = task.support[0]
        # the continuous part is pulled toward 2 by an ordinary differentiable term
        loss = (phi["choice"] * costs).sum() + (phi["scale"] - 2.0) ** 2
        return loss, {"cost": (phi["choice"] * costs).sum().detach()}

    def spec(self):
        return {"class": "bandit", "arms": self.arms}


MEANS = torch.tensor([1.0, 0.6, 0.9, 0.2, 0.8])


def bandit_tasks(means, noise=0.5):
    return lambda n, g: Task((means + noise * torch.randn(n, len(means), generator=g),), (torch.zeros(n, 1),))


def test_reinforce_finds_the_best_arm_of_a_small_categorical_problem():
    est = Reinforce(samples=4, decay=0.9)
    state = meta_train(Bandit(5), est, bandit_tasks(MEANS), TrainConfig(iterations=200, meta_batch=4, meta_lr=0.1),
                       progress=False)
    probs = torch.softmax(state.phi["choice"].detach(), -1)
    assert int(probs.argmax()) == 3 and probs[3] > 0.8
    assert float(state.phi["scale"].detach()) == pytest.approx(2.0, abs=0.1)  # the pathwise part, alongside
    assert state.history[-1]["baseline"] < 0.6


def test_reinforce_switches_bernoulli_choices_on_and_off():
    costs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    est = Reinforce(samples=4, pathwise=False)
    state = meta_train(Bandit(4, "bernoulli"), est, bandit_tasks(costs, 0.2),
                       TrainConfig(iterations=150, meta_batch=2, meta_lr=0.1), progress=False)
    on = torch.sigmoid(state.phi["choice"].detach())
    assert torch.all(on[[1, 3]] > 0.9) and torch.all(on[[0, 2]] < 0.1)
    assert float(state.phi["scale"].detach()) == 0.0  # pathwise=False: the continuous part does not move


def test_reinforce_run_is_reproducible_and_resumes_with_its_baseline(tmp_path):
    cfg = lambda n: TrainConfig(iterations=n, meta_batch=2, meta_lr=0.1, checkpoint_every=3)
    est = build_estimator("reinforce", {"samples": 3})
    a = meta_train(Bandit(5), est, bandit_tasks(MEANS), cfg(6), progress=False)
    b = meta_train(Bandit(5), est, bandit_tasks(MEANS), cfg(6), progress=False)
    meta_train(Bandit(5), est, bandit_tasks(MEANS), cfg(3), out_dir=str(tmp_path), progress=False)
    r = meta_train(Bandit(5), build_estimator("reinforce", {"samples": 3}), bandit_tasks(MEANS), cfg(6),
                   out_dir=str(tmp_path), resume=True, progress=False)
    for k in a.phi:
        assert torch.equal(a.phi[k], b.phi[k]) and torch.equal(a.phi[k], r.phi[k]), k
    assert [h["loss"] for h in a.history] == [h["loss"] for h in r.history]
    saved = load_checkpoint(str(tmp_path / "checkpoint.pt"))["estimator"]
    assert saved["step"] == 6 and saved["baseline"]["count"] == 6


def test_reinforce_needs_declared_discrete_parameters():
    class Plain(Bandit):
        discrete = {}

    with pytest.raises(ValueError, match="declares no discrete meta-parameters"):
        Reinforce()(Plain.__new__(Plain), {"w": torch.zeros(2)}, bandit_tasks(MEANS)(1, torch.Generator()))


def test_cli_refuses_reinforce_where_phi_has_no_choices(tmp_path, capsys):
    assert main(["run", "maml", "--benchmark", "sinusoid", "--estimator", "reinforce", "--out", str(tmp_path)]) == 2
    assert "does not apply to maml" in capsys.readouterr().err
