"""Relation Networks: the relation module (split first convolution, masked batch norm) against a
direct float64 computation on explicit concatenated pairs, the loss by hand, vmap against a loop,
and checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from metaphi.algorithms.relation import RelationModule, RelationNet
from metaphi.models import Conv4, TaskBatchNorm
from metaphi.tasks import Task
from tiny import assert_first_order_vmap_equals_loop, trained_and_rebuilt, random_task


pytestmark = pytest.mark.usefixtures("one_thread")


def direct_relation(m: RelationModule, class_maps, query_maps):
    """Every (query, class) pair concatenated as the paper writes it, run through plain layers."""
    q, k = query_maps.shape[0], class_maps.shape[0]
    pairs = torch.cat([class_maps.unsqueeze(0).expand(q, -1, -1, -1, -1),
                       query_maps.unsqueeze(1).expand(-1, k, -1, -1, -1)], dim=2).flatten(0, 1)

    def bn(h, weight, bias):
        norm = TaskBatchNorm(h.shape[1]).double()
        norm.weight.data, norm.bias.data = weight.detach().clone(), bias.detach().clone()
        return norm(h)

    h = torch.relu(bn(F.conv2d(pairs, m.conv1.weight, m.conv1.bias, padding=1), m.bn1_weight, m.bn1_bias))
    h = torch.relu(bn(m.conv2(h), m.bn2_weight, m.bn2_bias))
    return m.fc2(torch.relu(m.fc1(h.mean(dim=(2, 3))))).view(q, k)


def test_relation_module_equals_explicit_pairs_and_ignores_empty_slots():
    torch.manual_seed(0)
    m = RelationModule(3).double()
    for p in (m.bn1_weight, m.bn1_bias, m.bn2_weight, m.bn2_bias):
        p.data.uniform_(0.5, 1.5)
    class_maps = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    query_maps = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    present = torch.tensor([True, False, True, True, False])
    out = m(class_maps, query_maps, present)
    assert out.shape == (4, 5)
    want = direct_relation(m, class_maps[present], query_maps)
    assert torch.allclose(out[:, present], want, atol=1e-10)
    # what sits in an empty slot changes nothing
    moved = class_maps.clone()
    moved[~present] = 100 * torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(m(moved, query_maps, present)[:, present], out[:, present], atol=1e-10)


def float64_relation():
    torch.manual_seed(0)
    return RelationNet(Conv4(1, 3, hidden=4, image_size=10).double())


def test_scores_sum_support_maps_per_class_and_loss_is_mse_on_real_classes():
    algo = float64_relation()
    algo.relation.double()
    phi = {k: v.double() for k, v in algo.init_meta_params().items()}
    task = random_task(ways=3, shots=2, query=2)
    (xs, ys), (xq, yq) = task
    scores, present = algo.scores(phi, task.support, xq)
    assert present.tolist() == [True] * 3 + [False] * 3
    maps = algo.embed_maps(phi, torch.cat([xs, xq]))
    class_maps = torch.stack([maps[:6][ys == k].sum(0) for k in range(3)])
    want = direct_relation(algo.relation, class_maps, maps[6:])  # φ's relation entries are the module's own
    assert torch.allclose(scores[:, :3], want, atol=1e-10)
    loss, metrics = algo.task_loss(phi, task)
    target = F.one_hot(yq, 3).double()
    assert torch.allclose(loss, ((want.sigmoid() - target) ** 2).mean(), atol=1e-12)
    assert float(metrics["accuracy"]) == pytest.approx(float((want.argmax(-1) == yq).double().mean()))


def test_vmap_equals_loop():
    algo = float64_relation()
    phi = {k: v.double().detach().requires_grad_() for k, v in algo.init_meta_params().items()}
    tasks = Task.stack([random_task(seed=s) for s in range(3)])
    assert_first_order_vmap_equals_loop(algo, phi, tasks)


def test_checkpoint_rebuilds_and_predicts(tmp_path):
    trained_and_rebuilt("relation", tmp_path)


def test_relation_needs_a_convolutional_backbone():
    from metaphi.models import MLP

    with pytest.raises(ValueError, match="convolutional backbone"):
        RelationNet(MLP(4, 2, (8,)))
