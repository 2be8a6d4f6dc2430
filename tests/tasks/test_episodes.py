import math

import pytest
import torch

from metaphi.tasks import DataError, EpisodeSampler, ImageClasses, Task
from metaphi.tasks.sinusoid import SinusoidTasks


def store(classes=6, per_class=5, groups=None):
    images = torch.arange(classes * per_class, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    targets = torch.arange(classes * per_class) // per_class
    return ImageClasses(images, targets, [f"c{i}" for i in range(classes)], groups)


def test_episode_shapes_labels_and_distinct_images():
    data = store()
    task = EpisodeSampler(data, ways=3, shots=2, query=2).sample(torch.Generator().manual_seed(0))
    (xs, ys), (xq, yq) = task
    assert xs.shape == (6, 1, 4, 4) and xq.shape == (6, 1, 4, 4)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.tolist() == [0, 0, 1, 1, 2, 2]
    ids = torch.cat([xs[:, 0, 0, 0], xq[:, 0, 0, 0]]) * 255
    assert len(set(ids.round().tolist())) == 12  # no image in both support and query
    # every image of a relabelled class comes from one original class
    original = (ids.round().long() // 5).view(2, 3, 2).permute(1, 0, 2).reshape(3, 4)
    assert all(len(set(row.tolist())) == 1 for row in original)
    assert len(set(original[:, 0].tolist())) == 3


def test_episodes_are_reproducible_from_the_generator():
    sampler = EpisodeSampler(store(), 3, 1, 2)
    a = sampler.sample_batch(4, torch.Generator().manual_seed(7))
    b = sampler.sample_batch(4, torch.Generator().manual_seed(7))
    c = sampler.sample_batch(4, torch.Generator().manual_seed(8))
    assert torch.equal(a.support[0], b.support[0]) and torch.equal(a.query[0], b.query[0])
    assert not torch.equal(a.support[0], c.support[0])


def test_within_group_episodes_stay_in_one_group():
    data = store(groups=["a", "a", "a", "b", "b", "b"])
    sampler = EpisodeSampler(data, 3, 1, 1, within_group=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        xs = sampler.sample(g).support[0]
        classes = {int(round(v * 255)) // 5 for v in xs[:, 0, 0, 0].tolist()}
        assert classes in ({0, 1, 2}, {3, 4, 5})


def test_too_few_images_names_the_class():
    with pytest.raises(DataError, match=r"class 'c0' has 5 images but shots \+ query = 3 \+ 3 = 6"):
        EpisodeSampler(store(), 3, 3, 3)
    with pytest.raises(DataError, match="10-way tasks need 10 classes"):
        EpisodeSampler(store(), 10, 1, 1)
    with pytest.raises(DataError, match="shots must be a positive integer"):
        EpisodeSampler(store(), 3, 0, 1)


def test_rotations_become_new_classes():
    data = store(classes=2, per_class=2)
    data.images[0, 0, 0, 1] = 200
    rot = data.rotated()
    assert rot.num_classes == 8 and rot.classes[1] == "c0@rot90"
    first = rot.images[rot.indices_of(1)[0], 0]
    assert torch.equal(first, torch.rot90(data.images[0, 0], 1))


def test_store_round_trip(tmp_path):
    data = store(groups=["a", "a", "a", "b", "b", "b"])
    data.save(tmp_path / "x.pt")
    back = ImageClasses.load(tmp_path / "x.pt")
    assert torch.equal(back.images, data.images) and back.classes == data.classes and back.groups == data.groups


def test_sinusoid_tasks_follow_the_maml_distribution():
    tasks = SinusoidTasks(shots=10, query=10).sample_batch(500, torch.Generator().manual_seed(0))
    x = torch.cat([tasks.support[0], tasks.query[0]], 1)
    y = torch.cat([tasks.support[1], tasks.query[1]], 1)
    assert x.min() >= -5 and x.max() <= 5
    amplitude = y.abs().amax(dim=(1, 2))
    assert amplitude.max() <= 5.0 + 1e-6 and amplitude.min() > 0.0
    assert tasks.support[0].shape == (500, 10, 1)
    # y = A sin(x - b) with one A and b per task: recover them by least squares and check the ranges
    feats = torch.cat([torch.sin(x), torch.cos(x)], -1)
    coef = torch.linalg.lstsq(feats, y).solution.squeeze(-1)  # A cos b, -A sin b
    a = coef.norm(dim=1)
    b = torch.atan2(-coef[:, 1], coef[:, 0])
    assert a.min() >= 0.1 - 1e-4 and a.max() <= 5.0 + 1e-4
    assert b.min() >= -1e-4 and b.max() <= math.pi + 1e-4


def test_task_stack_and_unstack_round_trip():
    t = Task((torch.randn(3, 2), torch.arange(3)), (torch.randn(4, 2), torch.arange(4)))
    batch = Task.stack([t, t])
    assert batch.support[0].shape == (2, 3, 2)
    back = batch.unstack()
    assert torch.equal(back[1].query[0], t.query[0])


def test_ragged_classes_give_distinct_images_of_one_class_per_label():
    # classes of 6 to 11 images whose pixels say (class, image)
    counts = torch.arange(30) % 6 + 6
    targets = torch.arange(30).repeat_interleave(counts)
    images = torch.zeros(len(targets), 1, 1, 2, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = targets.to(torch.uint8), torch.arange(len(targets)).to(torch.uint8)
    sampler = EpisodeSampler(ImageClasses(images, targets, [str(c) for c in range(30)]), 5, 2, 4)
    g = torch.Generator().manual_seed(0)
    seen_last = set()
    for _ in range(300):
        (xs, ys), (xq, yq) = sampler.sample(g)
        x = torch.cat([xs.view(5, 2, 2), xq.view(5, 4, 2)], 1).mul(255).round().long()
        assert (x[:, :, 0] == x[:, :1, 0]).all() and len(set(x[:, 0, 0].tolist())) == 5
        assert all(len(set(row.tolist())) == 6 for row in x[:, :, 1])
        seen_last.update(x[:, :, 1].flatten().tolist())
    # the last images of the largest classes are drawn too: padding does not hide real entries
    assert int(len(targets) - 1) in seen_last


def test_pixel_nn_takes_the_class_of_the_nearest_support_example():
    from metaphi.algorithms.base import CLASSIFICATION
    from metaphi.algorithms.nearest import PixelNN

    xs = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [9.0, 1.0]])
    ys = torch.tensor([0, 1, 2, 1])
    xq = torch.tensor([[1.0, 1.0], [8.0, 0.0], [1.0, 8.0], [9.0, 2.0]])
    yq = torch.tensor([0, 1, 2, 1])
    algo = PixelNN(CLASSIFICATION)
    logits = algo.predict({}, (xs, ys), xq)
    assert logits.argmax(1).tolist() == [0, 1, 2, 1]
    # minus the distance to the class's nearest example
    assert float(logits[3, 1]) == pytest.approx(-1.0)
    assert float(algo.evaluate({}, Task((xs, ys), (xq, yq)))) == 1.0


def test_rotations_multiply_the_classes_with_exactly_rotated_images_and_keep_groups():
    data = store(classes=3, per_class=2, groups=["a", "a", "b"])
    data.images[:, 0, 0, 1] = 200  # an asymmetric mark, so each rotation differs
    rot = data.rotated()
    assert rot.num_classes == 12 and rot.counts.tolist() == [2] * 12 and rot.images.dtype == torch.uint8
    assert rot.groups == ["a"] * 8 + ["b"] * 4
    for c in range(3):
        for i, deg in enumerate((0, 90, 180, 270)):
            assert rot.classes[4 * c + i] == f"c{c}@rot{deg}"
            got = rot.images[rot.indices_of(4 * c + i)]
            want = torch.rot90(data.images[data.indices_of(c)], deg // 90, dims=(2, 3))
            assert torch.equal(got, want)
    assert rot.is_rotated and not data.is_rotated
    wide = ImageClasses(torch.zeros(2, 1, 4, 6, dtype=torch.uint8), torch.tensor([0, 1]), ["x", "y"])
    with pytest.raises(DataError, match="rotating by 90 degrees needs square images, these are 4 x 6"):
        wide.rotated()
    assert wide.rotated((0, 180)).num_classes == 4  # half turns keep the shape
    with pytest.raises(DataError, match="multiples of 90 degrees"):
        data.rotated((0, 45))


def test_reflections_add_each_rotation_mirrored_as_a_class_of_its_own():
    data = store(classes=2, per_class=3, groups=["a", "b"])
    data.images[:, 0, 0, 1] = 200  # asymmetric under every rotation and reflection
    eight = data.rotated(reflect=True)
    assert eight.num_classes == 16 and eight.counts.tolist() == [3] * 16 and eight.groups == ["a"] * 8 + ["b"] * 8
    for c in range(2):
        for i, deg in enumerate((0, 90, 180, 270)):
            turned = torch.rot90(data.images[data.indices_of(c)], deg // 90, dims=(2, 3))
            assert eight.classes[8 * c + i] == f"c{c}@rot{deg}"
            assert eight.classes[8 * c + 4 + i] == f"c{c}@rot{deg}@mirror"
            assert torch.equal(eight.images[eight.indices_of(8 * c + i)], turned)
            assert torch.equal(eight.images[eight.indices_of(8 * c + 4 + i)], turned.flip(3))
    # the eight views of a class are eight different images (the dihedral group of the square)
    views = {tuple(eight.images[eight.indices_of(k)][0].flatten().tolist()) for k in range(8)}
    assert len(views) == 8 and eight.is_rotated


def test_benchmark_reflections_need_rotations_and_touch_training_only():
    from metaphi.tasks.benchmark import image_benchmark

    splits = {name: store(classes=6, per_class=5) for name in ("train", "val", "test")}
    bench = image_benchmark("tiny", splits, {})
    eight = bench.with_training(rotations=True, reflections=True)
    assert eight.num_classes("train") == 48 and eight.splits["val"] is splits["val"]
    assert eight.training["reflections"] is True and bench.with_training(rotations=True).training["reflections"] is False
    with pytest.raises(DataError, match="reflections are made of the rotated classes"):
        bench.with_training(reflections=True)


def test_benchmark_rotations_touch_the_training_split_only():
    from metaphi.tasks.benchmark import image_benchmark

    splits = {name: store(classes=6, per_class=5, groups=["a"] * 3 + ["b"] * 3) for name in ("train", "val", "test")}
    bench = image_benchmark("tiny", splits, {})
    rotated = bench.with_training(rotations=True)
    assert rotated.num_classes("train") == 24 and rotated.splits["train"].groups[:4] == ["a"] * 4
    assert rotated.splits["val"] is splits["val"] and rotated.splits["test"] is splits["test"]
    assert bench.num_classes("train") == 6  # the benchmark it came from is unchanged
    assert rotated.episodes("train", 20, 1, 1).data.num_classes == 24  # 20-way training tasks now fit
    with pytest.raises(DataError, match="20-way tasks need 20 classes but it has 6"):
        rotated.episodes("val", 20, 1, 1)
    with pytest.raises(DataError, match="already makes each rotation of its training classes a class of its own"):
        rotated.with_training(rotations=True)


def test_sample_batch_without_augmentation_is_the_episodes_stacked():
    sampler = EpisodeSampler(store(), 3, 1, 2)
    assert sampler.augment is None
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batch = sampler.sample_batch(3, g1)
    single = Task.stack([sampler.sample(g2) for _ in range(3)])
    assert torch.equal(batch.support[0], single.support[0]) and torch.equal(batch.query[0], single.query[0])
    assert torch.equal(g1.get_state(), g2.get_state())


def _groups_of_episodes(sampler, n, seed=0):
    """How many of ``n`` episodes stay in one group (classes 0-2 or 3-5 of a 6-class store)."""
    g, within = torch.Generator().manual_seed(seed), 0
    for _ in range(n):
        classes = {int(round(v * 255)) // 5 for v in sampler.sample(g).support[0][:, 0, 0, 0].tolist()}
        within += classes in ({0, 1, 2}, {3, 4, 5})
    return within


def test_a_fraction_of_within_group_episodes():
    data = store(groups=["a", "a", "a", "b", "b", "b"])
    # across all six classes, 3 of them fall in one group by chance with probability 2 / C(6, 3) = 0.1
    mixed = _groups_of_episodes(EpisodeSampler(data, 3, 1, 1, within_group=0.5), 400)
    plain = _groups_of_episodes(EpisodeSampler(data, 3, 1, 1), 400)
    assert 400 * 0.45 < mixed < 400 * 0.65 and plain < 400 * 0.2
    assert _groups_of_episodes(EpisodeSampler(data, 3, 1, 1, within_group=1.0), 50) == 50
    # True is the fraction 1: the same episodes from the same generator
    a = EpisodeSampler(data, 3, 1, 1, within_group=True).sample_batch(5, torch.Generator().manual_seed(3))
    b = EpisodeSampler(data, 3, 1, 1, within_group=1.0).sample_batch(5, torch.Generator().manual_seed(3))
    assert torch.equal(a.support[0], b.support[0]) and torch.equal(a.query[0], b.query[0])


def test_within_group_fraction_checks():
    with pytest.raises(DataError, match=r"fraction of within-group episodes must be in \[0, 1\], got 1.5"):
        EpisodeSampler(store(groups=["a"] * 6), 3, 1, 1, within_group=1.5)
    with pytest.raises(DataError, match="within-group episodes need class groups"):
        EpisodeSampler(store(), 3, 1, 1, within_group=0.5)
    with pytest.raises(DataError, match="no group has 4 classes"):
        EpisodeSampler(store(groups=["a", "a", "a", "b", "b", "b"]), 4, 1, 1, within_group=0.5)
