"""The contract every algorithm and estimator keeps, checked for every entry of the algorithm table
and every estimator that applies to it (in the manner of optax's ``_common_test.py``), on a tiny
image task in float64:

* the exact (second-order) meta-gradient agrees with central finite differences of the mean query
  loss along random directions; first-order and Reptile agree with their own definitions;
* vmap over tasks gives what the loop gives, wherever the estimator vectorizes (and checkpointing
  the inner loop changes nothing);
* the spec rebuilds an algorithm with the same losses, a checkpoint written by ``meta_train`` loads
  back to the same φ and algorithm, and every options dataclass survives to_dict / from_dict;
* an option that does not belong to an algorithm or estimator is refused with a UsageError.

Adding a family to ``ALGORITHMS`` or an estimator to ``ESTIMATORS`` puts it under all of this.
"""
import dataclasses
import json

import pytest
import torch
from torch.utils import _pytree as pytree

from metaphi.algorithms import ALGORITHMS, build_algorithm, create_algorithm, options_class
from metaphi.config import UsageError, from_dict, to_dict
from metaphi.functional import prefixed
from metaphi.inner import FIRST_ORDER, Unroll
from metaphi.outer import BLACK_BOX, ESTIMATORS, build_estimator, estimator_options_class
from metaphi.train import TrainConfig, load_checkpoint, meta_train
from tiny import tiny_benchmark

pytestmark = pytest.mark.usefixtures("one_thread", "float64")

WAYS, SHOTS, QUERY, TASKS = 3, 1, 2, 2
#: options that keep the pooled baselines' batches tiny; everything else runs with its defaults
SMALL = {"pretrain": {"batch_size": 6}, "ssl-rotation": {"batch_size": 3}, "ssl-simclr": {"batch_size": 3}}
#: settings of the estimators under test: a small ES population, Reptile without random minibatches
ESTIMATOR_OPTIONS = {"es": {"population": 4, "sigma": 1e-3, "estimator_seed": 0},
                     "reptile": {"minibatches": False}}
_BENCH = {}


def bench():
    if "tiny" not in _BENCH:
        _BENCH["tiny"] = tiny_benchmark(classes=9, per_class=5, size=10)
    return _BENCH["tiny"]


def double(tree):
    return pytree.tree_map(lambda t: t.double() if torch.is_tensor(t) and t.is_floating_point() else t, tree)


def make(name, seed=0):
    torch.manual_seed(seed)
    return create_algorithm(name, bench(), WAYS, 0.1, 1, 1, SMALL.get(name))


def training_tasks(algo, seed=0):
    sample = algo.training_tasks(bench(), WAYS, SHOTS, QUERY)
    return double(sample(TASKS, torch.Generator().manual_seed(seed)))


def estimators_of(algo):
    """The estimators that apply: the algorithm's own, and the black-box ones where φ is trained."""
    if not algo.trains:
        return ()
    return tuple(dict.fromkeys(tuple(algo.estimators) + BLACK_BOX))


def mean_loss(algo, phi, tasks, unroll=Unroll()):
    """The loss of the learning algorithm, written as a plain loop over tasks (independent of the
    estimators' vmap and chunking paths)."""
    parts = tasks.unstack()
    return sum(algo.task_loss(phi, t, unroll)[0] for t in parts) / len(parts)


def cases():
    for name in ALGORITHMS:
        for estimator in estimators_of(make(name)):
            yield pytest.param(name, estimator, id=f"{name}-{estimator}")


CASES = list(cases())


def test_every_algorithm_is_covered():
    covered = {c.values[0] for c in CASES}
    untrained = {n for n in ALGORITHMS if not make(n).trains}
    assert covered | untrained == set(ALGORITHMS) and untrained == {"scratch", "pixel-nn"}


# -- meta-gradients ---------------------------------------------------------------------------------

def directional_fd(loss_of, phi, direction, eps=1e-6):
    with torch.no_grad():
        plus = loss_of({k: v + eps * direction[k] for k, v in phi.items()})
        minus = loss_of({k: v - eps * direction[k] for k, v in phi.items()})
    return float((plus - minus) / (2 * eps))


