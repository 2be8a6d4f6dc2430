import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metaphi.tasks import DataError, EpisodeSampler, ImageClasses
from metaphi.tasks import imageio, omniglot
import shared_data

REAL = shared_data.OMNIGLOT


def drawing(char: int, k: int) -> Image.Image:
    """A 105x105 1-bit drawing, black ink on white, whose ink position encodes (character, drawing)."""
    img = Image.new("1", (105, 105), 1)
    x, y = 5 + 9 * (char % 9), 5 + 9 * (k % 9)
    ImageDraw.Draw(img).rectangle([x, y, x + 20, y + 20], fill=0)
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_omniglot(path: Path, alphabets: dict[str, int], drawings: int = 3, unpacked: bool = False,
                  corrupt: str | None = None) -> Path:
    """The official layout: <top>/<Alphabet>/characterNN/<id>_<k>.png, as a zip (or a folder)."""
    top = path.name.removesuffix(".zip")
    files = {}
    char_id = 0
    for alphabet, n in alphabets.items():
        for c in range(1, n + 1):
            char_id += 1
            for k in range(1, drawings + 1):
                files[f"{top}/{alphabet}/character{c:02d}/{char_id:04d}_{k:02d}.png"] = png_bytes(drawing(char_id, k))
    if corrupt is not None:
        files[f"{top}/{corrupt}"] = b"not a png at all"
    if unpacked:
        for name, data in files.items():
            (path.parent / name).parent.mkdir(parents=True, exist_ok=True)
            (path.parent / name).write_bytes(data)
        return path.parent / top
    with zipfile.ZipFile(path, "w") as z:
        dirs = sorted({n.rsplit("/", i)[0] + "/" for n in files for i in (1, 2, 3)})
        for d in dirs:
            z.writestr(d, b"")
        for name, data in files.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_load_zip_layout_names_ink_and_resize(tmp_path, cache):
    src = make_omniglot(tmp_path / "images_background.zip", {"Greek": 2, "Latin": 3})
    data = omniglot.load(src, cache_dir=cache)
    assert data.classes == ["Greek/character01", "Greek/character02", "Latin/character01",
                            "Latin/character02", "Latin/character03"]
    assert data.groups == ["Greek", "Greek", "Latin", "Latin", "Latin"]
    assert data.images.dtype == torch.uint8 and data.images.shape == (15, 1, 28, 28)
    assert data.counts.tolist() == [3] * 5
    # Against an independent decode: 1-bit -> L, inverted so ink is high, Lanczos to 28x28.
    first = drawing(1, 1).convert("L").resize((28, 28), Image.LANCZOS)
    expected = 255 - np.asarray(first)
    assert torch.equal(data.images[data.indices_of(0)[0], 0], torch.from_numpy(expected))
    img = data.images[0, 0]
    assert img[0, 0] == 0 and img.max() == 255  # paper 0, ink 255


def test_image_size_and_unpacked_folder_match_zip(tmp_path, cache):
    alphabets = {"Greek": 2, "Latin": 1}
    z = make_omniglot(tmp_path / "images_background.zip", alphabets)
    folder = make_omniglot(tmp_path / "unpacked" / "images_background", alphabets, unpacked=True)
    a = omniglot.load(z, image_size=(20, 24), cache_dir=cache)
    b = omniglot.load(folder, image_size=(20, 24), cache_dir=cache)
    assert a.images.shape == (9, 1, 20, 24)
    assert torch.equal(a.images, b.images) and a.classes == b.classes and a.groups == b.groups
    full = omniglot.load(z, image_size=105, cache_dir=cache)
    assert torch.equal(full.images[0, 0], torch.from_numpy(255 - np.asarray(drawing(1, 1).convert("L"))))


