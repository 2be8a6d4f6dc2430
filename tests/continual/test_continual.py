"""Continual learning: streams, metrics, EWC's Fisher and penalty, reservoir memory, La-MAML's and
OML's meta-gradients, each against an independent computation."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaphi.continual import build_method, metrics
from metaphi.tasks import streams as st
from metaphi.tasks.registry import build_stream
from metaphi.continual.ewc import fisher_diagonal, penalty, proximal
from metaphi.models import PlainConvNet as ConvNet
from metaphi.continual.replay import empty_memory, reservoir_add
from metaphi.continual.runner import run_stream
from metaphi.functional import params_of
from metaphi.tasks import DataError
from metaphi.tasks.glyphs import generate_glyphs
import shared_data

OMNIGLOT = str(shared_data.OMNIGLOT)


@pytest.fixture(scope="module")
def tiny():
    return generate_glyphs(alphabets=2, characters=8, drawers=6, size=16)


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_on_a_hand_made_matrix():
    R = [[0.50, 0.10, 0.00],
         [0.80, 0.70, 0.05],
         [0.60, 0.40, 0.90]]
    assert metrics.average_accuracy(R) == pytest.approx((0.60 + 0.40 + 0.90) / 3)
    # BWT: (R[2,0] - R[0,0] + R[2,1] - R[1,1]) / 2 = (0.10 - 0.30) / 2
    assert metrics.backward_transfer(R) == pytest.approx(-0.10)
    # forgetting: experience 0 peaked at 0.80 after experience 1 (not when learned, 0.50): 0.80 - 0.60;
    # experience 1: max(0.10, 0.70) - 0.40
    assert metrics.forgetting(R) == pytest.approx((0.20 + 0.30) / 2)
    assert metrics.forgetting(R) > -metrics.backward_transfer(R)
    assert metrics.accuracy_over_time(R) == pytest.approx([0.50, 0.75, (0.60 + 0.40 + 0.90) / 3])
    # FWT: (R[0,1] - b1 + R[1,2] - b2) / 2
    assert metrics.forward_transfer(R, [0.2, 0.04, 0.01]) == pytest.approx((0.06 + 0.04) / 2)


def test_metrics_edge_cases():
    assert metrics.forgetting([[0.7]]) == 0.0 and metrics.backward_transfer([[0.7]]) == 0.0
    assert metrics.average_accuracy([[0.7]]) == pytest.approx(0.7)
    never_forgets = [[0.9, 0.0], [0.9, 0.8]]
    assert metrics.forgetting(never_forgets) == 0.0 and metrics.backward_transfer(never_forgets) == 0.0
    with pytest.raises(ValueError):
        metrics.forgetting([[0.1, 0.2, 0.3]])


# ------------------------------------------------------------------------------------------ streams
def test_class_incremental_stream_never_shows_a_class_before_its_turn(tiny):
    s = st.class_incremental(tiny, experiences=4, classes_per_experience=3, train_per_class=4, test_per_class=2,
                             seed=3)
    assert s.kind == "class-incremental" and s.num_classes == 12 and len(s) == 4
    seen: set[int] = set()
    for i, e in enumerate(s.experiences):
        labels = set(e.train_y.tolist())
        assert labels == set(e.classes) == set(range(3 * i, 3 * i + 3))
        assert set(e.test_y.tolist()) == labels
        assert not labels & seen  # nothing of this experience was shown before
        seen |= labels
        assert e.train_y.bincount(minlength=12)[e.classes].tolist() == [4] * 3
        # training and test images are different drawings
        train = {bytes(x.numpy()) for x in e.train_x}
        assert not any(bytes(x.numpy()) in train for x in e.test_x)
        # the order is shuffled within the experience, not class by class
    assert any(e.train_y.tolist() != sorted(e.train_y.tolist()) for e in s.experiences)
    # the stream's class names are the data's, in the order drawn; the same seed gives the same stream
    again = st.class_incremental(tiny, experiences=4, classes_per_experience=3, train_per_class=4, test_per_class=2,
                                 seed=3)
    assert again.class_names == s.class_names
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(s.experiences, again.experiences))
    other = st.class_incremental(tiny, experiences=4, classes_per_experience=3, train_per_class=4, test_per_class=2,
                                 seed=4)
    assert other.class_names != s.class_names


class Spy:
    """A method that learns nothing and records the labels it is shown, experience by experience."""

    name = "spy"

    def __init__(self):
        self.shown = []

    def spec(self):
        return {"name": "spy"}

    def start(self, net, params, stream, generator, **kw):
        return {"params": params}

    def learn(self, net, state, experience, generator):
        self.shown.append(set(experience.train_y.tolist()))
        return state

    def weights(self, state):
        return state["params"]


def test_runner_shows_experiences_in_turn(tiny):
    s = st.class_incremental(tiny, experiences=3, classes_per_experience=2, train_per_class=3, test_per_class=2)
    spy = Spy()
    r = run_stream(spy, s, seed=0, hidden=4, blocks=2)
    assert spy.shown == [{0, 1}, {2, 3}, {4, 5}]
    assert len(r["R"]) == 3 and all(len(row) == 3 for row in r["R"])


def test_meta_training_classes_must_be_held_out(tiny):
    with pytest.raises(DataError, match="held out"):
        st.class_incremental(tiny.subset(range(8, 16)), experiences=2, classes_per_experience=2, train_per_class=3,
                             test_per_class=2, meta_train=tiny.subset(range(10)))
    s = st.class_incremental(tiny.subset(range(8, 16)), experiences=2, classes_per_experience=2, train_per_class=3,
                             test_per_class=2, meta_train=tiny.subset(range(8)))
    assert not set(s.class_names) & set(s.meta_train.classes)


def test_glyph_streams_hold_out_their_classes_from_meta_training():
    s = build_stream("glyphs", seed=1, experiences=3)
    assert not set(s.class_names) & set(s.meta_train.classes)
    alphabets = {name.split("/")[0] for name in s.class_names}
    assert not alphabets & {name.split("/")[0] for name in s.meta_train.classes}  # whole alphabets held out
    val = build_stream("glyphs-val", seed=1, experiences=3)
    assert not {n.split("/")[0] for n in val.class_names} & alphabets


@pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "images_background_small2.zip")),
                    reason="the Omniglot minimal archives (small1, small2) are not in ../shared/data/omniglot")
def test_omniglot_stream_is_small2_alphabets_small1_lacks():
    s = build_stream("omniglot", seed=0, experiences=4, data_root=OMNIGLOT)
    meta_alphabets = {n.split("/")[0] for n in s.meta_train.classes}
    assert len(meta_alphabets) == 5 and s.num_classes == 20
    assert not {n.split("/")[0] for n in s.class_names} & meta_alphabets


def test_rotated_and_permuted_streams(tiny):
    from metaphi.tasks.domains import rotate

    r = st.rotated(tiny, [0, 90, 45], classes=5, train_per_class=3, test_per_class=2, seed=0)
    assert r.kind == "domain-incremental" and r.num_classes == 5
    assert all(e.classes == list(range(5)) for e in r.experiences)
    assert torch.equal(r.experiences[1].test_x, torch.rot90(r.experiences[0].test_x, 1, (2, 3)))
    assert torch.equal(r.experiences[2].test_x, rotate(r.experiences[0].test_x, 45))
    p = st.permuted(tiny, 3, classes=5, train_per_class=3, test_per_class=2, seed=0)
    x0, x1 = p.experiences[0].test_x, p.experiences[1].test_x
    assert not torch.equal(x0, x1)
    # the same pixels, rearranged by one fixed permutation for every image
    assert torch.equal(x0.flatten(1).sort(1).values, x1.flatten(1).sort(1).values)
    perm = [int((x0.flatten(1)[0] == v).nonzero()[0]) if (x0.flatten(1)[0] == v).sum() == 1 else None
            for v in x1.flatten(1)[0]]
    fixed = [(j, i) for j, i in enumerate(perm) if i is not None]
    assert all(torch.equal(x1.flatten(1)[:, j], x0.flatten(1)[:, i]) for j, i in fixed[:20])


def test_folder_sequence(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)

    def write(exp, cls, n):
        for k in range(n):
            (tmp_path / exp / cls).mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(12, 12, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, "L").save(tmp_path / exp / cls / f"{k}.png")

    for exp, classes in (("01-first", ("cat", "dog")), ("02-second", ("emu", "fox", "gnu"))):
        for c in classes:
            write(exp, c, 5)
    s = st.folder_sequence(tmp_path, test_per_class=2, image_size=12, cache_dir=False)
    assert s.kind == "class-incremental" and s.class_names == ["cat", "dog", "emu", "fox", "gnu"]
    assert [e.classes for e in s.experiences] == [[0, 1], [2, 3, 4]]
    assert [len(e.train_y) for e in s.experiences] == [6, 9] and [len(e.test_y) for e in s.experiences] == [4, 6]
    write("03-third", "cat", 4)  # a class recurs: domain-incremental, same label
    s = st.folder_sequence(tmp_path, test_per_class=2, image_size=12, cache_dir=False)
    assert s.kind == "domain-incremental" and s.experiences[2].classes == [0]
    with pytest.raises(DataError, match="images but"):
        st.folder_sequence(tmp_path, test_per_class=4, image_size=12, cache_dir=False)


# ------------------------------------------------------------------------------------------ EWC
def test_ewc_fisher_matches_hand_computation_on_a_linear_softmax():
    torch.manual_seed(0)
    net = nn.Linear(4, 3).double()
    params = params_of(net, requires_grad=False)
    x = torch.randn(5, 4, dtype=torch.float64)
    fisher = fisher_diagonal(net, params, x, chunk=2)
    W, b = params["weight"], params["bias"]
    hand_W, hand_b = torch.zeros_like(W), torch.zeros_like(b)
    for xn in x:
        p = torch.softmax(W @ xn + b, 0)
        for c in range(3):
            e = F.one_hot(torch.tensor(c), 3).double()
            # ∂ log p_c / ∂W = (e_c − p) xᵀ, ∂ log p_c / ∂b = e_c − p
            hand_W += p[c] * torch.outer(e - p, xn).square()
            hand_b += p[c] * (e - p).square()
    torch.testing.assert_close(fisher["weight"], hand_W / 5)
    torch.testing.assert_close(fisher["bias"], hand_b / 5)


def test_ewc_fisher_matches_an_autograd_loop_on_a_convnet():
    torch.manual_seed(1)
    net = ConvNet(1, 4, hidden=3, blocks=2, image_size=8).double()
    params = params_of(net, requires_grad=False)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    fisher = fisher_diagonal(net, params, x)
    ref = {k: torch.zeros_like(v) for k, v in params.items()}
    for xn in x:
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        logp = F.log_softmax(torch.func.functional_call(net, p, (xn[None],))[0], 0)
        for c in range(4):
            grads = torch.autograd.grad(logp[c], list(p.values()), retain_graph=True)
            for k, gk in zip(p, grads):
                ref[k] += logp[c].exp().detach() * gk.square() / len(x)
    for k in params:
        torch.testing.assert_close(fisher[k], ref[k])


def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic_around_it():
    g = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g, dtype=torch.float64)}
    fisher = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in anchor.items()}
    at = {k: v.clone().requires_grad_() for k, v in anchor.items()}
    value = penalty(at, [anchor], [fisher], lam=7.0)
    assert float(value.detach()) == 0.0
    assert all(float(gk.abs().max()) == 0.0 for gk in torch.autograd.grad(value, list(at.values())))
    moved = {k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in anchor.items()}
    anchor2 = {k: v + 1.0 for k, v in anchor.items()}
    fisher2 = {k: 2 * v for k, v in fisher.items()}
    hand = sum(0.5 * 7.0 * (f[k] * (moved[k] - a[k]) ** 2).sum() for a, f in ((anchor, fisher), (anchor2, fisher2))
               for k in f)
    torch.testing.assert_close(penalty(moved, [anchor, anchor2], [fisher, fisher2], lam=7.0), hand)
    assert float(penalty(moved, [], [], lam=7.0)) == 0.0


def test_ewc_keeps_important_weights_closer_than_finetuning(tiny):
    s = st.class_incremental(tiny, experiences=2, classes_per_experience=3, train_per_class=4, test_per_class=2)
    net = ConvNet(1, s.num_classes, hidden=4, blocks=2, image_size=16)
    start = params_of(net, requires_grad=False)
    kw = dict(lr=0.5, batch=4, epochs=3)
    finals = {}
    for name, method in (("finetune", build_method("finetune", **kw)), ("ewc", build_method("ewc", lam=100.0, **kw))):
        state = method.start(net, dict(start), s, torch.Generator().manual_seed(0))
        state = method.learn(net, state, s.experiences[0], torch.Generator().manual_seed(0))
        if name == "ewc":
            anchor, fisher = state["anchors"][0], state["fishers"][0]
            assert all(torch.equal(anchor[k], state["params"][k]) for k in anchor)
        first = state["params"]
        finals[name] = method.learn(net, state, s.experiences[1], torch.Generator().manual_seed(0))["params"]
    # the first experience is learned identically (no penalty yet) ...
    assert all(torch.equal(first[k], anchor[k]) for k in anchor)
    # ... and on the second EWC stays nearer the first's weights, in the Fisher's metric
    drift = {m: float(penalty(p, [anchor], [fisher], lam=1.0)) for m, p in finals.items()}
    assert drift["ewc"] < 0.5 * drift["finetune"]


def test_ewc_proximal_step_minimises_the_penalised_proximity():
    g = torch.Generator().manual_seed(2)
    shape = {"w": (4, 3), "b": (4,)}
    anchors = [{k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shape.items()} for _ in range(2)]
    fishers = [{k: torch.rand(s, generator=g, dtype=torch.float64) * 2 for k, s in shape.items()} for _ in range(2)]
    start = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shape.items()}
    lam, lr = 50.0, 0.1  # lr·λ·F up to 20: a gradient step would overshoot
    out = proximal(start, anchors, fishers, lam, lr)
    theta = {k: v.clone().requires_grad_() for k, v in out.items()}
    objective = sum(((theta[k] - start[k]) ** 2).sum() for k in shape) / (2 * lr) + penalty(theta, anchors, fishers, lam)
    for gk in torch.autograd.grad(objective, list(theta.values())):
        assert float(gk.abs().max()) < 1e-9  # the stationary point of a convex quadratic: its minimum


# ------------------------------------------------------------------------------------------ replay
def test_reservoir_keeps_a_uniform_sample_of_fixed_size():
    counts = torch.zeros(20)
    x = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)
    y = torch.arange(20)
    trials = 400
    for t in range(trials):
        g = torch.Generator().manual_seed(t)
        memory = empty_memory((1, 1, 1), 5)
        for s in range(0, 20, 3):  # offered in uneven batches
            memory = reservoir_add(memory, x[s:s + 3], y[s:s + 3], g)
            assert len(memory["y"]) == min(5, s + len(y[s:s + 3]))
        assert memory["seen"] == 20 and len(set(memory["y"].tolist())) == 5
        assert torch.equal(memory["x"].flatten().long(), memory["y"])
        counts[memory["y"]] += 1
    freq = counts / trials  # each example is kept with probability 5/20
    assert float((freq - 0.25).abs().max()) < 4 * math.sqrt(0.25 * 0.75 / trials)


# ------------------------------------------------------------------------------------------ La-MAML
@pytest.mark.parametrize("inner_clip", ["norm", "value"])
@pytest.mark.parametrize("clip", [100.0, 0.05])  # clipping inactive, and active everywhere
def test_lamaml_update_matches_an_autograd_loop(clip, inner_clip):
    torch.manual_seed(0)
    net = ConvNet(1, 3, hidden=2, blocks=2, image_size=8).double()
    params = params_of(net, requires_grad=False)
    method = build_method("lamaml", alpha=0.2, alpha_lr=0.5, batch=3, clip=clip, inner_clip=inner_clip)
    g = torch.Generator().manual_seed(0)
    alpha = {k: 0.2 + 0.1 * torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    alpha["head.bias"][0] = -0.05  # a negative rate is clipped to 0
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    rx, ry = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([2, 0])
    new_params, new_alpha, _ = method.step(net, params, alpha, x, y, rx, ry)

    theta = {k: v.clone().requires_grad_() for k, v in params.items()}
    lr = {k: v.clone().requires_grad_() for k, v in alpha.items()}
    fast, meta = theta, 0.0
    for j in range(3):
        out = torch.func.functional_call(net, fast, (x[j:j + 1],))
        grads = torch.autograd.grad(F.cross_entropy(out, y[j:j + 1]), list(fast.values()), create_graph=True)
        if inner_clip == "value":
            grads = [torch.clamp(gk, -clip, clip) for gk in grads]
        else:
            norm = torch.sqrt(sum(gk.square().sum() for gk in grads))
            grads = [gk * torch.clamp(clip / (norm + 1e-6), max=1.0) for gk in grads]
        fast = {k: fast[k] - torch.relu(lr[k]) * gk for k, gk in zip(fast, grads)}
        meta = meta + F.cross_entropy(torch.func.functional_call(net, fast, (torch.cat([x, rx]),)),
                                      torch.cat([y, ry])) / 3
    keys = list(theta)
    grads = torch.autograd.grad(meta, [theta[k] for k in keys] + [lr[k] for k in keys])
    g_theta, g_alpha = grads[:len(keys)], grads[len(keys):]
    scale_theta = min(1.0, clip / float(torch.sqrt(sum(t.square().sum() for t in g_theta))))
    scale_alpha = min(1.0, clip / float(torch.sqrt(sum(t.square().sum() for t in g_alpha))))
    assert (scale_theta < 1.0) == (clip < 1)
    for i, k in enumerate(keys):
        ref_alpha = alpha[k] - 0.5 * scale_alpha * g_alpha[i]
        torch.testing.assert_close(new_alpha[k], ref_alpha, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(new_params[k], params[k] - ref_alpha.clamp_min(0) * scale_theta * g_theta[i],
                                   rtol=1e-5, atol=1e-7)
    assert float(new_params["head.bias"][0]) == float(params["head.bias"][0])  # its rate stayed below 0


# ------------------------------------------------------------------------------------------ OML
def test_oml_meta_gradient_matches_an_autograd_loop():
    from metaphi.algorithms.oml import OMLObjective
    from metaphi.functional import prefixed
    from metaphi.outer import build_estimator
    from metaphi.tasks import Task

    torch.manual_seed(0)
    net = ConvNet(1, 5, hidden=2, blocks=2, image_size=8).double()
    objective = OMLObjective(net, inner_lr=0.7, seed=0)
    phi = {k: v.double().requires_grad_() for k, v in objective.init_meta_params().items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([1, 1, 3, 3])
    xq, yq = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([1, 3, 0, 2, 4, 1])
    task = Task((x, y), (xq, yq))
    grads, _ = build_estimator("second-order", {"loop": True})(objective, phi, Task.stack([task]))

    p = {k: v.detach().clone().requires_grad_() for k, v in prefixed(phi, "init").items()}
    keep = torch.ones(5, dtype=torch.float64)
    keep[[1, 3]] = 0  # the trajectory's classes start from zero rows
    head = {"head.weight": p["head.weight"] * keep[:, None], "head.bias": p["head.bias"] * keep}
    body = {k: v for k, v in p.items() if k.startswith("body.")}
    for j in range(4):
        out = torch.func.functional_call(net, {**body, **head}, (x[j:j + 1],))
        gj = torch.autograd.grad(F.cross_entropy(out, y[j:j + 1]), list(head.values()), create_graph=True)
        head = {k: head[k] - 0.7 * gk for k, gk in zip(head, gj)}
    meta = F.cross_entropy(torch.func.functional_call(net, {**body, **head}, (xq,)), yq)
    ref = torch.autograd.grad(meta, list(p.values()))
    for k, r in zip(p, ref):
        torch.testing.assert_close(grads["init." + k], r)
    assert float(grads["init.head.weight"][[1, 3]].abs().max()) == 0.0  # reset rows get no gradient
    assert float(grads["init.body.0.weight"].abs().max()) > 0  # the representation does


def test_oml_learns_only_the_head_online(tiny):
    s = st.class_incremental(tiny.subset(range(8, 16)), experiences=2, classes_per_experience=2, train_per_class=3,
                             test_per_class=2, meta_train=tiny.subset(range(8)))
    oml = build_method("oml", meta_iterations=2, meta_batch=1, traj_classes=2, traj_shots=2, remember=3)
    net = ConvNet(1, s.num_classes, hidden=3, blocks=2, image_size=16)
    state = oml.start(net, params_of(net, requires_grad=False), s, torch.Generator().manual_seed(0), seed=0)
    assert float(state["params"]["head.weight"].abs().max()) == 0.0  # a fresh head for the stream's classes
    after = oml.learn(net, state, s.experiences[0], torch.Generator())
    for k, v in state["params"].items():
        assert torch.equal(after["params"][k], v) == k.startswith("body.")
