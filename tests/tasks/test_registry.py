"""The data registry: every registered name of every kind builds, or fails with a DataError that says
what is missing; ``folder:PATH`` is parsed in one place and works for every kind."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from shared_data import OMNIGLOT
from metaphi.tasks import DataError, ImageClasses
from metaphi.tasks import registry
from metaphi.tasks.domains import DomainSet
from metaphi.tasks.streams import Stream, class_incremental

#: what each kind gives
TYPES = {"episodes": registry.Benchmark, "dataset": ImageClasses, "stream": Stream, "domains": DomainSet}
HAVE_OMNIGLOT = os.path.exists(os.path.join(OMNIGLOT, "images_background_small1.zip"))


def build(kind: str, name: str, data_root):
    """``name`` built with small settings through the kind's own front function."""
    if kind == "episodes":
        return registry.build_benchmark(name, str(data_root))
    if kind == "dataset":
        return registry.load_named(name, str(data_root))
    if kind == "stream":
        return registry.build_stream(name, seed=0, experiences=2, classes_per_experience=2, classes=3,
                                     train_per_class=2, test_per_class=2, data_root=str(data_root))
    return registry.build_domains(name, classes=3, test_per_class=2, adapt_per_class=1, data_root=str(data_root))


def test_the_four_kinds_share_one_table_of_tables():
    assert set(registry.KINDS) == set(registry.FOLDERS) == set(TYPES)
    assert registry.KINDS["episodes"] is registry.BENCHMARKS and registry.KINDS["stream"] is registry.STREAMS
    assert registry.NAMED == ("digits", "glyphs", "omniglot") == tuple(registry.DATASETS)
    for kind in registry.KINDS:
        assert registry.names(kind) == [*registry.KINDS[kind], "folder:PATH"]


@pytest.mark.parametrize("kind,name", [(k, n) for k, table in registry.KINDS.items() for n in table])
def test_every_name_builds_or_says_what_is_missing(kind, name, tmp_path):
    # an empty data root: the built-in data sets build, the others say which archive they need and where
    try:
        made = build(kind, name, tmp_path)
    except DataError as e:
        assert str(tmp_path) in str(e), f"{kind} '{name}': the message should say where it looked: {e}"
        return
    assert isinstance(made, TYPES[kind])


@pytest.mark.skipif(not HAVE_OMNIGLOT, reason="the Omniglot minimal archives are not in ../shared/data/omniglot")
@pytest.mark.parametrize("kind,name", [("episodes", "omniglot-small"), ("dataset", "omniglot"),
                                       ("domains", "rotated-omniglot")]
                         + ([("stream", "omniglot")]
                            if os.path.exists(os.path.join(OMNIGLOT, "images_background_small2.zip")) else []))
def test_omniglot_names_build_from_the_minimal_archives(kind, name):
    assert isinstance(build(kind, name, OMNIGLOT), TYPES[kind])


@pytest.mark.parametrize("kind,noun", [("episodes", "benchmark"), ("dataset", "data set"), ("stream", "stream"),
                                       ("domains", "domain data")])
def test_unknown_names_list_the_valid_ones(kind, noun):
    valid = ", ".join(registry.names(kind))
    with pytest.raises(DataError) as e:
        registry.resolve(kind, "nope")
    assert str(e.value) == f"unknown {noun} 'nope' (valid: {valid})"
    with pytest.raises(DataError, match=f"unknown {noun} 'nope'"):
        build(kind, "nope", "unused")
    with pytest.raises(ValueError, match="unknown kind of data 'movies'"):
        registry.resolve("movies", "glyphs")


def test_folder_is_parsed_in_one_place():
    assert registry.folder_path("folder:/data/mine") == "/data/mine"
    assert registry.folder_path("folder:~/a:b") == "~/a:b"   # only the first colon separates
    assert registry.folder_path("glyphs") is None
    assert registry.folder_path("Folder:x") is None
    with pytest.raises(DataError, match="needs a path"):
        registry.folder_path("folder:")
    for kind in registry.KINDS:
        with pytest.raises(DataError, match="needs a path"):
            registry.resolve(kind, "folder:")


def _png(path, value: int, size: int = 8):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(0, 40, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "L").save(path)


def _classes(root, names, per_class=5, base=0):
    for c, name in enumerate(names):
        for i in range(per_class):
            _png(root / name / f"{i}.png", base + 20 * c + i)


