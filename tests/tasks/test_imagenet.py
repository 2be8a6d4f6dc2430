import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaphi.tasks import DataError, EpisodeSampler
from metaphi.tasks import imagenet

RNG = np.random.default_rng(0)


def rgb(h=84, w=84) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_mini_pickles(root: Path, per_class=3, bytes_keys=False):
    truth = {}
    for s, names in (("train", ["n02", "n01", "n03"]), ("val", ["n11", "n12"]), ("test", ["n21", "n22"])):
        images = np.stack([rgb() for _ in range(per_class * len(names))])
        class_dict = {n: list(range(i * per_class, (i + 1) * per_class)) for i, n in enumerate(names)}
        state = {"image_data": images, "class_dict": class_dict}
        if bytes_keys:
            state = {k.encode(): v for k, v in state.items()}
        with open(root / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump(state, f)
        truth[s] = (images, class_dict)
    return truth


def test_mini_imagenet_pickles(tmp_path):
    folder = tmp_path / "mini-imagenet"
    folder.mkdir()
    truth = write_mini_pickles(folder)
    splits = imagenet.mini_imagenet_splits(tmp_path)
    train = splits["train"]
    assert train.classes == ["n01", "n02", "n03"] and train.images.shape == (9, 3, 84, 84)
    images, class_dict = truth["train"]
    first_of_n01 = class_dict["n01"][0]
    assert torch.equal(train.images[train.indices_of(0)[0]], torch.from_numpy(images[first_of_n01]).permute(2, 0, 1))
    assert splits["val"].num_classes == 2 and splits["test"].counts.tolist() == [3, 3]
    task = EpisodeSampler(train, ways=3, shots=1, query=2).sample(torch.Generator().manual_seed(0))
    assert task.query[0].shape == (6, 3, 84, 84)


def test_mini_imagenet_pickle_with_bytes_keys_and_resize(tmp_path):
    write_mini_pickles(tmp_path, bytes_keys=True)
    data = imagenet.load_mini_imagenet_pickle(tmp_path / "mini-imagenet-cache-val.pkl", image_size=32)
    assert data.images.shape == (6, 3, 32, 32) and data.classes == ["n11", "n12"]


def test_mini_imagenet_pickle_errors(tmp_path):
    bad = tmp_path / "mini-imagenet-cache-train.pkl"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable pickle"):
        imagenet.load_mini_imagenet_pickle(bad)
    with open(bad, "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 5]}}, f)
    with pytest.raises(DataError, match="outside 0..1"):
        imagenet.load_mini_imagenet_pickle(bad)
    with open(bad, "wb") as f:
        pickle.dump({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"a": [0]}}, f)
    with pytest.raises(DataError, match="1 images belong to no class"):
        imagenet.load_mini_imagenet_pickle(bad)
    with open(bad, "wb") as f:
        pickle.dump({"images": 1}, f)
    with pytest.raises(DataError, match="no 'image_data' entry"):
        imagenet.load_mini_imagenet_pickle(bad)
    with pytest.raises(DataError, match="mini-ImageNet not found.*--data-root"):
        imagenet.mini_imagenet_splits(tmp_path / "nothing")


def write_ravi(root: Path):
    """Ravi's layout: images of any size and mode in images/, split CSVs with filename,label."""
    (root / "images").mkdir(parents=True)
    sources = {}
    for s, labels in (("train", ["n01", "n02"]), ("val", ["n11"]), ("test", ["n21"])):
        lines = ["filename,label"]
        for label in labels:
            for k in range(3):
                name = f"{label}{k:08d}.jpg" if k != 2 else f"{label}{k:08d}.png"
                img = Image.fromarray(rgb(100 + 7 * k, 120))
                if k == 2:
                    img = img.convert("L")  # a greyscale one, as ImageNet has
                img.save(root / "images" / name)
                sources[name] = img
                lines.append(f"{name},{label}")
        (root / f"{s}.csv").write_text("\n".join(lines) + "\n")
    return sources


def test_mini_imagenet_csv_images(tmp_path):
    sources = write_ravi(tmp_path)
    cache = tmp_path / "cache"
    splits = imagenet.mini_imagenet_splits(tmp_path, cache_dir=cache)
    train = splits["train"]
    assert train.classes == ["n01", "n02"] and train.images.shape == (6, 3, 84, 84)
    expected = Image.open(tmp_path / "images" / "n0200000001.jpg").convert("RGB").resize((84, 84), Image.LANCZOS)
    assert torch.equal(train.images[train.indices_of(1)[1]], torch.from_numpy(np.array(expected)).permute(2, 0, 1))
    grey = train.images[train.indices_of(0)[2]]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert len(list(cache.glob("mini-imagenet-*-84x84-*.pt"))) == 3
    again = imagenet.mini_imagenet_splits(tmp_path, cache_dir=cache)
    assert torch.equal(again["val"].images, splits["val"].images)


def test_mini_imagenet_csv_errors(tmp_path):
    write_ravi(tmp_path)
    cache = tmp_path / "cache"
    (tmp_path / "images" / "n0100000001.jpg").unlink()
    with pytest.raises(DataError, match=r"n0100000001\.jpg: listed in .*train\.csv but not found"):
        imagenet.load_mini_imagenet_csv(tmp_path, "train", cache_dir=cache)
    (tmp_path / "images" / "n1100000000.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"n1100000000\.jpg: not a readable image"):
        imagenet.load_mini_imagenet_csv(tmp_path, "val", cache_dir=cache)
    assert not cache.exists() or not list(cache.glob("*.pt"))
    (tmp_path / "test.csv").write_text("filename,label\nn2100000000.jpg,n21\nn2100000001.jpg\n")
    with pytest.raises(DataError, match=r"test\.csv:3: expected 'filename,label', got 'n2100000001\.jpg'"):
        imagenet.load_mini_imagenet_csv(tmp_path, "test", cache_dir=cache)
    (tmp_path / "test.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(DataError, match="header 'filename,label'"):
        imagenet.load_mini_imagenet_csv(tmp_path, "test", cache_dir=cache)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tiered(root: Path, as_arrays=False, corrupt_at=None):
    """{split}_images_png.pkl and {split}_labels.pkl as the tiered-ImageNet release has them."""
    truth = {}
    for s, n_classes in (("train", 4), ("val", 2), ("test", 2)):
        specific = np.repeat(np.arange(n_classes), 3)[[0, 3, 1, 4, 2, 5, 6, 7, 8, 9, 10, 11][: 3 * n_classes]]
        general = specific // 2  # two classes per category
        arrays = [rgb() for _ in specific]
        encoded = [png(a) for a in arrays]
        if as_arrays:
            encoded = [np.frombuffer(e, dtype=np.uint8) for e in encoded]
        if corrupt_at is not None and s == "val":
            encoded[corrupt_at] = b"broken"
        labels = {
            "label_specific": specific,
            "label_general": general,
            "label_specific_str": [f"{s}_class{c}" for c in range(n_classes)],
            "label_general_str": [f"{s}_category{g}" for g in range(n_classes // 2)],
        }
        with open(root / f"{s}_images_png.pkl", "wb") as f:
            pickle.dump(encoded, f)
        with open(root / f"{s}_labels.pkl", "wb") as f:
            pickle.dump(labels, f)
        truth[s] = (arrays, specific)
    return truth


@pytest.mark.parametrize("as_arrays", [False, True])
def test_tiered_imagenet(tmp_path, as_arrays):
    folder = tmp_path / "tiered-imagenet"
    folder.mkdir()
    truth = write_tiered(folder, as_arrays)
    cache = tmp_path / "cache"
    splits = imagenet.tiered_imagenet_splits(tmp_path, cache_dir=cache)
    train = splits["train"]
    assert train.classes == [f"train_class{c}" for c in range(4)]
    assert train.groups == ["train_category0", "train_category0", "train_category1", "train_category1"]
    arrays, specific = truth["train"]
    assert torch.equal(train.targets, torch.from_numpy(specific))
    assert torch.equal(train.images[5], torch.from_numpy(arrays[5]).permute(2, 0, 1))
    assert splits["test"].images.shape == (6, 3, 84, 84)
    sampler = EpisodeSampler(train, ways=2, shots=1, query=1, within_group=True)
    assert sampler.sample(torch.Generator().manual_seed(0)).support[0].shape == (2, 3, 84, 84)
    assert len(list(cache.glob("tiered-imagenet-*.pt"))) == 3


def test_tiered_imagenet_errors(tmp_path):
    write_tiered(tmp_path, corrupt_at=1)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"val_images_png\.pkl\[1\]: not a readable image"):
        imagenet.load_tiered_imagenet(tmp_path, "val", cache_dir=cache)
    assert not cache.exists() or not list(cache.glob("*.pt"))
    with open(tmp_path / "test_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": np.zeros(5, np.int64), "label_general": np.zeros(5, np.int64),
                     "label_specific_str": ["a"], "label_general_str": ["g"]}, f)
    with pytest.raises(DataError, match="6 images but 5 labels"):
        imagenet.load_tiered_imagenet(tmp_path, "test", cache_dir=cache)
    (tmp_path / "train_labels.pkl").unlink()
    with pytest.raises(DataError, match="train_labels.pkl: not found"):
        imagenet.load_tiered_imagenet(tmp_path, "train", cache_dir=cache)
    with pytest.raises(DataError, match="tiered-ImageNet not found"):
        imagenet.tiered_imagenet_splits(tmp_path / "nothing")


def test_a_crafted_mini_imagenet_pickle_never_runs(tmp_path):
    ran = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": Payload(), "class_dict": {}}))
    with pytest.raises(DataError, match="not a data pickle"):
        imagenet.load_mini_imagenet_pickle(path)
    assert not ran.exists()
