"""Prototypical Networks: prototypes and distances against hand-computed values, the class-slot
masking against an unpadded float64 computation, vmap against a loop, a toy problem solved, and
checkpoints that rebuild and predict."""
import json

import pytest
import torch

from metaphi.algorithms.protonet import ProtoNet, cosine_similarities, masked, prototypes, squared_distances
from metaphi.evaluate import evaluate
from metaphi.models import MLP, Conv4
from metaphi.outer import build_estimator
from metaphi.tasks import Task
from metaphi.train import TrainConfig, meta_train
from tiny import assert_first_order_vmap_equals_loop, trained_and_rebuilt, install_tiny, random_task


pytestmark = pytest.mark.usefixtures("one_thread")


def test_prototypes_and_distances_by_hand():
    zs = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 3.0]], dtype=torch.float64)
    ys = torch.tensor([0, 0, 1, 1])
    protos, present = prototypes(zs, ys)
    assert torch.equal(protos[:2], torch.tensor([[1.0, 0.0], [0.5, 2.5]], dtype=torch.float64))
    assert present.tolist() == [True, True, False, False]
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    d = squared_distances(query, protos[:2])
    # (0² + 1², 0.5² + 1.5²) and (1² + 3², 0.5² + 0.5²)
    assert torch.equal(d, torch.tensor([[1.0, 2.5], [10.0, 0.5]], dtype=torch.float64))
    cos = cosine_similarities(query, protos[:2])
    expected = torch.tensor([[1 / 2 ** 0.5, 3 / (2 ** 0.5 * 6.5 ** 0.5)], [0.0, 7.5 / (3 * 6.5 ** 0.5)]],
                            dtype=torch.float64)
    assert torch.allclose(cos, expected, atol=1e-12)


def float64_protonet():
    torch.manual_seed(0)
    return ProtoNet(Conv4(1, 3, hidden=6, image_size=10).double())


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_scores_equal_an_unpadded_loop_over_classes(distance):
    algo = float64_protonet()
    algo.distance = distance
    phi = {**algo.init_meta_params(), "scale": torch.tensor(3.0, dtype=torch.float64)}
    task = random_task()
    scores, present = algo.scores(phi, task.support, task.query[0])
    assert scores.shape == (6, 6) and present.tolist() == [True] * 3 + [False] * 3
    z = algo.embed(phi, torch.cat([task.support[0], task.query[0]]))
    zs, zq = z[:6], z[6:]
    for k in range(3):
        c = zs[task.support[1] == k].mean(0)
        for q in range(6):
            if distance == "euclidean":
                want = -((zq[q] - c) ** 2).sum()
            else:
                want = 3.0 * torch.dot(zq[q], c) / (zq[q].norm() * c.norm())
            assert torch.allclose(scores[q, k], want, atol=1e-12)
    assert torch.isinf(masked(scores, present)[:, 3:]).all()
    # the loss is the cross-entropy over the real classes only
    logits = scores[:, :3]
    want = torch.nn.functional.cross_entropy(logits, task.query[1])
    loss, _ = algo.task_loss(phi, task)
    assert torch.allclose(loss, want, atol=1e-12)


def test_vmap_equals_loop_for_gradients_and_evaluation():
    algo = float64_protonet()
    phi = algo.init_meta_params()
    tasks = Task.stack([random_task(seed=s) for s in range(3)])
    _, batched = assert_first_order_vmap_equals_loop(algo, phi, tasks)
    assert batched.shape == (3, 1)


class Clusters:
    """Linearly separable toy tasks: each class a tight cluster in two dimensions, hidden among six
    dimensions of loud noise that a fixed embedding cannot tell from signal."""

    def __init__(self, ways=3, shots=2, query=4):
        self.ways, self.shots, self.query = ways, shots, query

    def sample(self, g):
        angle = torch.rand(1, generator=g) * 6.283 + torch.arange(self.ways) * 6.283 / self.ways
        centres = 2.0 * torch.stack([angle.cos(), angle.sin()], -1)

        def draw(n):
            y = torch.arange(self.ways).repeat_interleave(n)
            signal = centres[y] + 0.2 * torch.randn(len(y), 2, generator=g)
            return torch.cat([signal, 4.0 * torch.randn(len(y), 6, generator=g)], -1), y

        return Task(draw(self.shots), draw(self.query))

    def sample_batch(self, n, g):
        return Task.stack([self.sample(g) for _ in range(n)])


def test_protonet_learns_a_linearly_separable_toy_problem_to_100_percent():
    torch.manual_seed(0)
    algo = ProtoNet(MLP(8, 3, (16,)))
    sampler = Clusters()
    before = evaluate(algo, algo.init_meta_params(), sampler, 100, seed=7)["mean"]
    state = meta_train(algo, build_estimator("first-order"), sampler.sample_batch,
                       TrainConfig(iterations=150, meta_batch=8, meta_lr=1e-2), progress=False)
    after = evaluate(algo, state.phi, sampler, 100, seed=7)
    assert before < 0.9
    assert after["mean"] == 1.0 and len(after["per_step"]) == 1


@pytest.mark.parametrize("name", ["protonet", "protonet-cosine"])
def test_checkpoint_rebuilds_and_predicts(tmp_path, name):
    algo, state, _, _, task, logits = trained_and_rebuilt(name, tmp_path)
    assert torch.allclose(logits, algo.predict(state.phi, task.support, task.query[0], 0))


def test_cli_trains_with_more_ways_than_it_tests_and_eval_reproduces(tmp_path, monkeypatch, capsys):
    from metaphi.cli import main

    install_tiny(monkeypatch)
    out = tmp_path / "run"
    assert main(["run", "protonet", "--benchmark", "tiny", "--train-ways", "4", "--no-baselines", "--quiet",
                 "--val-tasks", "2", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["train_ways"] == 4 and result["ways"] == 3 and len(result["per_step"]) == 1
    assert main(["eval", str(out / "checkpoint.pt"), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["mean"] == pytest.approx(result["mean"])
    capsys.readouterr()
    assert main(["run", "maml", "--benchmark", "tiny", "--train-ways", "4", "--no-baselines", "--quiet",
                 "--out", str(tmp_path / "m")]) == 2
    assert "--train-ways: maml learns tasks of one size" in capsys.readouterr().err