@pytest.mark.parametrize("name,estimator", CASES)
def test_meta_gradient_matches_its_definition(name, estimator):
    algo = make(name)
    phi = double(algo.init_meta_params())
    phi = {k: v.detach().requires_grad_() for k, v in phi.items()}
    tasks = training_tasks(algo)
    grads, metrics = build_estimator(estimator, ESTIMATOR_OPTIONS.get(estimator))(algo, phi, tasks)
    assert set(grads) == set(phi) and all(torch.isfinite(g).all() for g in grads.values())
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    if estimator == "second-order":
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in phi.items()}
            fd = directional_fd(lambda p: mean_loss(algo, p, tasks), phi, v)
            analytic = float(sum((grads[k] * v[k]).sum() for k in phi))
            assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-8)
    elif estimator == "first-order":
        want = torch.autograd.grad(mean_loss(algo, phi, tasks, FIRST_ORDER), list(phi.values()), allow_unused=True)
        for (k, p), w in zip(phi.items(), want):
            torch.testing.assert_close(grads[k], torch.zeros_like(p) if w is None else w, rtol=1e-9, atol=1e-12)
    elif estimator == "reptile":
        # φ − mean_tasks θ_k, θ_k learned from each task's support and query together
        for task in tasks.unstack():
            both = tuple(torch.cat([s, q]) for s, q in zip(task.support, task.query))
            adapted = algo.learn({k: v.detach() for k, v in phi.items()}, both, unroll=FIRST_ORDER)
            for k, v in prefixed(phi, "init").items():
                grads["init." + k] = grads["init." + k] - (v.detach() - adapted[k]) / TASKS
        assert all(float(g.abs().max()) < 1e-12 for g in grads.values())
    elif estimator == "implicit":
        pytest.skip("the implicit gradient is ∇L only at an exact inner solution: tests/outer/test_implicit.py "
                    "checks it against a long unroll; here vmap = loop (below) checks its two solvers agree")
    elif estimator == "es":
        with torch.no_grad():
            assert metrics["loss"] == pytest.approx(float(mean_loss(algo, phi, tasks, FIRST_ORDER)), rel=1e-9)


def test_first_and_second_order_differ_where_there_is_an_inner_loop():
    """So the finite-difference check above would catch the two being swapped."""
    algo = make("maml")
    phi = double(algo.init_meta_params())
    tasks = training_tasks(algo)
    second, _ = build_estimator("second-order")(algo, phi, tasks)
    first, _ = build_estimator("first-order")(algo, phi, tasks)
    assert max(float((second[k] - first[k]).abs().max()) for k in phi) > 1e-6


VECTORIZED = [c for c in CASES if c.values[1] in ("second-order", "first-order", "implicit", "es")]


@pytest.mark.parametrize("name,estimator", VECTORIZED)
def test_vmap_equals_the_loop(name, estimator):
    algo = make(name)
    phi = double(algo.init_meta_params())
    tasks = training_tasks(algo)
    options = ESTIMATOR_OPTIONS.get(estimator, {})
    batched, m_batched = build_estimator(estimator, options)(algo, phi, tasks)
    looped, m_looped = build_estimator(estimator, {**options, "loop": True})(algo, phi, tasks)
    variants = [(looped, m_looped)]
    if estimator in ("second-order", "first-order"):
        variants.append(build_estimator(estimator, {"checkpoint_inner": True})(algo, phi, tasks))
        variants.append(build_estimator(estimator, {"task_chunk": 1})(algo, phi, tasks))
    for grads, metrics in variants:
        for k in phi:
            torch.testing.assert_close(batched[k], grads[k], rtol=1e-7, atol=1e-10)
        assert m_batched["loss"] == pytest.approx(metrics["loss"], rel=1e-9)


# -- rebuilding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_spec_rebuilds_the_same_algorithm(name):
    algo = make(name)
    spec = json.loads(json.dumps(algo.spec()))  # plain data, as a checkpoint holds it
    rebuilt = build_algorithm(spec)
    assert rebuilt.spec() == algo.spec() and rebuilt.name == algo.name
    assert type(rebuilt.options) is type(algo.options) and rebuilt.options == algo.options
    phi = double(algo.init_meta_params())
    if algo.trains:
        tasks = training_tasks(algo)
        with torch.no_grad():
            assert float(mean_loss(rebuilt, phi, tasks)) == pytest.approx(float(mean_loss(algo, phi, tasks)), rel=1e-12)
    test_task = double(bench().episodes("test", WAYS, SHOTS, QUERY).sample(torch.Generator().manual_seed(2)))
    torch.testing.assert_close(rebuilt.evaluate(phi, test_task), algo.evaluate(phi, test_task))


