"""Meta-training learned optimizers: meta-gradients against finite differences in float64, truncation,
resumption, evaluation, the study's config and files (the command itself: tests/cli/test_l2o.py)."""
import json

import pytest
import torch

from metaphi.inner.learned import LSTMRule, MLPRule, ScheduledSGD
from metaphi.functional import detach
from metaphi.experiments.l2o import (GlyphMLP, L2OConfig, Quadratics, build_family, detach_state, evaluate_optimizer, evaluate_rule,
                         meta_train, sample_problems, truncations, unroll, validate)
from metaphi.inner.optim import load_learned

TINY_GLYPHS = {"alphabets": 3, "characters": 6, "drawers": 4, "size": 8}


def tiny_glyph_mlp(**kw):
    return GlyphMLP(hidden=kw.pop("hidden", [3]), classes=3, batch_size=5, image_size=4, glyphs=TINY_GLYPHS, **kw)


def perturbed_meta(rule, params, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in rule.meta_params(params).items()}


def truncated_loss(rule, family, meta, params, state, data, steps, seed, second_order=True):
    g = torch.Generator().manual_seed(seed)
    batch = family.batch(data, g)
    return unroll(rule, meta, family, params, state, data, batch, steps, g, second_order)


def directional_check(fn, meta, seed=1, eps=1e-6):
    """d/dε fn(meta + ε d) at 0 by autograd and by central differences, for a random direction d."""
    g = torch.Generator().manual_seed(seed)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in meta.items()}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in meta.items()}
    grads = torch.autograd.grad(fn(leaves), list(leaves.values()))
    analytic = sum((gr * direction[k]).sum() for gr, k in zip(grads, leaves))
    with torch.no_grad():
        plus = fn({k: v + eps * direction[k] for k, v in meta.items()})
        minus = fn({k: v - eps * direction[k] for k, v in meta.items()})
    return float(analytic.detach()), float((plus - minus).detach() / (2 * eps))


@pytest.mark.parametrize("rule", [LSTMRule(hidden=4, seed=0), MLPRule(hidden=(3,), init="random", seed=0),
                                  ScheduledSGD(0.05, steps=2)], ids=["lstm", "mlp-rule", "schedule-sgd"])
@pytest.mark.parametrize("family_name", ["quadratic", "glyph-mlp"])
def test_meta_gradient_through_a_short_unroll_matches_finite_differences(rule, family_name, float64):
    family = Quadratics(dim=3) if family_name == "quadratic" else tiny_glyph_mlp()
    params, data = sample_problems(family, 2, seed=0)
    meta = perturbed_meta(rule, params)
    state = rule.init(params)

    def fn(m):
        with torch.enable_grad():
            return truncated_loss(rule, family, m, params, state, data, steps=3, seed=4)[0]

    analytic, numeric = directional_check(fn, meta)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_first_order_drops_only_the_second_derivatives(float64):
    # on a linear loss the optimizee's gradient does not depend on θ: both meta-gradients are exact
    class Linear(Quadratics):
        def loss(self, params, data, batch=None):
            return (params["theta"] * data["y"]).sum(-1) + 0.5 * (params["theta"] ** 2).sum(-1).detach() * 0

    family = Linear(dim=4)
    rule = LSTMRule(hidden=3)
    params, data = sample_problems(family, 2, seed=0)
    meta = perturbed_meta(rule, params)
    leaves = [{k: v.clone().requires_grad_() for k, v in meta.items()} for _ in range(2)]
    first, second = (torch.autograd.grad(truncated_loss(rule, family, m, params, rule.init(params), data, 3, 0, so)[0],
                                         list(m.values())) for m, so in zip(leaves, (False, True)))
    for a, b in zip(first, second):
        assert torch.allclose(a, b, atol=1e-12)
    # on a quadratic they differ: the first-order gradient really drops ∂∇f/∂φ
    family = Quadratics(dim=4)
    params, data = sample_problems(family, 2, seed=0)
    first, second = (torch.autograd.grad(truncated_loss(rule, family, m, params, rule.init(params), data, 3, 0, so)[0],
                                         list(m.values())) for m, so in zip(leaves, (False, True)))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first, second))


class CountingRule:
    """Wraps a rule; counts, in backward passes, the updates the meta-gradient flows through."""

    def __init__(self, inner):
        self.inner, self.backward_visits, self.shared = inner, 0, inner.shared

    def meta_params(self, params):
        return self.inner.meta_params(params)

    def init(self, params):
        return self.inner.init(params)

    def update(self, params, grads, state, meta):
        if torch.is_grad_enabled():
            # a view of φ per update: the meta-gradient of this update arrives through it
            meta = {k: v.view_as(v) for k, v in meta.items()}
            next(iter(meta.values())).register_hook(
                lambda g: setattr(self, "backward_visits", self.backward_visits + 1))
        return self.inner.update(params, grads, state, meta)

    def spec(self):
        return self.inner.spec()


