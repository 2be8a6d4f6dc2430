"""Multi-domain data: transforms, instance splits, leave-one-domain-out without leaks, samplers, readers."""
import os

import pytest
import torch

from metaphi.tasks import DataError, ImageClasses
from metaphi.tasks import domains as dm
import shared_data


pytestmark = pytest.mark.usefixtures("one_thread")

OMNIGLOT = str(shared_data.OMNIGLOT)


def store(n_classes=4, per_class=12, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n_classes * per_class, 1, size, size, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return ImageClasses(images, labels, [f"c{i}" for i in range(n_classes)])


def keys(images):
    return {bytes(im.contiguous().numpy().tobytes()) for im in images}


# ------------------------------------------------------------------------------------- transforms
def test_rotation_by_right_angles_is_rot90_and_turns_counter_clockwise():
    x = store().images
    for k in (1, 2, 3):
        assert torch.equal(dm.rotate(x, 90 * k), torch.rot90(x, k, (2, 3)))
    assert torch.equal(dm.rotate(x, 360), x)
    dot = torch.zeros(1, 1, 9, 9, dtype=torch.uint8)
    dot[0, 0, 4, 7] = 255  # right of centre
    up = dm.rotate(dot, 90)
    assert up[0, 0, 1, 4] == 255  # above centre: counter-clockwise on screen


def test_rotation_by_any_angle_keeps_a_centred_disc():
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    disc = (((yy - 13.5) ** 2 + (xx - 13.5) ** 2) < 36).to(torch.uint8).mul(255).view(1, 1, 28, 28)
    r = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2).sqrt()
    for angle in (15, 30, 45, 75):
        turned = dm.rotate(disc, angle)[0, 0]
        # only the rim is resampled: inside stays ink, outside stays paper
        assert (turned[r < 4.5] == 255).all() and (turned[r > 7.5] == 0).all()
    bar = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    bar[0, 0, 13:15, 4:24] = 255
    turned = dm.rotate(bar, 45).float()[0, 0]
    # the bar's ink now lies along the diagonal from bottom-left to top-right
    assert turned[20, 7] > 100 and turned[7, 20] > 100 and turned[7, 7] < 20
    assert turned.sum() == pytest.approx(float(bar.float().sum()), rel=0.1)


def test_styles_are_distinct_deterministic_and_keep_the_shape():
    x = store().images
    outs = {s: dm.stylize(x, s, seed=3) for s in dm.STYLES}
    assert torch.equal(outs["plain"], x)
    assert torch.equal(outs["inverted"], 255 - x)
    for s in dm.STYLES:
        assert outs[s].dtype == torch.uint8 and outs[s].shape == x.shape
        assert torch.equal(dm.stylize(x, s, seed=3), outs[s])
    for a in dm.STYLES:
        for b in dm.STYLES:
            if a < b:
                assert not torch.equal(outs[a], outs[b]), (a, b)
    assert (outs["bold"] >= x).all()
    with pytest.raises(DataError, match="unknown style"):
        dm.stylize(x, "watercolour")


# ---------------------------------------------------------------------------------- splitting
def test_instance_split_is_disjoint_complete_and_per_class():
    data = store(per_class=12)
    roles = dm.instance_split(data, adapt=3, test=4, seed=1)
    all_idx = torch.cat(list(roles.values()))
    assert len(all_idx) == len(data.targets) and len(set(all_idx.tolist())) == len(all_idx)
    for role, n in (("test", 4), ("adapt", 3), ("train", 5)):
        assert torch.equal(torch.bincount(data.targets[roles[role]]), torch.full((4,), n))
    with pytest.raises(DataError, match="has 12 images"):
        dm.instance_split(data, adapt=6, test=6)


@pytest.mark.parametrize("kind", ["rotated", "styles"])
def test_leave_one_out_never_leaks_the_held_out_domain_into_training(kind):
    data = store(n_classes=3, per_class=10)
    ds = (dm.rotated_domains(data, adapt=2, test=3) if kind == "rotated"
          else dm.style_domains(data, ("plain", "bold", "slant", "inverted"), adapt=2, test=3))
    # the images no training batch may ever show: every test and adaptation instance in any domain
    unseen_anywhere = set()
    for part in ds.parts:
        unseen_anywhere |= keys(part["test"].images) | keys(part["adapt"].images)
    for t, held in enumerate(ds.domains):
        split = ds.leave_one_out(held)
        assert held not in split.source_names and len(split.sources) == len(ds.domains) - 1
        held_images = keys(torch.cat([ds.parts[t][r].images for r in ("train", "adapt", "test")]))
        allowed = set()
        for d in split.source_names:
            allowed |= keys(ds.parts[ds.domains.index(d)]["train"].images)
        assert allowed.isdisjoint(held_images)
        seen = set()
        g = torch.Generator().manual_seed(t)
        sampler = split.source_batches(batch=5)
        for _ in range(25):
            task = sampler.sample(g)
            for x in (task.support[0], task.query[0]):
                seen |= keys(x.flatten(0, 1).mul(255).round().to(torch.uint8))
        assert seen <= allowed
        assert not seen & held_images and not seen & unseen_anywhere
        assert split.target_test is ds.parts[t]["test"] and split.target_adapt is ds.parts[t]["adapt"]


