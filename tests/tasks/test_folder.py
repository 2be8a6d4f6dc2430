from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaphi.tasks import DataError
from metaphi.tasks import folder, imageio

RNG = np.random.default_rng(0)


def save(path: Path, mode: str, size=(40, 30)) -> Image.Image:
    """An image of the given PIL mode and (width, height), saved in a format that keeps the mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgba = Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    img = rgba.convert("RGB").quantize(16) if mode == "P" else rgba.convert(mode)
    img.save(path)
    return img


def make_classes(root: Path, n_classes=5, per_class=3) -> Path:
    modes = [("png", "L"), ("jpg", "RGB"), ("png", "RGBA"), ("png", "P"), ("png", "LA")]
    for c in range(n_classes):
        for k in range(per_class):
            ext, mode = modes[(c + k) % len(modes)]
            save(root / f"class{c}" / f"img{k}.{ext}", mode, size=(30 + 5 * k, 20 + 3 * c))
    return root


def test_convert_any_mode():
    white_transparent = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(imageio.convert(white_transparent, "RGB")).tolist() == [[[255, 255, 255]] * 2] * 2
    half = Image.new("LA", (1, 1), (0, 128))
    assert np.asarray(imageio.convert(half, "L"))[0, 0] in (127, 128)
    pal = Image.new("RGB", (1, 1), (200, 0, 0)).quantize(4)
    assert np.asarray(imageio.convert(pal, "RGB"))[0, 0].tolist() == [200, 0, 0]
    deep = Image.fromarray(np.array([[65535, 0]], dtype=np.uint16))
    assert np.asarray(imageio.convert(deep, "L")).tolist() == [[255, 0]]
    assert imageio.convert(Image.new("1", (1, 1), 1), "RGB").getpixel((0, 0)) == (255, 255, 255)


def test_load_folder_any_mode_to_rgb_and_grey(tmp_path):
    root = make_classes(tmp_path / "data")
    data = folder.load_folder(root, channels=3, image_size=16, cache_dir=tmp_path / "cache")
    assert data.classes == [f"class{c}" for c in range(5)] and data.images.shape == (15, 3, 16, 16)
    expected = Image.open(root / "class1" / "img0.jpg").convert("RGB").resize((16, 16), Image.LANCZOS)
    assert torch.equal(data.images[3], torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    grey = folder.load_folder(root, channels=1, image_size=(12, 10), invert=True, cache_dir=tmp_path / "cache")
    assert grey.images.shape == (15, 1, 12, 10)
    plain = np.array(Image.open(root / "class0" / "img0.png").convert("L").resize((10, 12), Image.LANCZOS))
    assert torch.equal(grey.images[0, 0], torch.from_numpy(255 - plain))
    assert len(list((tmp_path / "cache").glob("folder-data-*.pt"))) == 2


def test_cache_inside_the_data_folder_stays_valid(tmp_path, monkeypatch):
    root = make_classes(tmp_path / "data", n_classes=2, per_class=2)
    cache = root / ".cache"
    first = folder.load_folder(root, image_size=8, cache_dir=cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(folder, "decode_many", no_decoding)
    assert torch.equal(folder.load_folder(root, image_size=8, cache_dir=cache).images, first.images)
    monkeypatch.undo()
    save(root / "class0" / "img9.png", "RGB")  # a new image is seen
    assert folder.load_folder(root, image_size=8, cache_dir=cache).counts.tolist() == [3, 2]


def test_fraction_split_is_seeded_and_disjoint(tmp_path):
    root = make_classes(tmp_path / "data", n_classes=10, per_class=2)
    cache = tmp_path / "cache"
    splits = folder.folder_splits(root, fractions=(0.6, 0.2, 0.2), seed=3, image_size=8, cache_dir=cache)
    assert [splits[s].num_classes for s in folder.SPLITS] == [6, 2, 2]
    names = [set(splits[s].classes) for s in folder.SPLITS]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    again = folder.folder_splits(root, seed=3, image_size=8, cache_dir=cache)
    assert again["test"].classes == splits["test"].classes
    with pytest.raises(DataError, match="leave a split empty"):
        folder.folder_splits(root, fractions=(0.95, 0.05, 0.0), image_size=8, cache_dir=cache)
    with pytest.raises(DataError, match="summing to 1"):
        folder.folder_splits(root, fractions=(0.5, 0.2, 0.2), image_size=8, cache_dir=cache)


def test_split_file_formats(tmp_path):
    root = make_classes(tmp_path / "data", n_classes=5, per_class=2)
    cache = tmp_path / "cache"
    mapping = tmp_path / "split.csv"
    mapping.write_text("class,split\nclass0,train\nclass3,train\n# a comment\n\nclass1,valid\nclass2,test\n")
    s = folder.folder_splits(root, split=mapping, image_size=8, cache_dir=cache)
    assert s["train"].classes == ["class0", "class3"] and s["val"].classes == ["class1"]
    assert s["test"].classes == ["class2"]  # class4 is not named: left out
    spaced = tmp_path / "split.txt"
    spaced.write_text("class0 train\nclass1\tval\nclass2 test\n")
    assert folder.folder_splits(root, split=spaced, image_size=8, cache_dir=cache)["val"].classes == ["class1"]
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("class4\nclass0\n")
    (lists / "val.txt").write_text("class1\n")
    (lists / "test.txt").write_text("class2\nclass3\n")
    by_folder = folder.folder_splits(root, split=lists, image_size=8, cache_dir=cache)
    assert by_folder["train"].classes == ["class4", "class0"] and by_folder["test"].num_classes == 2
    by_files = folder.folder_splits(root, split={s: lists / f"{s}.txt" for s in folder.SPLITS}, image_size=8,
                                    cache_dir=cache)
    assert by_files["val"].classes == ["class1"]


def test_split_file_errors(tmp_path):
    root = make_classes(tmp_path / "data", n_classes=3, per_class=2)
    cache = tmp_path / "cache"
    bad = tmp_path / "split.csv"
    bad.write_text("class0,train\nclass1,val\nclass9,test\n")
    with pytest.raises(DataError, match=r"class 'class9' is not a folder of"):
        folder.folder_splits(root, split=bad, image_size=8, cache_dir=cache)
    bad.write_text("class0,train\nclass1,val\nclass2,tset\n")
    with pytest.raises(DataError, match=r"split\.csv:3: split 'tset' is not train, val or test"):
        folder.folder_splits(root, split=bad, image_size=8, cache_dir=cache)
    bad.write_text("class0,train\nclass0,val\nclass2,test\n")
    with pytest.raises(DataError, match="'class0' is in both train and val"):
        folder.folder_splits(root, split=bad, image_size=8, cache_dir=cache)
    bad.write_text("class0,train\nclass2,test\n")
    with pytest.raises(DataError, match="no class in val"):
        folder.folder_splits(root, split=bad, image_size=8, cache_dir=cache)
    with pytest.raises(DataError, match="split file not found"):
        folder.folder_splits(root, split=tmp_path / "missing.csv", image_size=8, cache_dir=cache)


def test_bad_folders(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="not a folder"):
        folder.load_folder(tmp_path / "missing", cache_dir=cache)
    (tmp_path / "flat").mkdir()
    save(tmp_path / "flat" / "a.png", "RGB")
    with pytest.raises(DataError, match="no class folders"):
        folder.load_folder(tmp_path / "flat", cache_dir=cache)
    root = make_classes(tmp_path / "data", n_classes=2, per_class=2)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: empty class folder"):
        folder.load_folder(root, cache_dir=cache)
    (root / "empty").rmdir()
    with pytest.raises(DataError, match=r"class0: 2 images but 5 are needed.*--shots/--query"):
        folder.load_folder(root, min_images=5, cache_dir=cache)


def test_corrupt_image_names_file_and_leaves_no_cache(tmp_path):
    root = make_classes(tmp_path / "data", n_classes=2, per_class=2)
    (root / "class1" / "notes.txt").write_text("not an image")
    (root / "class1" / ".DS_Store").write_bytes(b"\0hidden files are skipped")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"class1/notes\.txt: not a readable image") as err:
        folder.load_folder(root, cache_dir=cache)
    assert "\n" not in str(err.value)
    assert not cache.exists() or not [p for p in cache.iterdir()]  # no cache, not even a temporary file
    (root / "class1" / "notes.txt").unlink()
    assert folder.load_folder(root, cache_dir=cache).num_classes == 2


def test_query_images(tmp_path):
    q = tmp_path / "queries"
    save(q / "b.png", "RGBA", (50, 40))
    save(q / "a.jpg", "L", (20, 20))
    save(q / "sub" / "ignored.png", "RGB")
    names, x = folder.load_query_images(q, channels=1, height=28, width=28)
    assert names == ["a.jpg", "b.png"] and x.shape == (2, 1, 28, 28) and x.dtype == torch.uint8
    names, x = folder.load_query_images(q / "b.png", channels=3, height=84, width=84, invert=True)
    assert names == ["b.png"] and x.shape == (1, 3, 84, 84)
    (q / "readme.md").write_text("hello")
    with pytest.raises(DataError, match=r"readme\.md: not a readable image"):
        folder.load_query_images(q, 1, 28, 28)
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no images to classify"):
        folder.load_query_images(tmp_path / "none", 1, 28, 28)
    with pytest.raises(DataError, match="not found"):
        folder.load_query_images(tmp_path / "nope", 1, 28, 28)


def test_load_folder_reads_only_the_classes_named_in_their_order(tmp_path):
    root = make_classes(tmp_path / "data", n_classes=4, per_class=2)
    cache = tmp_path / "cache"
    whole = folder.load_folder(root, channels=1, image_size=8, cache_dir=cache)
    some = folder.load_folder(root, channels=1, image_size=8, cache_dir=cache, classes=["class3", "class1"])
    assert some.classes == ["class3", "class1"] and some.targets.tolist() == [0, 0, 1, 1]
    assert torch.equal(some.images, whole.subset([3, 1]).images)
    assert len(list(cache.glob("folder-data-*.pt"))) == 2  # the named classes are cached apart from the whole
    with pytest.raises(DataError, match="class 'class9' is not a folder"):
        folder.load_folder(root, image_size=8, cache_dir=cache, classes=["class0", "class9"])
    parts = folder.consecutive(some, [1, 1])
    assert [p.classes for p in parts] == [["class3"], ["class1"]] and parts[1].targets.tolist() == [0, 0]
    assert parts[1].images.data_ptr() == some.images[2:].data_ptr()  # a view


def test_a_test_fraction_of_zero_means_no_test_split(tmp_path):
    root = make_classes(tmp_path / "data", n_classes=10, per_class=2)
    cache = tmp_path / "cache"
    splits = folder.folder_splits(root, fractions=(0.8, 0.2, 0.0), seed=3, image_size=8, cache_dir=cache)
    assert list(splits) == ["train", "val"]
    assert [splits[s].num_classes for s in splits] == [8, 2]
    assert set(splits["train"].classes) | set(splits["val"].classes) == {f"class{c}" for c in range(10)}
    assert not set(splits["train"].classes) & set(splits["val"].classes)
    again = folder.folder_splits(root, fractions=(0.8, 0.2, 0.0), seed=3, image_size=8, cache_dir=cache)
    assert again["val"].classes == splits["val"].classes
    # rounding leaves nothing out: what it does not give to validation trains
    odd = folder.folder_splits(make_classes(tmp_path / "odd", n_classes=7, per_class=1), fractions=(0.8, 0.2, 0.0),
                               image_size=8, cache_dir=cache)
    assert [odd[s].num_classes for s in odd] == [6, 1]
    with pytest.raises(DataError, match="leave a split empty"):  # validation still needs a class
        folder.folder_splits(root, fractions=(1.0, 0.0, 0.0), image_size=8, cache_dir=cache)


def test_the_registry_folder_builder_in_deploy_mode(tmp_path):
    from metaphi.tasks.registry import build_benchmark

    root = make_classes(tmp_path / "data", n_classes=10, per_class=2)
    bench = build_benchmark(f"folder:{root}", image_size=8, channels=1, invert=False, deploy=True)
    assert set(bench.splits) == {"train", "val"} and bench.num_classes("train") == 8
    assert "no test: deploy" in bench.description
    with pytest.raises(DataError, match="has no 'test' split"):
        bench.episodes("test", 2, 1, 1)
    assert set(build_benchmark(f"folder:{root}", image_size=8, channels=1, invert=False).splits) == set(folder.SPLITS)
    (tmp_path / "split.txt").write_text("".join(f"class{c},{'train' if c < 6 else 'val' if c < 8 else 'test'}\n"
                                                for c in range(10)))
    with pytest.raises(DataError, match="drop the split file"):
        build_benchmark(f"folder:{root}", image_size=8, channels=1, invert=False, split_file=str(tmp_path / "split.txt"),
                        deploy=True)
    with pytest.raises(DataError, match="for folder:PATH benchmarks"):
        build_benchmark("glyphs", deploy=True)


def make_groups(root: Path, groups=(("alpha", 3), ("beta", 2)), per_class=2) -> Path:
    for g, n in groups:
        for c in range(n):
            for k in range(per_class):
                save(root / g / f"char{c}" / f"img{k}.png", "L", size=(12, 12))
    return root


def test_a_grouped_folder_keeps_each_class_group(tmp_path):
    """PATH/<group>/<class>/<image> (Omniglot's alphabet/character layout): classes named group/class."""
    root = make_groups(tmp_path / "data")
    data = folder.load_folder(root, channels=1, image_size=8, cache_dir=tmp_path / "cache")
    assert data.classes == ["alpha/char0", "alpha/char1", "alpha/char2", "beta/char0", "beta/char1"]
    assert data.groups == ["alpha"] * 3 + ["beta"] * 2 and data.images.shape == (10, 1, 8, 8)
    expected = np.array(Image.open(root / "beta" / "char1" / "img0.png").resize((8, 8), Image.LANCZOS))
    assert torch.equal(data.images[8, 0], torch.from_numpy(expected))
    splits = folder.folder_splits(root, fractions=(0.6, 0.4, 0.0), image_size=8, channels=1,
                                  cache_dir=tmp_path / "cache")
    assert sorted(splits["train"].classes + splits["val"].classes) == data.classes
    assert all(name.split("/")[0] == g for s in splits.values() for name, g in zip(s.classes, s.groups))
    mapping = tmp_path / "split.csv"
    mapping.write_text("alpha/char0,train\nbeta/char1,train\nalpha/char2,val\nbeta/char0,test\n")
    by_file = folder.folder_splits(root, split=mapping, image_size=8, channels=1, cache_dir=tmp_path / "cache")
    assert by_file["train"].classes == ["alpha/char0", "beta/char1"] and by_file["train"].groups == ["alpha", "beta"]
    # a flat folder has no groups
    flat = make_classes(tmp_path / "flat", 2, 2)
    assert folder.load_folder(flat, image_size=8, cache_dir=tmp_path / "cache").groups is None


def test_groups_and_classes_mixed_at_the_top_are_refused(tmp_path):
    root = make_groups(tmp_path / "data")
    save(root / "gamma" / "img0.png", "L")
    with pytest.raises(DataError, match=r"'alpha' holds class folders \(a group\) but 'gamma' holds images"):
        folder.load_folder(root, cache_dir=tmp_path / "cache")
