"""Calibrating an approximate key index on the model's own keys: the keys of every token of
texts that mention stored subjects, computed by the unedited model, tune the index until its
gate decisions agree with exact search. Loaded only once a database's index searches
approximately (an IVF kind, trained)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ndb import nethook
from ndb.anchor import encode
from ndb.attachment import unedited
from ndb.config import NeuralDBConfig
from ndb.facts import Fact
from ndb.models import ffn_out_path, get_module
from ndb.store import write_config

if TYPE_CHECKING:
    from ndb.keyset import KeySet

CALIBRATION_FACTS = 256  # facts whose texts calibrate an approximate index
CALIBRATION_QUESTION = "Tell me about {}."  # other text around the subject than a fact's prompt


def calibrate(keys: KeySet, model, tokenizer, facts: list[Fact], progress: bool = False
              ) -> dict[int, float]:
    """Tune ``keys``' index on the unedited ``model``'s token keys of texts about ``facts``
    (see ``calibration_texts``) until its gate decisions agree with exact search on 99.9% of
    them, and record the tuning in the config, for an index rebuilt later; returns {setting
    tried: agreement}; {} for an exact index, with nothing to tune."""
    config, store = keys.config, keys.store
    with store.writing():
        if not keys.approximate:
            return {}
        config.check_model(model, store.path)  # keys of another model mislead
        texts = calibration_texts(facts, config.seed)
        with unedited(model):
            queries = token_queries(model, tokenizer, config.layer, texts,
                                    progress="texts for calibrating the index" if progress
                                    else None)
        index = keys.index
        with tqdm(desc="calibrating the key index", unit="key", unit_scale=True,
                  disable=not progress, leave=False) as bar:
            def scanned(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            table = index.calibrate(queries, config.gamma, progress=scanned)
        done = {"kind": index.kind, "gamma": config.gamma, "n_keys": keys.n_keys(),
                **index.tuning()}
        # the config on disk, not this process's copy of it, with the tuning in
        on_disk = NeuralDBConfig.read(store.path).to_dict()
        write_config(store.path, {**on_disk, "index_calibration": done})
        config.index_calibration = done
    return table


def calibration_texts(facts: list[Fact], seed: int) -> list[str]:
    """Texts that mention stored subjects, whose token keys calibrate the index: the prompts
    of a seeded sample of facts, and a question about each of their subjects."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(facts), min(len(facts), CALIBRATION_FACTS), replace=False)
    sample = [facts[i] for i in sorted(picked)]
    return [f.text for f in sample] + [CALIBRATION_QUESTION.format(f.subject) for f in sample]


@torch.no_grad()
def token_queries(model, tokenizer, layer: int, texts: Sequence[str], max_tokens: int = 128,
                  progress: str | None = None) -> np.ndarray:
    """Normalized keys of every token (but the anchor) of each of ``texts`` at ``layer``: the
    queries the hook searches with while the model reads them. ``progress``: the label of a
    bar of the texts read (None: no bar)."""
    module = get_module(model, ffn_out_path(model, layer))
    device, out = next(model.parameters()).device, []
    for text in tqdm(texts, desc=progress, unit="text", disable=progress is None, leave=False):
        ids = torch.tensor([encode(tokenizer, text)[:max_tokens]], device=device)
        x = nethook.run_until(model, module, input_ids=ids)[0, 1:].float().cpu()
        out.append(F.normalize(x, dim=-1).numpy())
    return np.concatenate(out)
