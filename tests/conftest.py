import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # generated data sets are cached per test session, never in the user's cache
    os.environ.setdefault("METAPHI_CACHE", str(tmp_path_factory.mktemp("metaphi-cache")))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