def test_folder_episodes_and_dataset(tmp_path):
    _classes(tmp_path, [f"class{c}" for c in range(10)])
    bench = registry.build_benchmark(f"folder:{tmp_path}", image_size=8, channels=1)
    assert bench.name == f"folder:{tmp_path}" and set(bench.splits) == {"train", "val", "test"}
    assert bench.splits["train"].image_shape == (1, 8, 8)
    task = bench.episodes("train", 2, 1, 1).sample(torch.Generator().manual_seed(0))
    assert task.support[0].shape == (2, 1, 8, 8)
    data = registry.load_named(f"folder:{tmp_path}", image_size=8, channels=1, classes=4, seed=1)
    assert data.num_classes == 4 and data.image_shape == (1, 8, 8)
    assert set(data.classes) <= {f"class{c}" for c in range(10)}


def test_folder_stream(tmp_path):
    _classes(tmp_path / "01-first", ["cat", "dog"])
    _classes(tmp_path / "02-second", ["emu", "fox"])
    s = registry.build_stream(f"folder:{tmp_path}", test_per_class=2, image_size=8)
    assert s.kind == "class-incremental" and s.class_names == ["cat", "dog", "emu", "fox"] and len(s) == 2


def test_folder_domains_keep_the_chosen_domains_in_order(tmp_path):
    for d, base in (("photo", 0), ("sketch", 100), ("cartoon", 200)):
        _classes(tmp_path / d, ["cat", "dog"], per_class=6, base=base)
    ds = registry.build_domains(f"folder:{tmp_path}", image_size=8, test_per_class=2, adapt_per_class=1)
    assert ds.domains == ["cartoon", "photo", "sketch"] and ds.classes == ["cat", "dog"]
    two = registry.build_domains(f"folder:{tmp_path}", domains=["sketch", "photo"], image_size=8, test_per_class=2,
                                 adapt_per_class=1)
    assert two.domains == ["sketch", "photo"] and torch.equal(two.parts[0]["test"].images, ds.parts[2]["test"].images)
    with pytest.raises(DataError, match=f"folder:{tmp_path}: no domain folder 'paint'"):
        registry.build_domains(f"folder:{tmp_path}", domains=["paint"], image_size=8, test_per_class=2,
                               adapt_per_class=1)


def test_named_streams_are_the_stream_functions_on_the_named_data():
    from metaphi.tasks.glyphs import glyph_splits, load_glyphs

    splits = glyph_splits(load_glyphs())
    by_name = registry.build_stream("glyphs", seed=3, experiences=2, classes_per_experience=2, train_per_class=2,
                                    test_per_class=1)
    direct = class_incremental(splits["test"], experiences=2, classes_per_experience=2, train_per_class=2,
                               test_per_class=1, seed=3, name="glyphs", meta_train=splits["train"])
    assert by_name.class_names == direct.class_names
    assert all(torch.equal(a.train_x, b.train_x) for a, b in zip(by_name.experiences, direct.experiences))


def test_named_domains_pick_angles_and_styles():
    rotated = registry.build_domains("rotated-glyphs", domains=["0", "45"], classes=3, test_per_class=2,
                                     adapt_per_class=1)
    assert rotated.name == "rotated-glyphs" and rotated.domains == ["0°", "45°"] and rotated.num_classes == 3
    styles = registry.build_domains("glyph-styles", domains=["bold", "plain"], classes=3, test_per_class=2,
                                    adapt_per_class=1)
    assert styles.domains == ["bold", "plain"]
    assert registry.build_domains("glyph-styles", classes=3, test_per_class=2, adapt_per_class=1).domains == [
        "plain", "bold", "slant", "noise", "inverted", "texture"]


def test_load_named_keeps_a_seeded_subset_of_classes():
    digits = registry.load_named("digits")
    four = registry.load_named("digits", classes=4, seed=2)
    assert four.num_classes == 4 and four.classes == sorted(four.classes, key=digits.classes.index)
    assert four.classes == registry.load_named("digits", classes=4, seed=2).classes
    with pytest.raises(DataError, match="--classes must be between 2 and 10 for digits, got 11"):
        registry.load_named("digits", classes=11)


def test_options_that_do_not_exist_are_refused():
    with pytest.raises(TypeError, match="shots"):
        registry.build_benchmark("sinusoid", shots=3)
    with pytest.raises(TypeError, match="ways"):
        registry.build_stream("glyphs", ways=3)