def test_cache_decodes_once_and_follows_source_changes(tmp_path, cache, monkeypatch):
    src = make_omniglot(tmp_path / "images_background.zip", {"Greek": 2})
    first = omniglot.load(src, cache_dir=cache)
    assert len(list(cache.glob("omniglot-images_background-28x28-*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(omniglot, "decode_many", no_decoding)
    again = omniglot.load(src, cache_dir=cache)
    assert torch.equal(first.images, again.images) and first.classes == again.classes
    assert first.groups == again.groups
    monkeypatch.undo()

    make_omniglot(src, {"Greek": 3})  # new content; bump mtime in case the clock is coarse
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))
    assert omniglot.load(src, cache_dir=cache).num_classes == 3
    omniglot.load(src, image_size=14, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 2  # one per image size
    assert omniglot.load(src, cache_dir=False).num_classes == 3


def test_corrupt_png_names_the_file_and_leaves_no_cache(tmp_path, cache):
    src = make_omniglot(tmp_path / "images_background.zip", {"Greek": 2}, corrupt="Greek/character02/0002_09.png")
    with pytest.raises(DataError, match=r"images_background\.zip:images_background/Greek/character02/0002_09\.png"):
        omniglot.load(src, cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())


def test_bad_paths_and_bad_archives(tmp_path, cache):
    with pytest.raises(DataError, match="not found"):
        omniglot.load(tmp_path / "nope.zip", cache_dir=cache)
    bad = tmp_path / "images_background.zip"
    bad.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DataError, match="not a readable zip archive"):
        omniglot.load(bad, cache_dir=cache)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no Omniglot images"):
        omniglot.load(empty, cache_dir=cache)
    with pytest.raises(DataError) as err:
        omniglot.find(tmp_path / "nowhere", "evaluation")
    msg = str(err.value)
    assert "\n" not in msg and "images_evaluation.zip" in msg and "--data-root" in msg
    assert "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip" in msg
    with pytest.raises(DataError, match="unknown Omniglot set"):
        omniglot.find(tmp_path, "small3")


def test_zip_without_top_folder(tmp_path, cache):
    src = make_omniglot(tmp_path / "images_background.zip", {"Greek": 2})
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(flat, "w") as b:
        for info in a.infolist():
            if not info.is_dir():
                b.writestr(info.filename.split("/", 1)[1], a.read(info))
    assert omniglot.load(flat, cache_dir=cache).classes == ["Greek/character01", "Greek/character02"]


def test_find_looks_in_root_and_omniglot_subfolder(tmp_path, fixture_archives):
    make_omniglot(tmp_path / "images_background_small1.zip", {"Greek": 1})
    (tmp_path / "omniglot").mkdir()
    make_omniglot(tmp_path / "omniglot" / "images_background_small2.zip", {"Latin": 1})
    assert omniglot.find(tmp_path, "small1") == tmp_path / "images_background_small1.zip"
    assert omniglot.find(tmp_path, "images_background_small2") == tmp_path / "omniglot" / "images_background_small2.zip"


def full_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    make_omniglot(root / "images_background.zip", {"Arcadian": 4, "Greek": 3, "Korean": 3, "Latin": 2}, drawings=2)
    make_omniglot(root / "images_evaluation.zip", {"Angelic": 3, "Tengwar": 3}, drawings=2)
    return root


def test_maml_splits_disjoint_rotated_and_seeded(tmp_path, cache, fixture_archives):
    root = full_root(tmp_path)
    splits = omniglot.maml_splits(root, num_train=10, num_val=3, seed=1, cache_dir=cache)
    base = {k: {c.split("@")[0] for c in v.classes} for k, v in splits.items()}
    assert [len(base[k]) for k in ("train", "val", "test")] == [10, 3, 5]
    assert not (base["train"] & base["val"]) and not (base["train"] & base["test"]) and not (base["val"] & base["test"])
    assert splits["train"].num_classes == 40 and splits["test"].num_classes == 20
    assert {c.split("@")[1] for c in splits["train"].classes} == {"rot0", "rot90", "rot180", "rot270"}
    # A rotated class holds the rotated images of its character.
    train = splits["train"]
    c0, c90 = train.classes.index(train.classes[0]), train.classes.index(train.classes[0].replace("rot0", "rot90"))
    assert torch.equal(torch.rot90(train.images[train.indices_of(c0)], 1, (2, 3)), train.images[train.indices_of(c90)])
    same = omniglot.maml_splits(root, num_train=10, num_val=3, seed=1, cache_dir=cache)
    assert same["test"].classes == splits["test"].classes
    other = omniglot.maml_splits(root, num_train=10, num_val=3, seed=2, cache_dir=cache)
    assert other["train"].classes != splits["train"].classes
    plain = omniglot.maml_splits(root, num_train=10, num_val=3, seed=1, rotate_eval=False, cache_dir=cache)
    assert plain["val"].num_classes == 3 and plain["train"].num_classes == 40
    with pytest.raises(DataError, match="lower num_train"):
        omniglot.maml_splits(root, num_train=15, num_val=3, cache_dir=cache)


def synthetic(n: int, alphabet: str) -> ImageClasses:
    return ImageClasses(torch.zeros(n * 2, 1, 2, 2, dtype=torch.uint8), torch.arange(n).repeat_interleave(2),
                        [f"{alphabet}{i}/character01" for i in range(n)], [f"{alphabet}{i}" for i in range(n)])


def test_maml_default_sizes_are_1100_100_423(monkeypatch):
    sets = {"background": synthetic(964, "bg"), "evaluation": synthetic(659, "ev")}
    monkeypatch.setattr(omniglot, "read", lambda root, which, *a, **k: sets[which])
    splits = omniglot.maml_splits("unused")
    assert {k: v.num_classes for k, v in splits.items()} == {"train": 4400, "val": 400, "test": 1692}


def test_lake_splits_hold_out_background_alphabets(tmp_path, cache, fixture_archives):
    root = full_root(tmp_path)
    splits = omniglot.lake_splits(root, val_alphabets=1, seed=0, cache_dir=cache)
    assert set(splits["test"].groups) == {"Angelic", "Tengwar"}
    assert len(set(splits["val"].groups)) == 1
    assert set(splits["train"].groups) | set(splits["val"].groups) == {"Arcadian", "Greek", "Korean", "Latin"}
    assert not set(splits["train"].groups) & set(splits["val"].groups)
    named = omniglot.lake_splits(root, val_alphabets=["Greek", "Latin"], cache_dir=cache)
    assert set(named["val"].groups) == {"Greek", "Latin"} and named["val"].num_classes == 5
    with pytest.raises(DataError, match="unknown alphabet 'Klingon'"):
        omniglot.lake_splits(root, val_alphabets=["Klingon"], cache_dir=cache)


def test_minimal_splits_and_unseen_alphabets(tmp_path, cache, fixture_archives):
    root = tmp_path / "data"
    root.mkdir()
    make_omniglot(root / "images_background_small1.zip", {"Greek": 5, "Latin": 5, "Korean": 5})
    make_omniglot(root / "images_background_small2.zip", {"Greek": 5, "Tagalog": 6, "Sanskrit": 5})
    splits = omniglot.minimal_splits(root, "small1", val_alphabets=["Korean"], cache_dir=cache)
    assert set(splits["train"].groups) == {"Greek", "Latin"} and set(splits["val"].groups) == {"Korean"}
    assert set(splits["test"].groups) == {"Sanskrit", "Tagalog"}
    # Within-alphabet episodes on the unseen alphabets.
    sampler = EpisodeSampler(splits["test"], ways=5, shots=1, query=2, within_group=True)
    task = sampler.sample(torch.Generator().manual_seed(0))
    assert task.support[0].shape == (5, 1, 28, 28)
    reverse = omniglot.minimal_splits(root, "small2", val_alphabets=0, cache_dir=cache)
    assert set(reverse["test"].groups) == {"Latin", "Korean"}
    small1 = omniglot.read(root, "small1", cache_dir=cache)
    with pytest.raises(DataError, match="nothing unseen"):
        omniglot.unseen_alphabets(small1, small1)
    with pytest.raises(DataError, match="Omniglot images_evaluation.zip not found"):
        omniglot.minimal_splits(root, "small1", test="evaluation", cache_dir=cache)


# ------------------------------------------------------------------------------ the real minimal sets
@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    if not (REAL / "images_background_small1.zip").exists() or not (REAL / "images_background_small2.zip").exists():
        pytest.skip(f"{REAL} not found: the Omniglot minimal splits live in ../shared/data/omniglot")
    return tmp_path_factory.mktemp("omniglot-cache")


def test_real_small1_archive(real_cache):
    data = omniglot.read(REAL, "small1", cache_dir=real_cache)
    assert sorted(set(data.groups)) == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert data.images.shape == (2720, 1, 28, 28) and data.num_classes == 136
    assert data.counts.tolist() == [20] * 136
    assert "Greek/character24" in data.classes
    mean = data.images.float().mean().item()
    assert 5 < mean < 60  # mostly paper (0) with some ink: inverted correctly
    assert (data.images.flatten(1).amax(1) > 150).all()  # every drawing has ink (thin strokes blur to ~190)


def test_real_minimal_split_tests_on_alphabets_small1_lacks(real_cache):
    splits = omniglot.minimal_splits(REAL, "small1", cache_dir=real_cache)
    assert sorted(set(splits["test"].groups)) == ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
    assert len(set(splits["val"].groups)) == 1 and len(set(splits["train"].groups)) == 4
    sampler = EpisodeSampler(splits["test"], ways=20, shots=1, query=1, within_group=True)
    xs = sampler.sample(torch.Generator().manual_seed(0)).support[0]
    assert xs.shape == (20, 1, 28, 28)


@pytest.mark.parametrize("which", ["images_background_small1", "images_background_small2"])
def test_real_archives_match_published_hashes(which, real_cache):
    data = (REAL / f"{which}.zip").read_bytes()
    assert hashlib.sha256(data).hexdigest() == omniglot.ARCHIVES[which]["sha256"]
    assert hashlib.md5(data).hexdigest() == omniglot.ARCHIVES[which]["md5"]


def test_split_by_counts_needs_enough_classes():
    with pytest.raises(DataError, match="needs 5 classes but there are 3"):
        imageio.split_by_counts(synthetic(3, "a"), [4, 1], torch.Generator())


def test_default_cache_dir_and_unreadable_cache(tmp_path, monkeypatch):
    src = make_omniglot(tmp_path / "images_background.zip", {"Greek": 2})
    monkeypatch.setenv("METAPHI_CACHE", str(tmp_path / "env-cache"))
    assert imageio.default_cache_dir() == tmp_path / "env-cache"
    first = omniglot.load(src)
    [path] = (tmp_path / "env-cache").glob("*.pt")
    path.write_bytes(b"half a file")  # a cache we cannot read is rebuilt, not trusted
    again = omniglot.load(src)
    assert torch.equal(first.images, again.images)
    assert torch.load(path, weights_only=True)["classes"] == first.classes
    monkeypatch.delenv("METAPHI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert imageio.default_cache_dir() == tmp_path / "home" / ".cache" / "metaphi"


def test_an_archive_found_on_disk_is_checked_against_its_published_hash(tmp_path):
    # a file under the real name but not the published contents is refused before it is read
    make_omniglot(tmp_path / "images_background_small1.zip", {"Greek": 1})
    with pytest.raises(DataError, match="sha256 mismatch.*delete it and download it again"):
        omniglot.find(tmp_path, "small1")
    make_omniglot(tmp_path / "images_background.zip", {"Greek": 1})  # published with an md5 only
    with pytest.raises(DataError, match="md5 mismatch"):
        omniglot.find(tmp_path, "background")
    (tmp_path / "images_evaluation").mkdir()  # an unpacked folder is the user's own: not hashed
    assert omniglot.find(tmp_path, "evaluation") == tmp_path / "images_evaluation"
