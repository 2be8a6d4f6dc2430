"""Architecture search: DARTS's architecture gradients against autograd and finite differences
(float64), genotype export and rebuild, deterministic retraining, the black-box searchers, resumption
and the command line."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from metaphi.functional import call, with_prefix
from metaphi.nas import blackbox, darts
from metaphi.nas.child import TrainSettings, retrain, split_data
from metaphi.nas.space import (OPS, DiscreteSpace, Genotype, Network, NetworkConfig, derive, edges_of, export,
                               init_params, load_exported, parameter_count)
from metaphi.outer import build_estimator
from metaphi.tasks import Task
import shared_data

TINY = NetworkConfig(in_channels=1, num_classes=3, channels=2, layers=3, nodes=2,
                     ops=("zero", "skip", "max_pool_3x3", "avg_pool_3x3", "conv_3x3"))


def _problem_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_tr = torch.rand(8, 1, 6, 6, generator=g, dtype=torch.float64)
    x_va = torch.rand(8, 1, 6, 6, generator=g, dtype=torch.float64)
    y_tr, y_va = torch.randint(3, (8,), generator=g), torch.randint(3, (8,), generator=g)
    net = Network(TINY)
    w = init_params(net, g, torch.float64)
    e, o = TINY.alpha_shape()
    alpha = {k: 0.5 * torch.randn(e, o, generator=g, dtype=torch.float64) for k in ("normal", "reduce")}
    return net, w, alpha, (x_tr, y_tr), (x_va, y_va)


def _unrolled_val_loss(net, w, alpha, train_b, val_b, xi, create_graph):
    """L_val(w − ξ ∇_w L_train(w, α), α) by plain autograd: the reference, independent of metaphi.inner."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in w.items()}
    loss = F.cross_entropy(call(net, leaves, train_b[0], alpha), train_b[1])
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)
    w_prime = {k: leaves[k] - xi * g for k, g in zip(leaves, grads)}
    return F.cross_entropy(call(net, w_prime, val_b[0], alpha), val_b[1])


def _estimate(estimator, net, w, alpha, train_b, val_b, xi):
    problem = darts.SearchProblem(net, xi)
    phi = {**with_prefix({k: v.clone().requires_grad_() for k, v in alpha.items()}, "alpha"), **with_prefix(w, "w")}
    grads, _ = estimator(problem, phi, Task.stack([Task(train_b, val_b)]))
    assert all(float(grads[k].abs().max()) == 0 for k in grads if k.startswith("w."))  # w is a constant
    return {k: grads["alpha." + k] for k in alpha}


def test_darts_second_order_gradient_matches_autograd_and_finite_differences():
    net, w, alpha, train_b, val_b = _problem_data()
    xi = 0.5
    exact = _estimate(build_estimator("second-order", {"loop": True}), net, w, alpha, train_b, val_b, xi)

    # the same gradient by plain autograd through the unrolled step
    a = {k: v.clone().requires_grad_() for k, v in alpha.items()}
    ref = torch.autograd.grad(_unrolled_val_loss(net, w, a, train_b, val_b, xi, True), list(a.values()))
    for k, r in zip(a, ref):
        torch.testing.assert_close(exact[k], r, rtol=1e-9, atol=1e-12)

    # central finite differences of the unrolled validation loss in every entry of α
    h = 1e-6
    for k in alpha:
        fd = torch.zeros_like(alpha[k])
        for idx in range(alpha[k].numel()):
            values = []
            for sign in (1, -1):
                moved = {n: v.clone() for n, v in alpha.items()}
                moved[k].view(-1)[idx] += sign * h
                values.append(_unrolled_val_loss(net, w, moved, train_b, val_b, xi, False).item())
            fd.view(-1)[idx] = (values[0] - values[1]) / (2 * h)
        torch.testing.assert_close(exact[k], fd, rtol=1e-5, atol=1e-8)

    # DARTS's finite-difference Hessian-vector product converges to it as ε -> 0 (at the paper's
    # ε = 0.01 the perturbation of this tiny net can cross a ReLU or max-pool kink, so no claim there)
    first = _estimate(build_estimator("first-order", {"loop": True}), net, w, alpha, train_b, val_b, 0.0)
    for eps, tol in ((1e-4, 1e-5), (1e-5, 1e-7)):
        approx = _estimate(darts.FiniteDifference(eps), net, w, alpha, train_b, val_b, xi)
        for k in alpha:
            gap = float((exact[k] - first[k]).norm())  # the second-order term is far from negligible here
            assert gap > 0.3 * float(exact[k].norm())
            assert float((approx[k] - exact[k]).norm()) < tol * gap