def test_source_batches_split_the_sources_anew_every_time():
    ds = dm.rotated_domains(store(n_classes=3, per_class=10), angles=(0, 20, 40, 60), adapt=2, test=3)
    sampler = ds.leave_one_out("60").source_batches(batch=4, meta_test=1)
    g = torch.Generator().manual_seed(0)
    held = set()
    for _ in range(30):
        train, test = sampler.split(g)
        assert len(test) == 1 and len(train) == 2 and not set(train) & set(test)
        held.add(test[0])
    assert held == {0, 1, 2}
    task = sampler.sample_batch(3, g)
    assert task.support[0].shape == (3, 2, 4, 1, 12, 12) and task.query[0].shape == (3, 1, 4, 1, 12, 12)
    assert task.support[1].dtype == torch.int64
    assert 0.0 <= float(task.support[0].min()) <= float(task.support[0].max()) <= 1.0
    # draws depend on the generator alone
    a = sampler.sample(torch.Generator().manual_seed(5))
    b = sampler.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a.support[0], b.support[0]) and torch.equal(a.query[1], b.query[1])
    with pytest.raises(DataError, match="no meta-train"):
        ds.leave_one_out(0).source_batches(4, meta_test=3)
    with pytest.raises(DataError, match="fewer than a batch"):
        ds.leave_one_out(0).source_batches(1000)


def test_target_tasks_take_k_labelled_examples_per_class_and_the_whole_test_set():
    ds = dm.rotated_domains(store(n_classes=3, per_class=10), adapt=3, test=4)
    split = ds.leave_one_out("45")
    task = split.target_tasks(2).sample(torch.Generator().manual_seed(0))
    (xs, ys), (xq, yq) = task
    assert torch.equal(torch.bincount(ys), torch.tensor([2, 2, 2]))
    assert keys(xs.mul(255).round().to(torch.uint8)) <= keys(split.target_adapt.images)
    assert len(yq) == 12 and keys(xq.mul(255).round().to(torch.uint8)) == keys(split.target_test.images)
    zero = split.target_tasks(0).sample(torch.Generator())
    assert len(zero.support[1]) == 0
    with pytest.raises(DataError, match="fewer than 4 shots"):
        split.target_tasks(4)


def test_domains_by_name_or_position():
    ds = dm.rotated_domains(store(), adapt=2, test=3)
    assert ds.domains == ["0°", "15°", "30°", "45°", "60°", "75°"]
    assert ds.index("30°") == ds.index("30") == ds.index(2) == 2
    with pytest.raises(DataError, match="unknown domain"):
        ds.index("90")
    with pytest.raises(DataError, match="at least 2 domains"):
        dm.DomainSet("one", ["a"], [ds.parts[0]])


# ------------------------------------------------------------------------------------- readers
def test_glyph_style_domains_build_offline():
    ds = dm.style_domains(dm.glyph_classes(6, alphabets=1), adapt=3, test=4)
    assert ds.num_classes == 6 and ds.domains == list(dm.STYLES)
    assert len(ds.parts[0]["test"].targets) == 24 and len(ds.parts[0]["train"].targets) == 6 * 13


def _write_png(path, value, size=10):
    from PIL import Image
    import numpy as np

    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_folder_domains(tmp_path):
    for d, base in (("photo", 0), ("sketch", 100)):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / d / c)
            for i in range(6):
                _write_png(tmp_path / d / c / f"{i}.png", base + 10 * i + (50 if c == "dog" else 0))
    ds = dm.folder_domains(tmp_path, image_size=8, adapt=1, test=2)
    assert ds.domains == ["photo", "sketch"] and ds.classes == ["cat", "dog"] and ds.image_shape == (1, 8, 8)
    split = ds.leave_one_out("sketch")
    assert keys(split.sources[0].images).isdisjoint(keys(torch.cat([p.images for p in ds.parts[1].values()])))
    os.makedirs(tmp_path / "cartoon" / "cat")
    for i in range(6):
        _write_png(tmp_path / "cartoon" / "cat" / f"{i}.png", 200)
    with pytest.raises(DataError, match="different class folders"):
        dm.folder_domains(tmp_path, image_size=8, adapt=1, test=2)
    with pytest.raises(DataError, match="not a folder"):
        dm.folder_domains(tmp_path / "nowhere")


@pytest.mark.skipif(not os.path.exists(os.path.join(OMNIGLOT, "images_background_small1.zip")),
                    reason="the Omniglot small1 archive is not in ../shared/data/omniglot")
def test_rotated_omniglot_characters():
    data = dm.omniglot_classes(OMNIGLOT, ["Greek"])
    assert data.num_classes == 24 and set(data.groups) == {"Greek"}
    ds = dm.rotated_domains(dm.choose_classes(data, 10), adapt=5, test=6)
    assert ds.num_classes == 10 and len(ds.parts[3]["train"].targets) == 10 * 9
    with pytest.raises(DataError, match="no alphabet"):
        dm.omniglot_classes(OMNIGLOT, ["Klingon"])