def test_truncation_length_is_respected():
    assert truncations(10, 3) == [3, 3, 3, 1] and truncations(4, 10) == [4]
    rule = CountingRule(ScheduledSGD(0.01, steps=10))
    seen = []

    def record(length, loss):
        seen.append((length, rule.backward_visits))
        rule.backward_visits = 0

    state = meta_train(rule, Quadratics(dim=3), L2OConfig(horizon=10, unroll=3, iterations=2, problems=2, val_every=0),
                       progress=False, on_truncation=record)
    # each meta-gradient flows back through the updates of its own truncation and no further
    assert seen == [(3, 3), (3, 3), (3, 3), (1, 1)] * 2
    assert state.truncations == 8 and state.iteration == 2


def test_truncated_meta_gradient_holds_the_truncation_point_fixed(float64):
    family, rule = Quadratics(dim=3), LSTMRule(hidden=3)
    params, data = sample_problems(family, 2, seed=0)
    meta = perturbed_meta(rule, params)
    g = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in meta.items()}
    # the second truncation as meta_train runs it: the first piece's end detached
    leaves = {k: v.clone().requires_grad_() for k, v in meta.items()}
    _, mid, mid_state, _ = unroll(rule, leaves, family, params, rule.init(params), data, None, 3, g, True)
    mid, mid_state = detach(mid), detach_state(mid_state)
    grads = torch.autograd.grad(unroll(rule, leaves, family, mid, mid_state, data, None, 3, g, True)[0],
                                list(leaves.values()))
    analytic = float(sum((gr * direction[k]).sum() for gr, k in zip(grads, leaves)))

    def held(m):  # the second piece's loss with its starting point fixed
        with torch.enable_grad():
            return unroll(rule, m, family, mid, mid_state, data, None, 3, g, True)[0]

    def untruncated(m):  # the same loss when the first piece moves with φ too: mean of steps 4..6
        with torch.enable_grad():
            six = unroll(rule, m, family, params, rule.init(params), data, None, 6, g, True)[0]
            three = unroll(rule, m, family, params, rule.init(params), data, None, 3, g, True)[0]
        return 2 * six - three

    eps = 1e-6
    fd = {}
    for name, fn in (("held", held), ("untruncated", untruncated)):
        with torch.no_grad():
            plus = fn({k: v + eps * direction[k] for k, v in meta.items()})
            minus = fn({k: v - eps * direction[k] for k, v in meta.items()})
        fd[name] = float((plus - minus).detach() / (2 * eps))
    assert analytic == pytest.approx(fd["held"], rel=1e-6)
    assert abs(fd["untruncated"] - fd["held"]) > 1e-3 * abs(fd["held"])


def test_batched_problems_run_as_separate_runs():
    family = Quadratics(dim=4)
    curve = evaluate_optimizer(lambda named: torch.optim.Adam([p for _, p in named], lr=0.1), family, 5, 3, seed=2)
    params, data = sample_problems(family, 3, seed=2)
    for i in range(3):
        theta = params["theta"][i:i + 1].clone().requires_grad_()
        one = {"W": data["W"][i:i + 1], "y": data["y"][i:i + 1]}
        opt = torch.optim.Adam([theta], lr=0.1)
        for t in range(5):
            opt.zero_grad()
            family.loss({"theta": theta}, one).sum().backward()
            opt.step()
        assert torch.allclose(curve[5, i], family.loss({"theta": theta}, one)[0], rtol=1e-6)


def test_resume_continues_to_the_same_meta_parameters(tmp_path):
    rule, family = LSTMRule(hidden=3), Quadratics(dim=3)
    config = dict(horizon=6, unroll=3, problems=2, val_every=2, val_problems=2, checkpoint_every=2)
    straight = meta_train(rule, family, L2OConfig(iterations=4, **config), out_dir=str(tmp_path / "a"), progress=False)
    meta_train(rule, family, L2OConfig(iterations=2, **config), out_dir=str(tmp_path / "b"), progress=False)
    resumed = meta_train(rule, family, L2OConfig(iterations=4, **config), out_dir=str(tmp_path / "b"), resume=True,
                         progress=False)
    for k in straight.meta:
        assert torch.equal(straight.meta[k], resumed.meta[k]), k
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    timeless = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and timeless(rows) == timeless(straight.history)
    loaded, meta, info = load_learned(tmp_path / "b" / "optimizer.pt")
    assert loaded.spec() == rule.spec() and info["horizon"] == 6
    best = min(r["val"] for r in rows if "val" in r)
    assert validate(loaded, meta, family, 6, 2, 999) == pytest.approx(best)


def test_meta_training_learns_a_better_schedule():
    family, rule = Quadratics(dim=5), ScheduledSGD(1e-3, steps=20)
    before = validate(rule, rule.meta_params({"theta": torch.zeros(1, 5)}), family, 20, 8, 999)
    state = meta_train(rule, family, L2OConfig(horizon=20, unroll=5, iterations=15, problems=8, meta_lr=3e-3,
                                               val_every=15, val_problems=8), progress=False)
    assert state.best_val < 0.8 * before


