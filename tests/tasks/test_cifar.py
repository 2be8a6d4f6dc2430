import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metaphi.tasks import DataError, EpisodeSampler
from metaphi.tasks import cifar

FINE = sorted(c for members in cifar.SUPERCLASSES.values() for c in members)  # label order is alphabetical
COARSE = sorted(cifar.SUPERCLASSES)
COARSE_OF = {c: COARSE.index(g) for g, members in cifar.SUPERCLASSES.items() for c in members}


def make_cifar100(root: Path, per_class=(2, 1), bytes_keys=True, unpacked=False, drop=None) -> tuple[Path, dict]:
    """cifar-100-python/{train,test,meta} pickles as in the real archive (bytes keys, as Python 2 wrote
    them and `encoding='bytes'` reads them), each image filled with its split, class and index."""
    rng = np.random.default_rng(0)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    files, truth = {}, {}
    for split, n in zip(("train", "test"), per_class):
        fine = np.repeat(np.arange(100), n)
        rng.shuffle(fine)
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        truth[split] = (data, fine)
        files[split] = pickle.dumps({k("data"): data, k("fine_labels"): fine.tolist(),
                                     k("coarse_labels"): [COARSE_OF[FINE[f]] for f in fine]}, protocol=2)
    files["meta"] = pickle.dumps({k("fine_label_names"): [k(c) for c in FINE],
                                  k("coarse_label_names"): [k(c) for c in COARSE]}, protocol=2)
    if drop:
        del files[drop]
    if unpacked:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, blob in files.items():
            (folder / name).write_bytes(blob)
        return folder, truth
    path = root / "cifar-100-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, truth


def test_split_lists_are_the_published_sizes_and_partition_cifar100():
    assert [len(cifar.CIFAR_FS[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert sorted(c for names in cifar.CIFAR_FS.values() for c in names) == FINE
    assert [len(cifar.FC100[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert sorted(g for names in cifar.FC100.values() for g in names) == COARSE
    assert len(FINE) == 100 and len(set(FINE)) == 100


@pytest.mark.parametrize("bytes_keys,unpacked", [(True, False), (False, True)])
def test_load_pools_train_and_test(tmp_path, bytes_keys, unpacked):
    source, truth = make_cifar100(tmp_path, bytes_keys=bytes_keys, unpacked=unpacked)
    data = cifar.load(source, cache_dir=tmp_path / "cache")
    assert data.images.shape == (300, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.classes == FINE and data.counts.tolist() == [3] * 100
    assert data.groups[FINE.index("whale")] == "aquatic_mammals"
    train_data, train_fine = truth["train"]
    assert torch.equal(data.images[0], torch.from_numpy(train_data[0].reshape(3, 32, 32)))
    assert data.targets[0] == train_fine[0]
    test_data, _ = truth["test"]
    assert torch.equal(data.images[200], torch.from_numpy(test_data[0].reshape(3, 32, 32)))


def test_cifar_fs_and_fc100_splits(tmp_path, fixture_archives):
    (tmp_path / "cifar100").mkdir()
    make_cifar100(tmp_path / "cifar100")
    cache = tmp_path / "cache"
    fs = cifar.cifar_fs_splits(tmp_path, cache_dir=cache)
    assert {s: d.num_classes for s, d in fs.items()} == {"train": 64, "val": 16, "test": 20}
    assert fs["test"].classes == list(cifar.CIFAR_FS["test"])
    assert fs["val"].images.shape == (48, 3, 32, 32)
    fc = cifar.fc100_splits(tmp_path, cache_dir=cache)
    assert {s: d.num_classes for s, d in fc.items()} == {"train": 60, "val": 20, "test": 20}
    assert set(fc["test"].groups) == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert not set(fc["train"].classes) & set(fc["test"].classes)
    assert len(list(cache.glob("cifar100-*.pt"))) == 1  # both read one decoded cache
    task = EpisodeSampler(fc["train"], ways=5, shots=1, query=2).sample(torch.Generator().manual_seed(0))
    assert task.support[0].shape == (5, 3, 32, 32)


def test_errors(tmp_path):
    with pytest.raises(DataError) as err:
        cifar.cifar_fs_splits(tmp_path / "none")
    assert cifar.URL in str(err.value) and "--data-root" in str(err.value)
    (tmp_path / "a").mkdir()
    broken, _ = make_cifar100(tmp_path / "a", drop="meta")
    with pytest.raises(DataError, match="no cifar-100-python/meta in the archive"):
        cifar.load(broken, cache_dir=False)
    bad = tmp_path / "cifar-100-python.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="not a readable tar archive"):
        cifar.load(bad, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.pt"))


class Payload:
    """What an attacker would put in a pickle: unpickling it calls open(path, "w"), creating a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_pickle_in_an_archive_never_runs(tmp_path):
    ran = tmp_path / "payload-ran"
    path = tmp_path / "cifar-100-python.tar.gz"
    blob = pickle.dumps({b"data": Payload(ran)}, protocol=2)
    with tarfile.open(path, "w:gz") as tar:
        for name in ("train", "test", "meta"):
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match="not a data pickle.*io.open.*refused"):
        cifar.load(path, cache_dir=False)
    assert not ran.exists()
    # found on disk under the real name, the archive is refused by its hash before anything is read
    with pytest.raises(DataError, match="sha256 mismatch"):
        cifar.cifar_fs_splits(tmp_path)
    assert not ran.exists()


def test_an_archive_with_the_published_hash_is_taken(tmp_path, monkeypatch):
    path, _ = make_cifar100(tmp_path)
    monkeypatch.setattr(cifar, "SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setattr(cifar, "MD5", None)
    assert cifar.find(tmp_path) == path