def test_darts_implicit_gradient_matches_a_dense_solve():
    """The implicit architecture gradient against the formula with the Hessian built and solved densely
    (a one-node, one-channel network of a few dozen weights, float64)."""
    config = NetworkConfig(in_channels=1, num_classes=3, channels=1, layers=1, nodes=1,
                           ops=("zero", "skip", "conv_3x3", "avg_pool_3x3"))
    g = torch.Generator().manual_seed(3)
    net = Network(config)
    w = init_params(net, g, torch.float64)
    e, o = config.alpha_shape()
    alpha = {k: 0.5 * torch.randn(e, o, generator=g, dtype=torch.float64) for k in ("normal", "reduce")}
    train_b = (torch.rand(8, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g))
    val_b = (torch.rand(8, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g))
    keys = list(w)
    shapes = [w[k].shape for k in keys]
    flat_w = torch.cat([w[k].flatten() for k in keys])

    def unflat(v):
        out, i = {}, 0
        for k, shp in zip(keys, shapes):
            n = shp.numel()
            out[k] = v[i:i + n].view(shp)
            i += n
        return out

    def train_loss(v, a_normal):
        return F.cross_entropy(call(net, unflat(v), train_b[0], {"normal": a_normal, "reduce": alpha["reduce"]}),
                               train_b[1])

    def val_loss(v, a_normal):
        return F.cross_entropy(call(net, unflat(v), val_b[0], {"normal": a_normal, "reduce": alpha["reduce"]}),
                               val_b[1])

    a = alpha["normal"]
    hess = torch.autograd.functional.hessian(lambda v: train_loss(v, a), flat_w)
    damping = float(torch.linalg.eigvalsh(hess).min().clamp(max=0).abs()) + 0.5  # positive definite
    f_w, f_a = torch.autograd.functional.jacobian(val_loss, (flat_w, a))
    v = torch.linalg.solve(hess + damping * torch.eye(flat_w.numel(), dtype=torch.float64), f_w)
    mixed = torch.autograd.functional.jacobian(
        lambda a_: torch.autograd.functional.jacobian(lambda v_: train_loss(v_, a_), flat_w, create_graph=True) @ v,
        a)
    expected = f_a - mixed

    got = _estimate(darts.Implicit(steps=200, damping=damping), net, w, alpha, train_b, val_b, 0.0)
    torch.testing.assert_close(got["normal"], expected, rtol=1e-6, atol=1e-9)
    assert float((got["normal"] - f_a).norm()) > 1e-3 * float(f_a.norm())  # the implicit term matters
    assert float(got["reduce"].abs().max()) == 0.0  # no reduction cell in a one-layer network


def test_darts_first_order_is_the_validation_gradient_at_w():
    net, w, alpha, train_b, val_b = _problem_data(1)
    first = _estimate(build_estimator("first-order", {"loop": True}), net, w, alpha, train_b, val_b, 0.0)
    a = {k: v.clone().requires_grad_() for k, v in alpha.items()}
    loss = F.cross_entropy(call(net, w, val_b[0], a), val_b[1])
    for k, r in zip(a, torch.autograd.grad(loss, list(a.values()))):
        torch.testing.assert_close(first[k], r, rtol=1e-10, atol=1e-12)


def test_derive_keeps_the_strongest_nonzero_edges():
    config = NetworkConfig(channels=2, layers=3, nodes=3)
    e, o = config.alpha_shape()
    alpha = {k: torch.zeros(e, o) for k in ("normal", "reduce")}
    ops = list(config.ops)
    edge = {pair: i for i, pair in enumerate(edges_of(3))}
    a = alpha["normal"]
    a[edge[(0, 1)], ops.index("zero")] = 9.0            # zero is never chosen ...
    a[edge[(0, 1)], ops.index("avg_pool_3x3")] = 2.0   # ... the strongest other op is
    a[edge[(0, 3)], ops.index("conv_3x3")] = 5.0
    a[edge[(2, 3)], ops.index("skip")] = 4.0
    a[edge[(1, 3)], ops.index("conv_5x5")] = 1.0        # the weakest of node 3's edges is dropped
    g = derive(alpha, config)
    assert g.normal[0] == (("avg_pool_3x3", 0),)
    assert g.normal[2] == (("conv_3x3", 0), ("skip", 2))
    assert len(g.normal[1]) == 2 and {j for _, j in g.normal[1]} == {0, 1}


