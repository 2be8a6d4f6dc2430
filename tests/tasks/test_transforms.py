"""Random affine augmentation of training episodes (metaphi.tasks.transforms) and the --rotations /
--augment options of ``metaphi run``: geometry against an independent computation, determinism from the
sampler's generator, training episodes only, and a resumed augmented run equal to an uninterrupted one."""
import math

import pytest
import torch
import yaml

from metaphi.tasks import EpisodeSampler, ImageClasses
from metaphi.tasks.benchmark import image_benchmark
from metaphi.tasks.transforms import RandomAffine, transform_images


def blobs(n=6, size=16, seed=0):
    """Float images [n, 1, size, size] in [0, 1]: a few random soft strokes each, away from the edges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(3):
            r, c = torch.randint(5, size - 5, (2,), generator=g).tolist()
            x[i, 0, r - 1:r + 2, c - 2:c + 2] = 1.0
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    return x / x.amax((1, 2, 3), keepdim=True)


def store(classes=8, per_class=6, size=16, groups=None, seed=0):
    images = (blobs(classes * per_class, size, seed) * 255).round().to(torch.uint8)
    targets = torch.arange(classes * per_class) // per_class
    return ImageClasses(images, targets, [f"c{i}" for i in range(classes)], groups)


def bench(size=16, groups=None):
    splits = {name: store(8, 6, size, groups, seed) for seed, name in enumerate(("train", "val", "test"))}
    return image_benchmark("tiny", splits, {}, hidden=8, invert=True)


def test_transform_keeps_shape_dtype_and_range_and_moves_the_images():
    x = blobs(10)
    out = RandomAffine()(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(out, x))  # every image moved
    # leading dimensions (tasks, images) are kept and each image gets its own draw
    batched = RandomAffine()(x.view(2, 5, 1, 16, 16), torch.Generator().manual_seed(0))
    assert batched.shape == (2, 5, 1, 16, 16) and torch.equal(batched.view_as(out), out)


def test_strength_zero_is_the_identity_and_small_strengths_are_close_to_it():
    x = blobs(4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(RandomAffine(0.0)(x, g), x)
    assert torch.allclose(RandomAffine(1e-6)(x, g), x, atol=1e-4)
    assert not torch.allclose(RandomAffine(1.0)(x, g), x, atol=1e-2)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 2\]"):
        RandomAffine(2.5)


def test_transform_is_deterministic_for_a_seeded_generator_and_uses_no_global_rng():
    x = blobs(6)
    torch.manual_seed(1)
    a = RandomAffine()(x, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = RandomAffine()(x, torch.Generator().manual_seed(5))
    c = RandomAffine()(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def forward_maps(theta, height, width):
    """The drawn maps recovered from theta (output -> input, normalised coordinates): the forward
    linear part and shift in pixel units, computed independently of RandomAffine.matrices."""
    half = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64)
    inv_pixels = theta[:, :, :2] * half.view(1, 2, 1) / half.view(1, 1, 2)  # D L D^-1
    forward = torch.linalg.inv(inv_pixels)
    shift = -(forward @ (theta[:, :, 2:] * half.view(1, 2, 1))).squeeze(-1)  # where the centre goes, in pixels
    return forward, shift


def test_the_drawn_maps_stay_in_the_documented_ranges():
    t = RandomAffine()
    theta = t.matrices(4000, 20, 20, torch.Generator().manual_seed(0))
    forward, shift = forward_maps(theta, 20, 20)
    zoom = forward.det().sqrt()  # rotation and shear have determinant 1
    assert zoom.min() >= 0.9 - 1e-9 and zoom.max() <= 1.1 + 1e-9 and zoom.max() - zoom.min() > 0.19
    assert shift.abs().max() <= 0.1 * 20 + 1e-9 and shift.abs().max() > 0.19 * 10
    # the first column of zoom * R(angle) @ shear is zoom * (cos, sin): the rotation angle
    angle = torch.rad2deg(torch.atan2(forward[:, 1, 0], forward[:, 0, 0]))
    assert angle.abs().max() <= 15 + 1e-9 and angle.abs().max() > 14.5
    # shear: R^-1 A / zoom = [[1, tan(shear)], [0, 1]]
    rad = torch.deg2rad(angle)
    rot_inv = torch.stack([torch.stack([rad.cos(), rad.sin()], -1), torch.stack([-rad.sin(), rad.cos()], -1)], -2)
    sheared = rot_inv @ forward / zoom.view(-1, 1, 1)
    assert torch.allclose(sheared[:, 1, 0], torch.zeros(4000, dtype=torch.float64), atol=1e-9)
    slant = torch.rad2deg(torch.atan(sheared[:, 0, 1]))
    assert slant.abs().max() <= 10 + 1e-9 and slant.abs().max() > 9.5
    # strength scales every range
    half = RandomAffine(0.5).matrices(4000, 20, 20, torch.Generator().manual_seed(0))
    _, half_shift = forward_maps(half, 20, 20)
    assert half_shift.abs().max() <= 0.05 * 20 + 1e-9


def test_a_dot_lands_where_the_drawn_map_sends_it():
    size = 31
    x = torch.zeros(8, 1, size, size)
    x[:, 0, 10:13, 19:22] = 1.0  # a 3x3 dot centred at row 11, column 20
    t = RandomAffine()
    out = t(x, torch.Generator().manual_seed(3))
    forward, shift = forward_maps(t.matrices(8, size, size, torch.Generator().manual_seed(3)), size, size)
    centre = (size - 1) / 2
    expected = (forward @ torch.tensor([20 - centre, 11 - centre], dtype=torch.float64)) + shift + centre  # (col, row)
    rows, cols = torch.arange(size, dtype=torch.float64).view(size, 1), torch.arange(size, dtype=torch.float64)
    mass = out[:, 0].double()
    found = torch.stack([(mass * cols).sum((1, 2)), (mass * rows).sum((1, 2))], -1) / mass.sum((1, 2)).view(-1, 1)
    assert torch.allclose(found, expected, atol=0.3), (found, expected)


def test_transform_images_gives_each_image_its_own_draw_in_one_call():
    xs, xq = blobs(3), blobs(5, seed=1)
    a, b = transform_images(RandomAffine(), torch.Generator().manual_seed(0), xs, xq)
    together = RandomAffine()(torch.cat([xs, xq]), torch.Generator().manual_seed(0))
    assert a.shape == xs.shape and b.shape == xq.shape and torch.equal(torch.cat([a, b]), together)


def test_augmented_training_episodes_keep_labels_and_change_images():
    plain, augmented = bench(), bench().with_training(augment=True)
    for batch in (False, True):
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        before, after = plain.episodes("train", 3, 2, 2), augmented.episodes("train", 3, 2, 2)
        a, b = (before.sample_batch(4, g1), after.sample_batch(4, g2)) if batch else (before.sample(g1), after.sample(g2))
        for (xa, ya), (xb, yb) in ((a.support, b.support), (a.query, b.query)):
            assert xa.shape == xb.shape and xb.dtype == torch.float32 and torch.equal(ya, yb)
            assert not torch.allclose(xa, xb, atol=1e-2)
            ratio = xb.flatten(-3).sum(-1) / xa.flatten(-3).sum(-1)  # about as much ink: zoom² in [0.81, 1.21]
            assert ratio.min() > 0.75 and ratio.max() < 1.3
        # exactly the plain episode's images, each moved by its own map drawn from the same generator
        # right after the episode's own draws
        expected = transform_images(RandomAffine(), g1, a.support[0], a.query[0])
        assert torch.equal(b.support[0], expected[0]) and torch.equal(b.query[0], expected[1])
    # the pooled training batches (pre-training, self-supervised) are augmented too, labels kept
    pa = plain.pooled("train", 8).sample_batch(2, torch.Generator().manual_seed(0))
    pb = augmented.pooled("train", 8).sample_batch(2, torch.Generator().manual_seed(0))
    assert torch.equal(pa.query[1], pb.query[1]) and not torch.allclose(pa.query[0], pb.query[0], atol=1e-2)
    assert pb.query[0].shape == pa.query[0].shape


def test_validation_and_test_episodes_are_never_augmented():
    plain = bench()
    augmented = plain.with_training(rotations=True, augment=True)
    for split in ("val", "test"):
        sampler = augmented.episodes(split, 3, 1, 2)
        assert sampler.augment is None and sampler.data is plain.splits[split]
        a = plain.episodes(split, 3, 1, 2).sample_batch(3, torch.Generator().manual_seed(0))
        b = sampler.sample_batch(3, torch.Generator().manual_seed(0))
        assert torch.equal(a.support[0], b.support[0]) and torch.equal(a.query[0], b.query[0])
        assert augmented.pooled(split, 4).augment is None
    assert augmented.episodes("train", 3, 1, 2).augment is not None
    # the benchmark it came from is unchanged: off by default
    assert plain.train_augment is None and plain.splits["train"].num_classes == 8
    assert plain.with_training() is plain


def test_augment_pads_with_paper_for_ink_high_data_and_with_the_edge_otherwise():
    ink = bench().with_training(augment=True)
    assert ink.train_augment.padding == "zeros"
    light = image_benchmark("light", bench().splits, {}, invert=False).with_training(augment=True)
    assert light.train_augment.padding == "border"
    x = torch.ones(4, 1, 16, 16)  # a blank light page stays a blank light page
    assert torch.allclose(light.train_augment(x, torch.Generator().manual_seed(0)), x)


# -- through metaphi run ------------------------------------------------------------------------------------

def test_run_with_rotations_and_augment_writes_them_to_its_config(tmp_path, capsys):
    from metaphi.cli import main

    out = tmp_path / "run"
    assert main(["run", "protonet", "--benchmark", "glyphs", "--reflections", "--augment", "--augment-strength", "0.5",
                 "--augment-elastic", "0.05", "--iterations", "2", "--eval-tasks", "4", "--val-tasks", "2",
                 "--no-baselines", "--quiet", "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rotations"] is True and saved["augment"] is True and saved["augment_strength"] == 0.5
    assert saved["reflections"] is True and saved["augment_elastic"] == 0.05  # --reflections brings rotations
    # off by default, and written so
    plain = tmp_path / "plain"
    assert main(["run", "protonet", "--benchmark", "glyphs", "--iterations", "1", "--eval-tasks", "2", "--val-tasks",
                 "2", "--no-baselines", "--quiet", "--out", str(plain)]) == 0
    saved = yaml.safe_load((plain / "config.yaml").read_text())
    assert saved["rotations"] is False and saved["augment"] is False
    assert saved["reflections"] is False and saved["augment_elastic"] == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--augment-strength", "0.5"], "--augment-strength applies with --augment only"),
    (["--augment", "--augment-strength", "0"], r"--augment-strength must be a positive number"),
    (["--augment", "--augment-strength", "2.5"], r"--augment-strength must be in \(0, 2\]"),
    (["--benchmark", "sinusoid", "--rotations"], "benchmark 'sinusoid' has none"),
])
def test_run_refuses_what_does_not_apply(tmp_path, capsys, flags, message):
    from metaphi.cli import main

    assert main(["run", "protonet", "--iterations", "1", "--eval-tasks", "2", "--no-baselines", "--quiet",
                 "--out", str(tmp_path / "x"), *flags]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_load_benchmark_applies_the_options_for_every_family():
    from metaphi.experiments.fewshot import RunConfig, load_benchmark

    b = load_benchmark(RunConfig(algorithm="pretrain", benchmark="glyphs", rotations=True, augment=True))
    plain = load_benchmark(RunConfig(algorithm="pretrain", benchmark="glyphs"))
    assert b.num_classes("train") == 4 * plain.num_classes("train")  # the pre-training head sees every rotation
    assert b.num_classes("val") == plain.num_classes("val") and b.num_classes("test") == plain.num_classes("test")
    assert b.pooled("train", 4).augment is not None and plain.train_augment is None


def test_a_resumed_augmented_run_equals_an_uninterrupted_one(tmp_path):
    from metaphi.algorithms import create_algorithm
    from metaphi.outer import build_estimator
    from metaphi.train import TrainConfig, meta_train

    def setup(augment=True):
        b = bench().with_training(rotations=True, augment=augment)
        torch.manual_seed(0)
        algo = create_algorithm("protonet", b, 3, 0.1, 1, 1)
        return algo, algo.training_tasks(b, 3, 1, 2)

    est = build_estimator("first-order")
    algo, sample = setup()
    config = lambda n: TrainConfig(iterations=n, meta_batch=2, checkpoint_every=3, meta_lr=1e-2)
    straight = meta_train(algo, est, sample, config(6), out_dir=str(tmp_path / "a"), progress=False)
    algo, sample = setup()
    meta_train(algo, est, sample, config(3), out_dir=str(tmp_path / "b"), progress=False)
    algo, sample = setup()
    resumed = meta_train(algo, est, sample, config(6), out_dir=str(tmp_path / "b"), resume=True, progress=False)
    for k in straight.phi:
        assert torch.equal(straight.phi[k], resumed.phi[k]), k
    # the augmentation was on the path trained: without it the same seed ends elsewhere
    algo, sample = setup(augment=False)
    unaugmented = meta_train(algo, est, sample, config(6), progress=False)
    assert any(not torch.equal(straight.phi[k], unaugmented.phi[k]) for k in straight.phi)


def test_rotation_within_group_sampling_still_works_on_the_training_split():
    groups = ["a"] * 4 + ["b"] * 4
    b = bench(groups=groups).with_training(rotations=True)
    train = b.splits["train"]
    assert train.groups == [g for g in groups for _ in range(4)]
    sampler = EpisodeSampler(train, 5, 1, 1, within_group=True)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        classes = sampler._classes(g).tolist()
        assert len({train.groups[c] for c in classes}) == 1 and len(set(classes)) == 5
        seen.update(c % 4 for c in classes)
    assert seen == {0, 1, 2, 3}  # rotated classes are drawn too
    assert sampler.sample(g).support[0].shape == (5, 1, 16, 16)
    assert math.isclose(train.num_classes / 4, 8)


def test_elastic_field_is_smooth_bounded_and_drawn_from_the_generator():
    t = RandomAffine(strength=1.0, shift=0, scale=0, rotate=0, shear=0, elastic=0.1)
    field = t.displacements(50, 28, 28, torch.Generator().manual_seed(0))
    assert field.shape == (50, 28, 28, 2)
    # control points move by up to 10% of the size, 0.2 in normalised units; bicubic overshoots a little
    assert 0.12 < float(field.abs().max()) < 0.26
    # smooth: neighbouring pixels move alike, far less than the field varies across the image
    step = (field[:, 1:] - field[:, :-1]).abs().max()
    assert float(step) < 0.25 * float(field.abs().max())
    again = t.displacements(50, 28, 28, torch.Generator().manual_seed(0))
    assert torch.equal(field, again)
    x = blobs(8, 28)
    out = t(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert not torch.allclose(out, x)
    # elastic only: with every affine range 0 and no elastic field the images come back as they are
    still = RandomAffine(strength=1.0, shift=0, scale=0, rotate=0, shear=0)(x, torch.Generator().manual_seed(1))
    assert torch.allclose(still, x, atol=1e-5)


def test_elastic_zero_draws_nothing_more_so_affine_runs_are_unchanged():
    x = blobs(6)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(RandomAffine()(x, g1), RandomAffine(elastic=0.0)(x, g2))
    assert torch.equal(g1.get_state(), g2.get_state())
    with pytest.raises(ValueError, match="elastic displacement must be in"):
        RandomAffine(elastic=0.5)


def test_reflections_without_rotations_and_elastic_without_augmentation_are_refused(tmp_path, capsys):
    from metaphi.cli import main

    capsys.readouterr()
    for flags, words in [(["--no-rotations", "--reflections"], "--reflections mirrors the rotated classes"),
                         (["--augment-elastic", "0.05", "--no-augment"], "--augment-elastic applies with --augment"),
                         (["--augment", "--augment-elastic", "0.3"], "--augment-elastic must be in [0, 0.2]")]:
        assert main(["run", "protonet", "--benchmark", "glyphs", *flags, "--iterations", "1",
                     "--out", str(tmp_path / "refused")]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()
