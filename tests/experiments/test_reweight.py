"""The sample-reweighting study (metaphi/experiments/reweight.py): splits, training, the seeds sweep
and its checkpoint."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

import shared_data
from metaphi.config import UsageError
from metaphi.evaluate import mean_ci95, t_quantile_975
from metaphi.experiments import reweight as rw
from metaphi.functional import params_of


def test_splits_are_disjoint_clean_and_corrupted_as_asked():
    from metaphi.tasks.digits import load_digits
    data = load_digits()
    split = rw.make_splits(data, 10, 50, rw.Corruption("uniform", 0.4, 10.0), seed=3)
    assert torch.equal(torch.bincount(split["meta"][1], minlength=10), torch.full((10,), 10))
    assert torch.equal(torch.bincount(split["test"][1], minlength=10), torch.full((10,), 50))
    counts = split["train_counts"]
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.1) and counts == sorted(counts, reverse=True)
    idx = split["indices"]
    parts = [set(idx[k].tolist()) for k in ("train", "meta", "test")]
    assert sum(map(len, parts)) == len(set.union(*parts)) == len(split["train"][1]) + 100 + 500  # disjoint
    assert torch.equal(data.targets[idx["meta"]], split["meta"][1])  # meta and test labels are clean
    assert torch.equal(data.targets[idx["test"]], split["test"][1])
    assert torch.equal(data.targets[idx["train"]] != split["train"][1], split["noisy"])
    assert torch.equal(data.images[idx["train"]].float() / 255, split["train"][0])
    assert 0.25 < float(split["noisy"].float().mean()) < 0.45  # 0.4 · 9/10 expected
    again = rw.make_splits(data, 10, 50, rw.Corruption("uniform", 0.4, 10.0), seed=3)
    assert torch.equal(again["train"][1], split["train"][1]) and torch.equal(again["train"][0], split["train"][0])


def test_reweighting_moves_weight_off_noisy_labels():
    from metaphi.tasks.digits import load_digits
    split = rw.make_splits(load_digits(), 10, 20, rw.Corruption("uniform", 0.4), seed=0)
    cfg = rw.TrainConfig(epochs=6, lr=0.03)
    shares = {}
    for method in ("plain", "l2rw", "mwnet"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = rw.build_model({"name": "mlp", "hidden": [32]}, 10, (1, 8, 8))
        _, hist = rw.train(method, model, params_of(model, False), split["train"], split["meta"], cfg,
                           torch.Generator().manual_seed(1), noisy=split["noisy"])
        shares[method] = hist["noisy_weight_share"][-1]
    noisy = float(split["noisy"].float().mean())
    assert shares["plain"] == pytest.approx(noisy, abs=0.05)
    assert shares["l2rw"] < 0.5 * noisy
    assert shares["mwnet"] < shares["plain"]


def test_the_classifier_steps_are_torch_optim_sgd_bit_for_bit():
    """Plain training through the online loop against a plain torch.optim.SGD loop with the same batches."""
    import torch.nn.functional as F
    from metaphi.functional import call
    from metaphi.inner.rules import TorchSGD
    from metaphi.tasks.digits import load_digits
    split = rw.make_splits(load_digits(), 10, 20, rw.Corruption("uniform", 0.4), seed=1)
    cfg = rw.TrainConfig(epochs=3, batch=64, lr=0.05, momentum=0.9, weight_decay=1e-3, lr_decay_at=[0.5])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = rw.build_model({"name": "mlp", "hidden": [16]}, 10, (1, 8, 8))
    init = params_of(model, False)
    params, _ = rw.train("plain", model, init, split["train"], None, cfg, torch.Generator().manual_seed(2))
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
    opt = torch.optim.SGD(list(theta.values()), lr=0.05, momentum=0.9, weight_decay=1e-3)
    g, (x, y) = torch.Generator().manual_seed(2), split["train"]
    for epoch in range(3):
        for group in opt.param_groups:
            group["lr"] = 0.05 * (0.1 if epoch >= 2 else 1.0)
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(call(model, theta, x[idx]), y[idx]).backward()
            opt.step()
    for k in params:
        assert torch.allclose(params[k], theta[k].detach(), rtol=1e-6, atol=1e-7), k
    # the rule alone is bit for bit torch's
    p = {k: v.detach().clone() for k, v in init.items()}
    leaf = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    opt = torch.optim.SGD(list(leaf.values()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    state = TorchSGD(0.1, 0.9, 5e-4).init(p)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in p.items()}
        for k in leaf:
            leaf[k].grad = grads[k].clone()
        opt.step()
        p, state = TorchSGD(0.1, 0.9, 5e-4).update(p, grads, state, {})
    assert all(torch.equal(p[k], leaf[k].detach()) for k in p)


def test_t_interval():
    assert t_quantile_975(4) == 2.776
    for df, q in ((40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert t_quantile_975(df) == pytest.approx(q, abs=1e-3)
    m, ci = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and ci == pytest.approx(2.776 * (2.5 ** 0.5) / 5 ** 0.5)


def test_run_experiment_resumes_from_its_checkpoint(tmp_path):
    ck = str(tmp_path / "checkpoint.pt")
    cfg = rw.TrainConfig(epochs=1)
    kw = dict(data="digits", methods=("plain", "l2rw"), seeds=(0, 1), corruption=rw.Corruption("flip", 0.4),
              model={"name": "mlp", "hidden": [16]}, cfg=cfg, meta_per_class=5, test_per_class=10)
    first = rw.run_experiment(**kw, checkpoint=ck, log=lambda *a: None)
    messages = []
    second = rw.run_experiment(**kw, checkpoint=ck, log=messages.append)
    assert messages == ["resuming: 4 runs done"]
    assert [r["test_acc"] for r in first["rows"]] == [r["test_acc"] for r in second["rows"]]
    fresh = rw.run_experiment(**kw, log=lambda *a: None)  # a run is a function of its seed alone
    assert [r["test_acc"] for r in fresh["rows"]] == [r["test_acc"] for r in first["rows"]]
    with pytest.raises(ValueError, match="different configuration"):
        rw.run_experiment(**{**kw, "seeds": (0,)}, checkpoint=ck, log=lambda *a: None)


def test_the_checkpoint_is_plain_data_read_without_running_code(tmp_path):
    from metaphi import checkpoint
    ck = str(tmp_path / "checkpoint.pt")
    rw.run_experiment("digits", ("plain",), (0,), rw.Corruption("uniform", 0.4), {"name": "mlp", "hidden": [8]},
                      rw.TrainConfig(epochs=1), 5, 10, checkpoint=ck, log=lambda *a: None)
    saved = checkpoint.load(ck)  # weights_only: a config object or any other pickled class would fail here
    assert saved["config"]["train"] == rw.to_dict(rw.TrainConfig(epochs=1))
    assert [r["method"] for r in saved["rows"]] == ["plain"]


def test_run_writes_its_config_and_a_config_reruns_it(tmp_path):
    from metaphi.config import from_dict, load_yaml
    config = rw.ReweightConfig(epochs=1, seeds=[0], methods=["plain", "mwnet"], hidden=[8], meta_per_class=5,
                               test_per_class=10, out=str(tmp_path / "a"), quiet=True)
    first = rw.run(config)
    again = from_dict(rw.ReweightConfig, load_yaml(str(tmp_path / "a" / "config.yaml")))
    assert again == config
    second = rw.run(replace(again, out=str(tmp_path / "b")))
    assert [r["test_acc"] for r in second["rows"]] == [r["test_acc"] for r in first["rows"]]
    assert second["config"] == first["config"]


@pytest.mark.parametrize("change, message", [
    (dict(methods=["plain"], mwnet_lr=0.01), "--mwnet-lr applies only with --methods with mwnet"),
    (dict(methods=["plain", "mwnet"], es_sigma=0.1), "--es-sigma applies only with"),
    (dict(methods=["l2rw"], mwnet_estimator="es"), "--mwnet-estimator applies only with"),
    (dict(methods=["plain-meta"], meta_batch=10), "--meta-batch applies only with"),
    (dict(methods=["mwnet"], l2rw_mode="lookahead"), "--l2rw-mode applies only with"),
    (dict(noise="none", noise_rate=0.2), "--noise-rate applies only with"),
    (dict(data_root="/tmp"), "--data-root applies only with"),
    (dict(methods=[]), "--methods"),
    (dict(seeds=[]), "--seeds"),
    (dict(noise="flip", noise_rate=0.0), "needs a --noise-rate above 0"),
    (dict(imbalance=0.5), "--imbalance"),
    (dict(model="conv4", hidden=[8, 8]), "--hidden for conv4"),
    (dict(lr_decay_at=[0.5, 1.5]), "--lr-decay-at"),
    (dict(methods=["mwnet"], mwnet_estimator="es", es_population=5), "--es-population must be an even number"),
])
def test_options_that_do_not_apply_or_are_out_of_range_are_refused(tmp_path, change, message):
    with pytest.raises(UsageError, match=message):
        rw.run(replace(rw.ReweightConfig(epochs=1, out=str(tmp_path), quiet=True), **change))
    assert not os.path.exists(tmp_path / "config.yaml")


def test_options_at_their_defaults_or_where_they_apply_are_accepted():
    rw.validate(rw.ReweightConfig(noise="none"))            # the default noise rate is left alone
    rw.validate(rw.ReweightConfig(noise="none", noise_rate=0.0))
    rw.validate(rw.ReweightConfig(methods=["mwnet"], mwnet_estimator="es", es_population=4))
    rw.validate(rw.ReweightConfig(data="omniglot", data_root="/tmp"))


OMNIGLOT = str(shared_data.OMNIGLOT)


@pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "images_background_small1.zip")),
                    reason="the Omniglot minimal archive images_background_small1.zip is not available")
def test_omniglot_small1_many_classes(tmp_path):
    result = rw.run_experiment("omniglot", ("plain", "l2rw"), (0,), rw.Corruption("uniform", 0.4),
                               {"name": "mlp", "hidden": [32]}, rw.TrainConfig(epochs=1, batch=50),
                               meta_per_class=2, test_per_class=4, classes=20, data_root=OMNIGLOT,
                               log=lambda *a: None)
    assert len(result["rows"]) == 2 and all(0 <= r["test_acc"] <= 1 for r in result["rows"])
    assert result["rows"][0]["train_size"] == 20 * 14