def test_exported_genotype_rebuilds_the_same_network():
    config = NetworkConfig(in_channels=1, num_classes=10, channels=4, layers=3, nodes=3)
    space = DiscreteSpace(3)
    for seed in range(4):
        genotype = space.decode(space.uniform(torch.Generator().manual_seed(seed)))
        text = export(genotype, config)
        back, back_config = load_exported(text)
        assert back == genotype and back_config == config
        a, b = Network(config, genotype), Network(back_config, back)
        assert str(a) == str(b)
        assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
        assert parameter_count(a) == parameter_count(b) > 0
        assert space.decode(space.encode(genotype)) == genotype
    # the order pairs are written in does not change the architecture
    d = genotype.to_dict()
    d["normal"] = [list(reversed(node)) for node in d["normal"]]
    assert Genotype.from_dict(d) == genotype
    with pytest.raises(ValueError, match="zero"):
        Genotype.from_dict({"normal": [[["zero", 0]]], "reduce": [[["skip", 0]]]})
    with pytest.raises(ValueError, match="input from node 3"):
        Genotype.from_dict({"normal": [[["skip", 3]]], "reduce": [[["skip", 0]]]})


def test_discrete_space_covers_the_genotypes_once():
    space = DiscreteSpace(3, OPS)
    # node 1: 1 input set x 6 ops; node 2: 1 x 6^2; node 3: C(3,2)=3 x 6^2; per cell, squared for two cells
    assert space.size() == (6 * 36 * 3 * 36) ** 2
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        choice = space.uniform(g)
        assert space.encode(space.decode(choice)) == choice
        child = blackbox.mutate(space, choice, g)
        assert sum(a != b for a, b in zip(child, choice)) == 1
        space.decode(child)


@pytest.fixture(scope="module")
def digits_data():
    from metaphi.tasks.digits import load_digits
    return split_data(load_digits(), (0.3, 0.2, 0.2), seed=0)


def test_retraining_is_deterministic_by_seed(digits_data):
    config = NetworkConfig(channels=2, layers=3, nodes=2)
    genotype = DiscreteSpace(2).decode(DiscreteSpace(2).uniform(torch.Generator().manual_seed(5)))
    settings = TrainSettings(steps=4, batch=16)
    first = retrain(genotype, config, digits_data, settings, seed=3)
    second = retrain(*load_exported(export(genotype, config)), digits_data, settings, seed=3)
    other = retrain(genotype, config, digits_data, settings, seed=4)
    assert first["params"].keys() == second["params"].keys()
    assert all(torch.equal(first["params"][k], second["params"][k]) for k in first["params"])
    assert (first["val_acc"], first["test_acc"]) == (second["val_acc"], second["test_acc"])
    assert not all(torch.equal(first["params"][k], other["params"][k]) for k in first["params"])


class _Stop(Exception):
    pass


def test_darts_search_resumes_to_the_same_result(digits_data, tmp_path):
    config = NetworkConfig(channels=2, layers=3, nodes=2)
    settings = darts.DartsSettings(iterations=4, order=2, batch=16)
    whole = darts.search(config, digits_data, settings, seed=1)
    ck = str(tmp_path / "ck.pt")

    def stop_at_2(t, _row):
        if t + 1 == 2:
            raise _Stop
    with pytest.raises(_Stop):
        darts.search(config, digits_data, settings, seed=1, checkpoint=ck, checkpoint_every=1, progress=stop_at_2)
    resumed = darts.search(config, digits_data, settings, seed=1, checkpoint=ck, checkpoint_every=1)
    assert whole["genotype"] == resumed["genotype"]
    for k in whole["alpha"]:
        assert torch.equal(whole["alpha"][k], resumed["alpha"][k])
    assert [h["train_loss"] for h in whole["history"]] == [h["train_loss"] for h in resumed["history"]]
    assert any(float(v.std()) > 1e-3 for v in whole["alpha"].values())  # α moved from its near-uniform start


@pytest.mark.parametrize("method", blackbox.METHODS)
def test_blackbox_search_resumes_and_keeps_the_best(method, digits_data, tmp_path):
    config = NetworkConfig(channels=2, layers=3, nodes=2)
    child = TrainSettings(steps=2, batch=16)
    kw = dict(candidates=4, child=child, seed=2, population=2, tournament=2)
    whole = blackbox.search(method, config, digits_data, **kw)
    ck = str(tmp_path / "ck.pt")

    def stop_at_2(done, _row):
        if done == 2:
            raise _Stop
    with pytest.raises(_Stop):
        blackbox.search(method, config, digits_data, checkpoint=ck, progress=stop_at_2, **kw)
    resumed = blackbox.search(method, config, digits_data, checkpoint=ck, **kw)
    assert len(whole["history"]) == 4
    assert [h["val_acc"] for h in whole["history"]] == [h["val_acc"] for h in resumed["history"]]
    assert [h["genotype"] for h in whole["history"]] == [h["genotype"] for h in resumed["history"]]
    assert whole["val_acc"] == max(h["val_acc"] for h in whole["history"])
    assert whole["genotype"] == Genotype.from_dict(max(whole["history"], key=lambda h: h["val_acc"])["genotype"])
    if method == "reinforce":
        moved = [v for v in whole["policy"].values() if max(v) - min(v) > 1e-6]
        assert moved  # the controller learned something from unequal errors


