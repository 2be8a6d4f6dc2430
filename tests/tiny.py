"""Small fixtures shared by test modules: a learnable tiny image benchmark and a random float64 task."""
import torch

from metaphi.tasks import ImageClasses, Task
from metaphi.tasks.registry import image_benchmark


def tiny_benchmark(classes=12, per_class=6, size=12, seed=0):
    """Images of a class are its own random template plus noise: learnable, and quick to run."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(classes, 1, size, size, generator=g)
    noise = 0.3 * torch.rand(classes, per_class, 1, size, size, generator=g)
    images = ((templates.unsqueeze(1) * 0.7 + noise).clamp(0, 1) * 255).to(torch.uint8).flatten(0, 1)
    data = ImageClasses(images, torch.arange(classes).repeat_interleave(per_class), [f"c{i}" for i in range(classes)])
    third = classes // 3
    splits = {"train": data.subset(range(third)), "val": data.subset(range(third, 2 * third)),
              "test": data.subset(range(2 * third, classes))}
    defaults = dict(ways=3, shots=1, query=2, eval_shots=None, eval_query=None, inner_lr=0.1, inner_steps=1,
                    eval_steps=2, meta_batch=2, iterations=2, eval_tasks=6, meta_lr=1e-3)
    return image_benchmark("tiny", splits, defaults, hidden=8)


def install_tiny(monkeypatch):
    """Make ``--benchmark tiny`` name the tiny benchmark, for command-line tests."""
    from metaphi.tasks import registry

    monkeypatch.setitem(registry.BENCHMARKS, "tiny", lambda options: tiny_benchmark())


def random_task(ways=3, shots=2, query=2, seed=0, size=10):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(ways * shots, 1, size, size, generator=g, dtype=torch.float64)
    xq = torch.rand(ways * query, 1, size, size, generator=g, dtype=torch.float64)
    return Task((xs, torch.arange(ways).repeat_interleave(shots)), (xq, torch.arange(ways).repeat_interleave(query)))


def assert_first_order_vmap_equals_loop(algo, phi, tasks):
    """The first-order meta-gradient and loss of a batch of tasks are the same run as one vmap and as a
    loop over tasks; so are the evaluations. Returns the loop's gradients and the evaluations."""
    import pytest

    from metaphi.outer import build_estimator

    g_vmap, m_vmap = build_estimator("first-order")(algo, phi, tasks)
    g_loop, m_loop = build_estimator("first-order", {"loop": True})(algo, phi, tasks)
    assert m_vmap["loss"] == pytest.approx(m_loop["loss"], rel=1e-12)
    for k in phi:
        assert torch.allclose(g_vmap[k], g_loop[k], atol=1e-10), k
    batched = torch.func.vmap(lambda t: algo.evaluate(phi, t))(tasks)
    assert torch.equal(batched, torch.stack([algo.evaluate(phi, t) for t in tasks.unstack()]))
    return g_loop, batched


def bar_drawing(c: int, i: int, classes: int, size: int = 28):
    """A uint8 numpy image of class ``c`` of ``classes``: a bar at an angle of its own; drawing ``i``: a
    small seeded shift. Dark ink on white paper, like a scanned character."""
    import numpy as np

    rng = np.random.default_rng(1000 * c + i)
    img = np.full((size, size), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size] - size / 2
    angle = np.pi * c / classes
    dist = np.abs(np.cos(angle) * (yy - rng.integers(-2, 3)) - np.sin(angle) * (xx - rng.integers(-2, 3)))
    img[dist < 2.5] = 0
    return img


def trained_and_rebuilt(name: str, folder):
    """Algorithm ``name`` meta-trained for 2 iterations on the tiny benchmark with its checkpoint in
    ``folder``, rebuilt from that checkpoint: checks that the rebuilt spec is the same and that its
    predictions on a test task are finite logits whose accuracy is what ``evaluate`` reports; returns
    (algorithm, state, rebuilt, checkpoint, task, logits)."""
    from metaphi.algorithms import build_algorithm, create_algorithm
    from metaphi.outer import build_estimator
    from metaphi.train import TrainConfig, load_checkpoint, meta_train

    bench = tiny_benchmark()
    torch.manual_seed(0)
    algo = create_algorithm(name, bench, 3, 0.1, 0, 0)
    state = meta_train(algo, build_estimator("first-order"), algo.training_tasks(bench, 3, 1, 2),
                       TrainConfig(iterations=2, meta_batch=2), out_dir=str(folder), progress=False)
    ck = load_checkpoint(str(folder / "checkpoint.pt"))
    rebuilt = build_algorithm(ck["algorithm"])
    assert rebuilt.spec() == algo.spec()
    task = bench.episodes("test", 3, 2, 3).sample(torch.Generator().manual_seed(0))
    logits = rebuilt.predict(ck["phi"], task.support, task.query[0], 0)
    assert logits.shape == (9, 3) and torch.isfinite(logits).all()
    assert (logits.argmax(-1) == task.query[1]).float().mean() == rebuilt.evaluate(ck["phi"], task)[0]
    return algo, state, rebuilt, ck, task, logits


def tiny_store(*args, **kwargs):
    """Four classes of four random 8x8 images: a stand-in for a study's data loader."""
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(4).repeat_interleave(4)
    images = (torch.rand(16, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    return ImageClasses(images, targets, [f"c{i}" for i in range(4)])
