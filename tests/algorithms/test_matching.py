"""Matching Networks: attention that sums to one, the class probabilities against a float64 loop,
the full-context LSTMs against torch's own LSTMs, vmap against a loop, and checkpoints."""
import pytest
import torch
from torch import nn

from metaphi.algorithms.matching import MatchingNet, MatchingOptions, lstm_cell, query_context, support_context
from metaphi.models import Conv4
from metaphi.tasks import Task
from tiny import assert_first_order_vmap_equals_loop, trained_and_rebuilt, random_task


pytestmark = pytest.mark.usefixtures("one_thread")


def float64_matching(fce: bool, scale: float = 1.0) -> MatchingNet:
    torch.manual_seed(0)
    algo = MatchingNet(Conv4(1, 3, hidden=6, image_size=10).double(),
                       options=MatchingOptions(fce=fce, fce_steps=3 if fce else None, attention_scale=scale))
    algo._fce_params = {k: v.double() for k, v in algo._fce_params.items()}
    return algo


@pytest.mark.parametrize("fce", [False, True])
def test_attention_and_class_probabilities_sum_to_one(fce):
    algo = float64_matching(fce)
    phi = algo.init_meta_params()
    task = random_task(ways=3, shots=2, query=2)
    a = algo.attention(phi, task.support, task.query[0])
    assert a.shape == (6, 6) and (a >= 0).all()
    assert torch.allclose(a.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    scores, present = algo.scores(phi, task.support, task.query[0])
    assert torch.allclose(scores[:, present].exp().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-12)


def test_probabilities_equal_a_float64_loop():
    algo = float64_matching(False, scale=2.0)
    phi = algo.init_meta_params()
    task = random_task(ways=3, shots=2, query=2)
    (xs, ys), (xq, yq) = task
    z = algo.embed(phi, torch.cat([xs, xq]))
    zs, zq = z[:6], z[6:]
    scores, _ = algo.scores(phi, task.support, xq)
    for q in range(6):
        sims = torch.stack([2.0 * torch.dot(zq[q], zs[i]) / (zq[q].norm() * zs[i].norm()) for i in range(6)])
        weights = sims.exp() / sims.exp().sum()
        for k in range(3):
            assert torch.allclose(scores[q, k].exp(), weights[ys == k].sum(), atol=1e-12)
    loss, _ = algo.task_loss(phi, task)
    want = -torch.stack([scores[q, yq[q]] for q in range(6)]).mean()
    assert torch.allclose(loss, want, atol=1e-12)


def test_full_context_lstms_equal_torch_lstms():
    torch.manual_seed(1)
    d, n = 4, 5
    z = torch.randn(n, d, dtype=torch.float64)
    bi = nn.LSTM(d, d, bidirectional=True).double()
    p = {}
    for direction, suffix in (("forward", ""), ("backward", "_reverse")):
        p[f"{direction}.weight_ih"] = getattr(bi, f"weight_ih_l0{suffix}").detach()
        p[f"{direction}.weight_hh"] = getattr(bi, f"weight_hh_l0{suffix}").detach()
        p[f"{direction}.bias"] = (getattr(bi, f"bias_ih_l0{suffix}") + getattr(bi, f"bias_hh_l0{suffix}")).detach()
    out, _ = bi(z.unsqueeze(1))
    want = z + out[:, 0, :d] + out[:, 0, d:]
    assert torch.allclose(support_context(p, z), want, atol=1e-12)

    # one attention-LSTM step from h = c = 0 reads the plain mean of g(S); a cell does the rest
    cell = nn.LSTMCell(d, d).double()
    q = torch.randn(3, d, dtype=torch.float64)
    context = torch.randn(n, d, dtype=torch.float64)
    w_hh_read = torch.randn(4 * d, d, dtype=torch.float64)
    p_f = {"weight_ih": cell.weight_ih.detach(), "weight_hh": torch.cat([cell.weight_hh.detach(), w_hh_read], 1),
           "bias": (cell.bias_ih + cell.bias_hh).detach()}
    read = context.mean(0).expand(3, d)
    h_ref, _ = cell(q, (torch.zeros(3, d, dtype=torch.float64), torch.zeros(3, d, dtype=torch.float64)))
    gates = q @ cell.weight_ih.T + read @ w_hh_read.T + cell.bias_ih + cell.bias_hh
    i, f, g, o = gates.detach().chunk(4, -1)
    want = torch.sigmoid(o) * torch.tanh(torch.sigmoid(i) * torch.tanh(g)) + q
    assert torch.allclose(query_context(p_f, q, context, 1), want, atol=1e-12)
    h, c = lstm_cell({**p_f, "weight_hh": cell.weight_hh.detach()}, q, torch.zeros(3, d, dtype=torch.float64),
                     torch.zeros(3, d, dtype=torch.float64))
    assert torch.allclose(h, h_ref.detach(), atol=1e-12)


@pytest.mark.parametrize("fce", [False, True])
def test_vmap_equals_loop(fce):
    algo = float64_matching(fce)
    phi = algo.init_meta_params()
    tasks = Task.stack([random_task(seed=s) for s in range(3)])
    g_loop, _ = assert_first_order_vmap_equals_loop(algo, phi, tasks)
    assert any(k.startswith("fce.") for k in phi) == fce
    assert all(g_loop[k].abs().sum() > 0 for k in phi if k.startswith("fce."))


@pytest.mark.parametrize("name", ["matching", "matching-fce"])
def test_checkpoint_rebuilds_and_predicts(tmp_path, name):
    _, _, rebuilt, _, _, logits = trained_and_rebuilt(name, tmp_path)
    assert rebuilt.fce == (name == "matching-fce")
    assert torch.allclose(logits.exp().sum(-1), torch.ones(9), atol=1e-5)
