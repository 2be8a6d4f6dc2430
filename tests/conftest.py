import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # generated data sets are cached per test session, never in the user's cache
    os.environ.setdefault("METAPHI_CACHE", str(tmp_path_factory.mktemp("metaphi-cache")))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared machine: a second intra-op thread only waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Float64 by default, for comparisons with independent computations."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def fixture_archives(monkeypatch):
    """Archives written by a test carry the real names but not the published contents: skip the check
    of their hashes (tests/tasks/test_download.py and test_archive_hashes test the check itself)."""
    from metaphi.tasks import cifar, omniglot

    monkeypatch.setattr(omniglot, "ARCHIVES", {k: {"sha256": None, "md5": None} for k in omniglot.ARCHIVES})
    monkeypatch.setattr(cifar, "SHA256", None)
    monkeypatch.setattr(cifar, "MD5", None)