@pytest.mark.parametrize("name", [n for n in ALGORITHMS if n not in ("scratch", "pixel-nn")])
def test_checkpoint_round_trip(name, tmp_path):
    algo = make(name)
    estimator = build_estimator(algo.estimators[0], ESTIMATOR_OPTIONS.get(algo.estimators[0]))
    sample = algo.training_tasks(bench(), WAYS, SHOTS, QUERY)
    state = meta_train(algo, estimator, lambda n, g: double(sample(n, g)), TrainConfig(iterations=2, meta_batch=TASKS),
                       out_dir=str(tmp_path), progress=False)
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))  # the weights-only reader: plain data alone
    assert ck["iteration"] == 2 and ck["phi"].keys() == state.phi.keys()
    for k, v in state.phi.items():
        assert torch.equal(ck["phi"][k], v.detach())
    rebuilt = build_algorithm(ck["algorithm"])
    assert rebuilt.spec() == algo.spec()
    task = double(bench().episodes("test", WAYS, SHOTS, QUERY).sample(torch.Generator().manual_seed(3)))
    torch.testing.assert_close(rebuilt.evaluate(ck["phi"], task), algo.evaluate(state.phi, task))


# -- options ----------------------------------------------------------------------------------------

def _all_fields(classes):
    return {f.name: getattr(cls(), f.name) for cls in classes for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_algorithm_options_round_trip_and_refuse_strangers(name):
    cls = options_class(name)
    options = cls()
    assert from_dict(cls, json.loads(json.dumps(to_dict(options)))) == options
    assert make(name).options == options or name in SMALL
    own = {f.name for f in dataclasses.fields(cls)}
    strangers = {k: v for k, v in _all_fields([options_class(n) for n in ALGORITHMS]).items() if k not in own}
    for key, value in [("no_such_option", 1), *strangers.items()]:
        with pytest.raises(UsageError, match=key):
            create_algorithm(name, bench(), WAYS, 0.1, 1, 1, {key: value})


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_options_round_trip_and_refuse_strangers(name):
    cls = estimator_options_class(name)
    options = cls()
    assert from_dict(cls, json.loads(json.dumps(to_dict(options)))) == options
    build_estimator(name, options)
    build_estimator(name, to_dict(options))
    own = {f.name for f in dataclasses.fields(cls)}
    strangers = {k: v for k, v in _all_fields([estimator_options_class(n) for n in ESTIMATORS]).items()
                 if k not in own}
    assert strangers
    for key, value in [("no_such_option", 1), *strangers.items()]:
        with pytest.raises(UsageError, match=f"estimator {name}: unknown option {key}"):
            build_estimator(name, {key: value})


@pytest.mark.parametrize("name,options,words", [
    ("second-order", {"solver": "cg"}, "unknown option solver"),
    ("first-order", {"compile": True, "checkpoint_inner": True}, "do not go together"),
    ("second-order", {"loop": True, "task_chunk": 2}, "--task-chunk"),
    ("implicit", {"neumann_alpha": 0.1}, "--neumann-alpha applies to --solver neumann"),
    ("implicit", {"solver": "lu"}, "'lu' is not one of"),
    ("es", {"population": 5}, "even"),
    ("es", {"task_chunk": 2}, "unknown option task_chunk"),
    ("reptile", {"loop": True}, "unknown option loop"),
    ("reinforce", {"decay": 1.0}, "--decay"),
])
def test_inapplicable_or_inconsistent_options_are_refused(name, options, words):
    with pytest.raises(UsageError, match=words):
        build_estimator(name, options)


def test_inapplicable_algorithm_options_are_refused():
    with pytest.raises(UsageError, match="--cosine-scale"):
        create_algorithm("protonet", bench(), WAYS, 0.1, 1, 1, {"cosine_scale": 3.0})
    with pytest.raises(UsageError, match="--fce-steps"):
        create_algorithm("matching", bench(), WAYS, 0.1, 1, 1, {"fce_steps": 2})
    with pytest.raises(UsageError, match="reg"):
        create_algorithm("imaml", bench(), WAYS, 0.1, 1, 1, {"reg": 0.0})
    assert create_algorithm("protonet-cosine", bench(), WAYS, 0.1, 1, 1, {"cosine_scale": 3.0}).initial_scale == 3.0
