"""The hook's search path: device backends keep search and residual gather on the device,
and host and device backends make the same decisions."""

import numpy as np
import pytest
import torch

from ndb import NeuralDB
from ndb.models import get_module

from conftest import FACTS

EDITED = [f.text for f in FACTS]
UNRELATED = ["The weather was mild that spring and the", "She opened the door slowly"]
READ_BACKS = ("cpu", "numpy", "item", "tolist", "nonzero", "__bool__")  # each waits for a device


def projection_io(db: NeuralDB, model, tok, texts: list[str]):
    """(input, output) of the edited projection for ``texts`` (right-padded), unedited."""
    seen = {}
    module = get_module(model, db.config.module)
    handle = module.register_forward_hook(lambda _m, i, o: seen.update(io=(i[0], o)))
    tok.padding_side = "right"
    with torch.no_grad(), db.disabled():
        model(**tok(texts, return_tensors="pt", padding=True))
    handle.remove()
    return seen["io"]


def test_device_index_path_reads_nothing_back(db, llama, monkeypatch):
    """With the torch index and every residual cached, a forward through the hook never
    copies to the host nor reads a value back: on an accelerator nothing waits."""
    model, tok = llama
    db.attach(model)
    assert db.index.searches_on_device and db.retrieval.residuals._device_slots is not None
    keys, output = projection_io(db, model, tok, EDITED + UNRELATED)
    expected = db.retrieval._after_projection(None, (keys,), output)

    def read_back(*_args, **_kwargs):
        raise AssertionError("the hook read a tensor back to the host")

    for name in READ_BACKS:
        monkeypatch.setattr(torch.Tensor, name, read_back)
    edited = db.retrieval._after_projection(None, (keys,), output)
    monkeypatch.undo()
    assert torch.equal(edited, expected)
    assert db.retrieval.stats.hits >= 2 * len(FACTS)  # both calls fired on the edited prompts


def test_host_and_device_indexes_decide_alike(tmp_path, db, llama):
    """The same facts behind a host index (flat: searchable rows only) and the device path
    (torch: every row searched, decisions masked) give the same logits, bit for bit, and the
    same counts; unedited rows stay bit for bit either way."""
    model, tok = llama
    host = NeuralDB.create(tmp_path / "host", model, tok, layer=2, gamma=0.9, index="flat",
                           compute=db.config.compute)
    host.add_vectors(FACTS, db.store.read("keys").astype(np.float32),
                     db.store.read("residuals").astype(np.float32))
    assert not host.index.searches_on_device and db.index.searches_on_device
    texts = EDITED + UNRELATED
    results = {}
    for name, base in (("host", host), ("device", db)):
        for side in ("left", "right"):
            tok.padding_side = side
            enc = tok(texts, return_tensors="pt", padding=True)
            base.attach(model)
            with torch.no_grad():
                results[name, side] = model(**enc).logits
            stats = base.retrieval.stats
            results[name, side, "counts"] = (stats.searched, stats.hits)
            base.detach()
            if side == "right":
                with torch.no_grad():
                    plain = model(**enc).logits
    tok.padding_side = "right"
    for side in ("left", "right"):
        assert torch.equal(results["host", side], results["device", side])
        assert results["host", side, "counts"] == results["device", side, "counts"]
    unrelated = slice(len(EDITED), None)
    assert torch.equal(results["device", "right"][unrelated], plain[unrelated])
    assert not torch.equal(results["device", "right"][: len(EDITED)], plain[: len(EDITED)])


def test_stats_count_lazily_and_reset(db, llama):
    model, tok = llama
    db.attach(model)
    keys, output = projection_io(db, model, tok, EDITED[:1])
    db.retrieval._after_projection(None, (keys,), output)
    stats = db.retrieval.stats
    assert isinstance(stats.hits, int) and stats.hits >= 1
    assert stats.searched == keys.shape[1] - 1  # all but the first position
    stats.hits = stats.searched = 0
    assert (stats.hits, stats.searched) == (0, 0)


@pytest.mark.parametrize("cache_facts", [len(FACTS), 2])
def test_residual_lookup_matches_get(db, cache_facts):
    """lookup() gathers on the device while everything is cached (after a change too), and
    goes through the host otherwise; wanted rows are exact, others may carry id -1."""
    small = NeuralDB.from_pretrained(db.path, cache_bytes=cache_facts * 4 * db.config.d_value)
    from ndb.residual_cache import ResidualCache

    cache = ResidualCache(small.store, small.config.d_value, capacity_bytes=small._cache_bytes)
    cache.warm()
    residuals = torch.from_numpy(small.store.read("residuals").astype(np.float32))
    ids = torch.tensor([3, -1, 0, 3, 1])
    wanted = torch.tensor([True, False, True, True, False])
    assert (cache._device_slots is not None) == (cache_facts == len(FACTS))
    got = cache.lookup(ids, wanted)
    assert got.shape == (5, small.config.d_value)
    assert torch.equal(got[wanted], residuals[ids[wanted]])
    cache.forget(np.array([3]))
    assert cache._device_slots is None
    assert torch.equal(cache.lookup(ids, wanted)[wanted], residuals[ids[wanted]])
    assert (cache._device_slots is not None) == (cache_facts == len(FACTS))
