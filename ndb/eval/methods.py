"""The editing methods an evaluation compares, each as "apply on entry, undo on exit"."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ndb.database import NeuralDB
from ndb.eval.baselines.editors import WeightEditConfig, applied, compute_deltas
from ndb.eval.baselines.stats import key_second_moments, read_texts
from ndb.facts import Fact
from ndb.models import DEFAULT_MODEL_IDENTITY, model_identity

METHODS = ("neuraldb", "neuraldb-paper", "memit", "memit-1", "alphaedit")
NEURALDB = ("neuraldb", "neuraldb-paper")  # databases attached; the others edit weights
SPREAD = 5  # MEMIT and AlphaEdit edit this many layers, ending at NeuralDB's layer
# MEMIT's lambda and AlphaEdit's null-space threshold, tuned for the baselines like NeuralDB's
# layer and gate (benchmarks/baseline_sweep.py; the published values suit GPT-J/Llama-3 key
# scales), by models.model_identity
BASELINE_DEFAULTS: dict[str, dict[str, float]] = {
    DEFAULT_MODEL_IDENTITY: {"mom2_weight": 3000.0, "null_threshold": 0.05},
}


def weight_edit_config(name: str, layer: int, **hyper: float) -> WeightEditConfig:
    """``hyper`` overrides WeightEditConfig's fields (mom2_weight, null_threshold, l2)."""
    method = "memit" if name.startswith("memit") else "alphaedit"
    layers = [layer] if name == "memit-1" else list(range(max(0, layer - SPREAD + 1), layer + 1))
    return WeightEditConfig(method=method, layers=layers, **hyper)


def baseline_hyper(model) -> dict[str, float]:
    """WeightEditConfig overrides for ``model`` (empty: the papers' published values)."""
    return dict(BASELINE_DEFAULTS.get(model_identity(model), {}))


def make_methods(names: Sequence[str], model, tok, facts: Sequence[Fact], db: NeuralDB,
                 stats_texts: Sequence[str | Path] = (), stats_positions: int = 100_000,
                 say: Callable[[str], None] = lambda _: None,
                 hyper: dict[str, float] | None = None,
                 paper_db: NeuralDB | None = None) -> dict[str, Callable]:
    """Context managers for the named methods: ``db`` attached (neuraldb), ``paper_db``
    attached (neuraldb-paper: per-fact residuals, ComputeConfig.paper()), and weight
    editors, which reuse the per-fact residuals (``paper_db``'s if given, else ``db``'s)
    and restore the weights on exit. ``hyper`` overrides the model's tuned WeightEditConfig
    values (``BASELINE_DEFAULTS``)."""
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    methods: dict[str, Callable] = {}
    weight_editors = [n for n in names if n not in NEURALDB]
    if "neuraldb-paper" in names and paper_db is None:
        raise ValueError("neuraldb-paper needs its database (paper_db)")
    if weight_editors and not stats_texts:
        raise ValueError("MEMIT and AlphaEdit need generic text for their C0 statistics: "
                         "pass a text file (e.g. lambada_test.jsonl)")
    source = paper_db or db
    residuals = (torch.from_numpy(source.store.read("residuals", source.ids_of(facts))).float()
                 if weight_editors else None)
    texts = read_texts(stats_texts) if weight_editors else []
    for name in names:
        if name in NEURALDB:
            methods[name] = _attached(db if name == "neuraldb" else paper_db, model, tok)
            continue
        config = weight_edit_config(name, db.config.layer,
                                    **{**baseline_hyper(model), **(hyper or {})})
        say(f"{name}: C0 statistics and weight updates for layers {config.layers} "
            f"(lambda {config.mom2_weight:g}, null threshold {config.null_threshold:g})")
        moments = key_second_moments(model, tok, texts, config.layers, db.config.fingerprint,
                                     stats_positions, progress=True)
        deltas = compute_deltas(model, tok, facts, residuals, db.config.prefixes, moments,
                                config)
        methods[name] = _weights_edited(model, deltas)
    return methods


def _attached(db: NeuralDB, model, tok) -> Callable:
    @contextmanager
    def apply() -> Iterator[None]:
        db.attach(model, tok)
        try:
            yield
        finally:
            db.detach()

    return apply


def _weights_edited(model, deltas) -> Callable:
    return lambda: applied(model, deltas)