def test_fitness_depends_on_the_architecture_and_seed_only(digits_data):
    config = NetworkConfig(channels=2, layers=3, nodes=2)
    space = DiscreteSpace(2)
    fit = blackbox.ChildFitness(space, config, TrainSettings(steps=2, batch=16), seed=0)
    choice = space.uniform(torch.Generator().manual_seed(0))
    a = fit.score(choice, digits_data["train"], digits_data["val"])["val_acc"]
    b = fit.score(choice, digits_data["train"], digits_data["val"])["val_acc"]
    assert a == b and len(fit.evaluated) == 2


def test_evolution_kills_the_oldest_and_mutates_the_tournament_winner():
    space = DiscreteSpace(2)
    evo = blackbox.RegularizedEvolution(space, population=3, sample=3)
    g = torch.Generator().manual_seed(0)
    members = [space.uniform(g) for _ in range(4)]
    for m, acc in zip(members, (0.5, 0.9, 0.1, 0.2)):
        evo.tell(m, acc)
    assert [m[0] for m in evo.members] == members[1:]  # the first (oldest) died, though not the worst
    for _ in range(10):  # a tournament of the whole population always picks the best (0.9)
        child = evo.ask(g)
        assert sum(a != b for a, b in zip(child, members[1])) == 1


def test_cli_search_arch(tmp_path, capsys):
    from metaphi.cli import main

    out = tmp_path / "run"
    common = ["--channels", "2", "--nodes", "2", "--batch", "16", "--retrain-steps", "3", "--quiet"]
    assert main(["search-arch", "random", "--budget", "6", "--child-steps", "2", "--out", str(out), *common]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "random" and result["architectures_evaluated"] == 2 and result["grad_evals"] == 6
    assert 0 <= result["test_acc"] <= 1 and result["parameters"] > 0 and result["sizes"]["test"] > 0
    again = tmp_path / "again"
    assert main(["search-arch", "retrain", "--genotype", str(out / "genotype.json"), "--out", str(again),
                 *common]) == 0
    assert json.loads((again / "result.json").read_text())["test_acc"] == result["test_acc"]
    # the run's config.yaml (with another --out) is the same search
    rerun = tmp_path / "rerun"
    assert main(["search-arch", "--config", str(out / "config.yaml"), "--out", str(rerun)]) == 0
    repeated = json.loads((rerun / "result.json").read_text())
    assert (repeated["genotype"], repeated["test_acc"]) == (result["genotype"], result["test_acc"])
    implicit = tmp_path / "implicit"
    assert main(["search-arch", "darts-2", "--arch-grad", "implicit", "--budget", "14", "--out", str(implicit),
                 *common]) == 0
    assert json.loads((implicit / "result.json").read_text())["plan"]["iterations"] == 1
    # a second search into the same folder needs --resume
    assert main(["search-arch", "random", "--budget", "6", "--child-steps", "2", "--out", str(out), *common]) == 2
    assert main(["search-arch", "darts-1", "--budget", "1", "--out", str(tmp_path / "d"), *common]) == 2
    assert main(["search-arch", "random", "--ops", "zero,conv_7x7", "--out", str(tmp_path / "o"), *common]) == 2
    assert main(["search-arch", "retrain", "--out", str(tmp_path / "r"), *common]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "conv_7x7" in err and "--genotype" in err
    assert all(len(line) < 300 for line in err.splitlines())


OMNIGLOT = str(shared_data.OMNIGLOT)


@pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "images_background_small1.zip")),
                    reason="the Omniglot archive images_background_small1.zip is not in ../shared/data/omniglot")
def test_omniglot_small1_as_a_many_class_search_task(tmp_path):
    from metaphi.tasks.registry import load_named as load_store

    store = load_store("omniglot", OMNIGLOT, classes=20, seed=0)
    data = split_data(store, (0.5, 0.25, 0.25), seed=0)
    assert store.num_classes == 20 and data["train"][0].shape[1:] == (1, 28, 28)
    config = NetworkConfig(1, 20, channels=2, layers=3, nodes=2)
    out = blackbox.search("random", config, data, 1, TrainSettings(steps=1, batch=16), seed=0)
    assert 0 <= out["val_acc"] <= 1
