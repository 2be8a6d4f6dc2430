import os

import pytest
import torch

from metaphi.tasks import DataError, EpisodeSampler, ImageClasses
from metaphi.tasks import glyphs
from metaphi.tasks.glyphs import generate_glyphs, glyph_splits, load_glyphs, pixel_nn_accuracy

SMALL = dict(alphabets=4, characters=6, drawers=5)


@pytest.fixture(scope="module")
def small() -> ImageClasses:
    return generate_glyphs(**SMALL, seed=3)


def test_same_seed_gives_identical_images_whatever_the_global_rng(small):
    torch.manual_seed(12345)  # the generator must not read the global RNG
    again = generate_glyphs(**SMALL, seed=3)
    assert torch.equal(small.images, again.images)
    assert torch.equal(small.targets, again.targets)
    assert small.classes == again.classes and small.groups == again.groups


def test_different_seeds_differ(small):
    other = generate_glyphs(**SMALL, seed=4)
    assert not torch.equal(small.images, other.images)


def test_shapes_dtypes_names_and_ink(small):
    n = 4 * 6 * 5
    assert small.images.shape == (n, 1, 28, 28) and small.images.dtype == torch.uint8
    assert small.targets.dtype == torch.int64 and small.targets.shape == (n,)
    assert small.num_classes == 24 and small.counts.tolist() == [5] * 24
    assert small.classes[0] == "alphabet00/char00" and small.classes[-1] == "alphabet03/char05"
    assert small.groups == [f"alphabet{a:02d}" for a in range(4) for _ in range(6)]
    # Ink high on paper 0: every image has solid strokes, most of it is paper, and the glyph stays
    # off the outermost pixels.
    flat = small.images.flatten(1)
    assert (flat.amax(1) > 200).all()
    ink = (flat > 127).float().mean(1)
    assert (ink > 0.02).all() and (ink < 0.4).all()
    frame = torch.cat([small.images[:, 0, 0], small.images[:, 0, -1], small.images[:, 0, :, 0],
                       small.images[:, 0, :, -1]], 1)
    assert frame.amax() < 128
    # Antialiased: there are grey levels, not just 0 and 255.
    assert ((flat > 30) & (flat < 225)).any(1).all()


def test_other_image_size():
    data = generate_glyphs(alphabets=1, characters=2, drawers=2, size=56)
    assert data.images.shape == (4, 1, 56, 56)
    assert (data.images.flatten(1).amax(1) > 200).all()


def test_bad_arguments_fail_loudly():
    with pytest.raises(DataError):
        generate_glyphs(alphabets=0)


def test_cache_is_written_once_then_loaded(tmp_path, monkeypatch):
    first = load_glyphs(cache_dir=tmp_path, **SMALL, seed=3)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith(f"glyphs-v{glyphs.FORMAT_VERSION}-") and files[0].endswith(".pt")
    stamp = os.stat(tmp_path / files[0]).st_mtime_ns

    def must_not_generate(**kwargs):
        raise AssertionError("the cache should have been loaded")

    monkeypatch.setattr(glyphs, "generate_glyphs", must_not_generate)
    second = load_glyphs(cache_dir=tmp_path, **SMALL, seed=3, progress=True)  # progress is not part of the key
    assert os.listdir(tmp_path) == files and os.stat(tmp_path / files[0]).st_mtime_ns == stamp
    assert torch.equal(first.images, second.images) and torch.equal(first.targets, second.targets)
    assert first.classes == second.classes and first.groups == second.groups
    assert torch.equal(second.images, generate_glyphs(**SMALL, seed=3).images)  # the name imported above is unpatched


def test_cache_key_depends_on_the_arguments_and_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPHI_CACHE", str(tmp_path))
    load_glyphs(alphabets=1, characters=2, drawers=2, seed=0)
    load_glyphs(alphabets=1, characters=2, drawers=2, seed=1)
    load_glyphs(alphabets=1, characters=2, drawers=2, seed=1)
    assert len(os.listdir(tmp_path)) == 2


def test_unreadable_cache_fails_loudly(tmp_path):
    load_glyphs(cache_dir=tmp_path, alphabets=1, characters=2, drawers=2)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="delete it"):
        load_glyphs(cache_dir=tmp_path, alphabets=1, characters=2, drawers=2)


def test_splits_are_whole_alphabets_and_cover_everything():
    data = generate_glyphs(alphabets=10, characters=2, drawers=2, seed=1)
    splits = glyph_splits(data, seed=0)
    assert set(splits) == {"train", "val", "test"}
    alphabets = {name: set(split.groups) for name, split in splits.items()}
    assert [len(alphabets[k]) for k in ("train", "val", "test")] == [7, 1, 2]
    assert not (alphabets["train"] & alphabets["val"] or alphabets["train"] & alphabets["test"]
                or alphabets["val"] & alphabets["test"])
    assert set().union(*alphabets.values()) == set(data.groups)
    classes = [c for split in splits.values() for c in split.classes]
    assert sorted(classes) == sorted(data.classes)
    assert sum(len(split.targets) for split in splits.values()) == len(data.targets)
    for split in splits.values():  # every image kept with its own class
        for c, name in enumerate(split.classes):
            original = data.classes.index(name)
            assert torch.equal(split.images[split.indices_of(c)], data.images[data.indices_of(original)])
    again = glyph_splits(data, seed=0)
    assert all(again[k].classes == splits[k].classes for k in splits)
    others = [glyph_splits(data, seed=s)["test"].groups for s in range(1, 4)]
    assert any(set(o) != alphabets["test"] for o in others)


def test_splits_need_alphabets():
    data = generate_glyphs(alphabets=2, characters=2, drawers=2)
    with pytest.raises(DataError):
        glyph_splits(data)


def test_within_alphabet_episodes(small):
    sampler = EpisodeSampler(small, ways=5, shots=1, query=3, within_group=True)
    (xs, ys), (xq, yq) = sampler.sample(torch.Generator().manual_seed(0))
    assert xs.shape == (5, 1, 28, 28) and xq.shape == (15, 1, 28, 28)
    assert ys.tolist() == [0, 1, 2, 3, 4] and yq.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert 0.0 <= float(xs.min()) and float(xs.max()) == 1.0
    # Find each support image in the store: all five classes come from one alphabet.
    pixels = small.images.flatten(1)
    found = [int((pixels == (x * 255).round().to(torch.uint8).flatten()).all(1).nonzero()[0]) for x in xs]
    alphabets = {small.groups[int(small.targets[i])] for i in found}
    assert len(alphabets) == 1 and len({int(small.targets[i]) for i in found}) == 5


def test_pixel_nearest_neighbour_is_neither_chance_nor_perfect():
    data = generate_glyphs(alphabets=5, characters=12, drawers=10, seed=0)
    accuracy = pixel_nn_accuracy(data, ways=5, shots=1, query=5, episodes=200, seed=0)
    assert 0.2 + 0.1 < accuracy < 0.95, accuracy
