import json

import numpy as np
import torch

from ndb import store as st
from ndb.residual_cache import ResidualCache


def make_store(tmp_path, n=6, dim=4):
    st.create(tmp_path / "db", {})
    store = st.Store(tmp_path / "db")
    residuals = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    store.append(np.zeros((n, 3), np.float16), residuals, [json.dumps({}) for _ in range(n)])
    return store, residuals


def test_lookup_in_order_with_repeats(tmp_path):
    store, residuals = make_store(tmp_path)
    cache = ResidualCache(store, 4)
    ids = np.array([3, 1, 3, 5])
    assert torch.equal(cache.get(ids), torch.from_numpy(residuals[ids]))
    assert (cache.misses, cache.hits) == (3, 0)
    cache.get(np.array([1]))
    assert cache.hits == 1 and len(cache) == 3


def test_least_recently_used_make_way(tmp_path):
    store, residuals = make_store(tmp_path)
    cache = ResidualCache(store, 4, capacity_bytes=3 * 4 * 4)  # room for 3
    cache.get(np.array([0, 1, 2]))
    cache.get(np.array([0]))  # 1 is now the least recently used
    assert torch.equal(cache.get(np.array([4, 0])), torch.from_numpy(residuals[[4, 0]]))
    assert set(cache._id_of.tolist()) == {0, 2, 4}
    wide = cache.get(np.array([0, 1, 2, 3, 5]))  # more than fits: read through
    assert torch.equal(wide, torch.from_numpy(residuals[[0, 1, 2, 3, 5]]))
    assert len(cache) == 3


def test_forget_and_warm(tmp_path):
    store, residuals = make_store(tmp_path)
    cache = ResidualCache(store, 4)
    cache.warm()
    assert len(cache) == 6 and cache.misses == 6
    cache.forget(np.array([2, 99]))
    assert len(cache) == 5
    assert torch.equal(cache.get(np.array([2])), torch.from_numpy(residuals[[2]]))
    assert cache.misses == 7
