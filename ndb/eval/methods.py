"""The editing methods an evaluation compares, each as "apply on entry, undo on exit"."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from ndb.baselines.editors import WeightEditConfig, applied, compute_deltas
from ndb.baselines.stats import key_second_moments, read_texts
from ndb.database import NeuralDB
from ndb.facts import Fact
from ndb.models import baseline_hyper

METHODS = ("neuraldb", "memit", "memit-1", "alphaedit")
SPREAD = 5  # MEMIT and AlphaEdit edit this many layers, ending at NeuralDB's layer


def weight_edit_config(name: str, layer: int, **hyper: float) -> WeightEditConfig:
    """``hyper`` overrides WeightEditConfig's fields (mom2_weight, null_threshold, l2)."""
    method = "memit" if name.startswith("memit") else "alphaedit"
    layers = [layer] if name == "memit-1" else list(range(max(0, layer - SPREAD + 1), layer + 1))
    return WeightEditConfig(method=method, layers=layers, **hyper)


def make_methods(names: Sequence[str], model, tok, facts: Sequence[Fact], db: NeuralDB,
                 stats_texts: Sequence[str | Path] = (), stats_positions: int = 100_000,
                 say: Callable[[str], None] = lambda _: None,
                 hyper: dict[str, float] | None = None) -> dict[str, Callable]:
    """Context managers for the named methods; weight editors reuse the database's
    residuals (computed once for NeuralDB) and restore the weights on exit. ``hyper``
    overrides the model's tuned WeightEditConfig values (``models.BASELINE_DEFAULTS``)."""
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
    methods: dict[str, Callable] = {}
    weight_editors = [n for n in names if n != "neuraldb"]
    if weight_editors and not stats_texts:
        raise ValueError("MEMIT and AlphaEdit need generic text for their C0 statistics: "
                         "pass a text file (e.g. lambada_test.jsonl)")
    residuals = torch.from_numpy(db.store.read("residuals", db.lookup(facts))).float()
    texts = read_texts(stats_texts) if weight_editors else []
    for name in names:
        if name == "neuraldb":
            methods[name] = _attached(db, model, tok)
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