def test_glyph_family_is_a_many_class_problem_on_its_split():
    family = tiny_glyph_mlp(split="test")
    params, data = sample_problems(family, 2, seed=0)
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "layers.0.weight": (2, 16, 3), "layers.0.bias": (2, 3), "layers.1.weight": (2, 3, 3), "layers.1.bias": (2, 3)}
    assert data["x"].shape == (2, 12, 16) and sorted(data["y"][0].tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert build_family("glyphs-2layer").spec()["hidden"] == [20, 20]
    assert build_family("glyphs-relu", split="val").spec()["split"] == "val"
    curve = evaluate_rule(MLPRule(), MLPRule().meta_params(), family, 4, 2, 0)
    assert curve.shape == (5, 2) and torch.isfinite(curve).all()


def test_es_meta_gradient_points_along_the_backpropagated_one(float64):
    from metaphi.experiments.l2o import es_meta_gradient

    family, rule = Quadratics(dim=4), ScheduledSGD(0.02, steps=3)
    params, data = sample_problems(family, 4, seed=0)
    meta = rule.meta_params(params)
    leaves = {k: v.clone().requires_grad_() for k, v in meta.items()}
    exact = torch.autograd.grad(unroll(rule, leaves, family, params, rule.init(params), data, None, 3,
                                       torch.Generator())[0], list(leaves.values()))
    config = L2OConfig(es_population=400, es_sigma=1e-4)
    estimate = es_meta_gradient(rule, meta, family, params, rule.init(params), data, None, 3, torch.Generator(),
                                config, call=0)
    a, b = torch.cat([g.flatten() for g in exact]), torch.cat([g.flatten() for g in estimate])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95


def test_es_meta_training_runs_and_resumes(tmp_path):
    rule, family = ScheduledSGD(0.01, steps=6), Quadratics(dim=3)
    config = dict(horizon=6, unroll=3, problems=4, val_every=0, checkpoint_every=1, estimator="es", es_population=4)
    straight = meta_train(rule, family, L2OConfig(iterations=2, **config), out_dir=str(tmp_path / "a"), progress=False)
    meta_train(rule, family, L2OConfig(iterations=1, **config), out_dir=str(tmp_path / "b"), progress=False)
    resumed = meta_train(rule, family, L2OConfig(iterations=2, **config), out_dir=str(tmp_path / "b"), resume=True,
                         progress=False)
    assert not torch.equal(straight.meta["schedule"], rule.meta_params({"theta": torch.zeros(1, 3)})["schedule"])
    assert torch.equal(straight.meta["schedule"], resumed.meta["schedule"])


class NotPlainData:
    """What a checkpoint must never hold: an object whose unpickling would run code of its class."""


def test_checkpoint_and_learned_files_are_plain_data(tmp_path):
    from metaphi import checkpoint

    rule, family = LSTMRule(hidden=3), Quadratics(dim=3)
    config = L2OConfig(horizon=6, unroll=3, iterations=2, problems=2, val_every=1, val_problems=2)
    meta_train(rule, family, config, out_dir=str(tmp_path), progress=False)
    for name in ("checkpoint.pt", "optimizer.pt", "optimizer-last.pt"):
        assert isinstance(torch.load(tmp_path / name, weights_only=True), dict), name
    ck = checkpoint.load(tmp_path / "checkpoint.pt")  # the online loop's: φ, its Adam state, the stream
    assert ck["identity"] == {"rule": rule.spec(), "family": family.spec()} and ck["step"] == 2
    assert set(ck["state"]) >= {"meta", "meta_optimizer", "best_meta", "best_val"} and ck["generator"] is not None
    # another rule's checkpoint is refused
    with pytest.raises(ValueError, match="other settings"):
        meta_train(LSTMRule(hidden=4), family, config, out_dir=str(tmp_path), resume=True, progress=False)
    # a checkpoint that holds more than plain data is refused, not unpickled
    torch.save({**ck, "history": [NotPlainData()]}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="asks to call .*NotPlainData, not plain data.*nothing in it ran"):
        meta_train(rule, family, L2OConfig(**{**vars(config), "iterations": 3}), out_dir=str(tmp_path), resume=True,
                   progress=False)


def test_study_config_round_trips_through_its_config_file(tmp_path):
    import yaml

    from metaphi.config import from_dict
    from metaphi.experiments.l2o import L2OTrainConfig, run_train

    config = L2OTrainConfig(rule="schedule-sgd", horizon=4, unroll=2, iterations=1, problems=2, val_every=0,
                            eval_problems=2, lr=0.05, out=str(tmp_path / "run"), quiet=True)
    result = run_train(config)
    saved = from_dict(L2OTrainConfig, yaml.safe_load(open(tmp_path / "run" / "config.yaml")))
    assert saved == config and result["config"] == vars(config) and result["truncations"] == 2
    loaded, meta, info = load_learned(tmp_path / "run" / "optimizer.pt")
    assert loaded.spec() == ScheduledSGD(0.05, steps=4).spec() and info["horizon"] == 4
