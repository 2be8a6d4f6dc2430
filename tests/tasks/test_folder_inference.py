"""How a folder of images is read when the user leaves it open: channels, ink polarity and image size
inferred from a fixed sample of the images (tasks/folder.py's rules), recorded in the benchmark and
the checkpoint, printed by `metaphi run`; flags override each choice both ways."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaphi.cli import main
from metaphi.tasks import DataError, folder, imageio, registry


def character(c: int, i: int, size: int = 48) -> np.ndarray:
    """Dark ink on white paper: class c a bar at its own height, drawing i a small shift."""
    img = np.full((size, size), 255, np.uint8)
    y = 4 + 5 * c + i % 3
    img[y:y + 4, 6:size - 6] = 0
    return img


def photo(c: int, i: int, size=(40, 30)) -> np.ndarray:
    """A colour picture: a smooth gradient of a hue of its own plus noise, light on average."""
    rng = np.random.default_rng(100 * c + i)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None]
    hue = np.array([1.0, 0.4 + 0.1 * c, 0.2])[None, None, :]
    img = 150 + 100 * ramp * hue + rng.normal(0, 10, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make(root: Path, draw, classes=6, per_class=3, save=None) -> Path:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(draw(c, i))
            if save:
                save(img, root / f"class{c}" / f"{i}")
            else:
                img.save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPHI_CACHE", str(tmp_path / "cache"))


def test_grey_characters_on_white_are_one_channel_inverted_32(tmp_path):
    root = make(tmp_path / "chars", character)
    chosen = folder.folder_input(root)
    assert (chosen.channels, chosen.invert, chosen.image_size) == (1, True, 32)
    assert chosen.origin == {"channels": "inferred", "image_size": "inferred", "invert": "inferred"}
    assert chosen.survey.greyscale and chosen.survey.median == 255 and chosen.survey.largest == 48
    bench = registry.build_benchmark(f"folder:{root}", invert=None)
    train = bench.splits["train"]
    assert train.image_shape == (1, 32, 32)
    assert int(train.images[:, :, 0, 0].max()) == 0 and int(train.images.max()) > 200  # paper low, ink high
    spec = bench.input_spec()
    assert (spec["channels"], spec["height"], spec["width"], spec["invert"]) == (1, 32, 32, True)
    assert spec["origin"] == chosen.origin
    assert "grey 32x32, ink high" in bench.description and "inferred" in bench.description
    assert bench.description.startswith(f"folder:{root}: 6 classes") and "\n" not in bench.description


def test_colour_photos_are_three_channels_not_inverted_84(tmp_path):
    root = make(tmp_path / "photos", photo)
    chosen = folder.folder_input(root)
    assert chosen.survey.median > 127.5  # a light picture, yet in colour: never inverted
    assert (chosen.channels, chosen.invert, chosen.image_size) == (3, False, 84)
    bench = registry.build_benchmark(f"folder:{root}", invert=None)
    assert bench.splits["train"].image_shape == (3, 84, 84) and bench.input_spec()["invert"] is False
    assert "RGB 84x84" in bench.description and "photos" in bench.description


def test_grey_pictures_saved_as_rgb_are_one_channel(tmp_path):
    def rgb_png(img, path):
        img.convert("RGB").save(f"{path}.png")

    def rgb_jpeg(img, path):
        img.convert("RGB").save(f"{path}.jpg", quality=75)

    def scanned(img, path):  # channels a few levels apart, as a scanner leaves them: still grey
        rgb = np.asarray(img.convert("RGB")).astype(np.int16)
        shift = np.random.default_rng(len(str(path))).integers(-3, 4, rgb.shape)
        Image.fromarray(np.clip(rgb + shift, 0, 255).astype(np.uint8)).save(f"{path}.png")

    for name, save in (("png", rgb_png), ("jpeg", rgb_jpeg), ("scanned", scanned)):
        root = make(tmp_path / name, character, save=save)
        chosen = folder.folder_input(root)
        assert (chosen.channels, chosen.invert, chosen.image_size) == (1, True, 32), name


def test_one_colour_image_makes_the_folder_colour(tmp_path):
    root = make(tmp_path / "chars", character)
    Image.fromarray(photo(0, 0)).save(root / "class0" / "colour.png")
    chosen = folder.folder_input(root)
    assert not chosen.survey.greyscale and (chosen.channels, chosen.invert, chosen.image_size) == (3, False, 84)


def test_grey_modes_and_palettes(tmp_path):
    grey = Image.fromarray(character(0, 0))
    images = {"l.png": grey, "bilevel.png": grey.convert("1"), "la.png": grey.convert("LA"),
              "grey-palette.png": grey.convert("RGB").quantize(4), "deep.png": grey.convert("I;16")}
    for name, img in images.items():
        img.save(tmp_path / name)
    files = sorted(tmp_path.glob("*.png"))
    assert imageio.survey(files).greyscale
    coloured = Image.fromarray(photo(1, 0)).quantize(16)
    coloured.save(tmp_path / "colour-palette.png")
    assert not imageio.survey(sorted(tmp_path.glob("*.png"))).greyscale


def test_dark_background_grey_images_are_not_inverted(tmp_path):
    root = make(tmp_path / "digits", lambda c, i: 255 - character(c, i))  # light ink on black, as MNIST
    chosen = folder.folder_input(root)
    assert chosen.survey.median == 0
    assert (chosen.channels, chosen.invert, chosen.image_size) == (1, False, 84)


def test_flags_override_the_inference_both_ways(tmp_path):
    chars = make(tmp_path / "chars", character)
    photos = make(tmp_path / "photos", photo)
    forced = registry.build_benchmark(f"folder:{chars}", channels=3, image_size=84, invert=False)
    assert forced.splits["train"].image_shape == (3, 84, 84) and forced.invert is False
    assert forced.input_spec()["origin"] == {"channels": "given", "image_size": "given", "invert": "given"}
    assert int(forced.splits["train"].images[:, :, 0, 0].min()) == 255  # white paper kept white
    other = registry.build_benchmark(f"folder:{photos}", channels=1, image_size=28, invert=True)
    assert other.splits["train"].image_shape == (1, 28, 28) and other.invert is True
    # one choice given, the others still inferred
    mixed = folder.folder_input(chars, invert=False)
    assert (mixed.channels, mixed.invert, mixed.image_size) == (1, False, 32)
    assert mixed.origin == {"channels": "inferred", "image_size": "inferred", "invert": "given"}
    grey_photos = folder.folder_input(photos, channels=1)
    assert (grey_photos.channels, grey_photos.invert, grey_photos.image_size) == (1, False, 84)


def test_all_given_looks_at_no_image(tmp_path, monkeypatch):
    root = make(tmp_path / "chars", character, classes=2, per_class=1)

    def no_survey(*args, **kwargs):
        raise AssertionError("looked at the images although every choice was given")

    monkeypatch.setattr(folder, "survey", no_survey)
    chosen = folder.folder_input(root, channels=1, image_size=20, invert=True)
    assert chosen.survey is None and (chosen.channels, chosen.image_size, chosen.invert) == (1, 20, True)
    assert "inferred" not in chosen.describe()


def test_the_sample_is_bounded_and_fixed(tmp_path, monkeypatch):
    root = make(tmp_path / "chars", character, classes=5, per_class=6)
    _, files, _ = folder.class_files(root)
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    first = imageio.survey(files, sample=7)
    picked = list(opened)
    opened.clear()
    assert imageio.survey(files, sample=7) == first and opened == picked  # the same images every time
    assert first.sampled == 7 and first.total == 30 and len(set(picked)) == 7
    assert len({Path(p).parent.name for p in picked}) > 1  # drawn across the classes, not the first ones
    opened.clear()
    imageio.survey(files, sample=7, seed=1)
    assert opened != picked


def test_an_unreadable_sampled_image_is_named(tmp_path):
    root = make(tmp_path / "chars", character, classes=2, per_class=1)
    (root / "class1" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: not a readable image"):
        folder.folder_input(root)


def test_splits_are_slices_of_one_store_and_match_a_full_read(tmp_path, monkeypatch):
    root = make(tmp_path / "chars", character, classes=10, per_class=2)
    splits = folder.folder_splits(root, seed=2, channels=1, image_size=12, invert=True, cache_dir=False)
    storages = {splits[s].images.untyped_storage().data_ptr() for s in folder.SPLITS}
    assert len(storages) == 1  # views of one tensor, no copy per split
    whole = folder.load_folder(root, channels=1, image_size=12, invert=True, cache_dir=False)
    for s in folder.SPLITS:
        idx = [whole.classes.index(c) for c in splits[s].classes]
        expected = whole.subset(idx)
        assert torch.equal(splits[s].images, expected.images) and torch.equal(splits[s].targets, expected.targets)
    # a split file naming some classes decodes only those
    decoded = []
    real = folder.decode_many

    def counting(sources, *args, **kwargs):
        decoded.extend(str(s) for s in sources)
        return real(sources, *args, **kwargs)

    monkeypatch.setattr(folder, "decode_many", counting)
    split = tmp_path / "split.csv"
    split.write_text("class1,train\nclass2,train\nclass5,val\nclass7,test\n")
    named = folder.folder_splits(root, split=split, channels=1, image_size=12, cache_dir=False)
    assert named["train"].classes == ["class1", "class2"] and len(decoded) == 8
    assert {Path(p).parent.name for p in decoded} == {"class1", "class2", "class5", "class7"}


def test_run_prints_and_records_the_choices(tmp_path, capsys):
    root = make(tmp_path / "chars", character, classes=10, per_class=3)
    out = tmp_path / "run"
    args = ["run", "protonet", "--benchmark", f"folder:{root}", "--ways", "2", "--iterations", "1", "--meta-batch",
            "1", "--eval-tasks", "2", "--val-tasks", "1", "--no-baselines", "--out", str(out)]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"folder:{root}:")]
    assert len(lines) == 1 and "read as grey 32x32, ink high" in lines[0] and "channels 1 (inferred" in lines[0]
    from metaphi.train import load_checkpoint

    spec = load_checkpoint(str(out / "checkpoint.pt"))["run"]["input"]
    assert (spec["channels"], spec["height"], spec["invert"]) == (1, 32, True)
    assert spec["origin"]["invert"] == "inferred"
    # what was inferred is settled in config.yaml and the run's benchmark options, so a rerun and eval read the
    # folder the same way without inferring again
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["channels"], saved["image_size"], saved["invert"]) == (1, 32, True)
    options = load_checkpoint(str(out / "checkpoint.pt"))["run"]["benchmark_options"]
    assert (options["channels"], options["image_size"], options["invert"]) == (1, 32, True)
    # predict reads the query images as the run read its own
    support, query = tmp_path / "support", tmp_path / "query"
    for c in (0, 5):
        (support / f"c{c}").mkdir(parents=True)
        Image.fromarray(character(c, 0)).save(support / f"c{c}" / "a.png")
    query.mkdir()
    Image.fromarray(character(5, 1)).convert("RGB").save(query / "q.png")
    assert main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "--support", str(support), "--query",
                 str(query)]) == 0
    assert "q.png" in capsys.readouterr().out
    # --no-invert forces the old reading; --quiet prints nothing about it
    assert main([*args, "--no-invert", "--channels", "3", "--quiet", "--out", str(tmp_path / "forced")]) == 0
    assert f"folder:{root}:" not in capsys.readouterr().err
    spec = load_checkpoint(str(tmp_path / "forced" / "checkpoint.pt"))["run"]["input"]
    assert (spec["channels"], spec["height"], spec["invert"]) == (3, 32, False)
    assert spec["origin"] == {"channels": "given", "image_size": "inferred", "invert": "given"}
