"""Metrics on generated text: fluency (n-gram entropy) and consistency (TF-IDF similarity).

Conventions of the ROME code: generations are sampled top-5, fluency is the mean of
(2/3 * H2, 4/3 * H3) with H_n the entropy in bits of the text's n-gram distribution, and
consistency is the cosine between TF-IDF vectors of the generations and of reference texts
about the new object (ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

WORD = re.compile(r"\w+|[^\w\s]")
TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token pattern


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted mean of the n-gram entropies (bits) of ``text``; 0 for too short a text."""
    words = WORD.findall(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        if not grams:
            values.append(0.0)
            continue
        p = np.array(list(grams.values()), dtype=float)
        p /= p.sum()
        values.append(w * float(-(p * np.log2(p)).sum()))
    return float(np.mean(values))


@torch.no_grad()
def sample_generations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                       top_k: int = 5, seed: int = 0, batch_size: int = 16) -> list[str]:
    """Prompt + sampled continuation for each prompt (seeded, left-padded batches)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = list(prompts[i : i + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
            ids = model.generate(**enc, do_sample=True, top_k=top_k,
                                 max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            new = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:],
                                         skip_special_tokens=True)
            out.extend(p + n for p, n in zip(batch, new))
    finally:
        tokenizer.padding_side = side
    return out


class TfidfReference:
    """Reference texts per (relation, object id) and the TF-IDF weights to compare them."""

    def __init__(self, snippets: dict, idf: np.ndarray, vocab: dict[str, int]):
        self.snippets, self.idf, self.vocab = snippets, idf, vocab

    @classmethod
    def load(cls, directory: str | Path) -> TfidfReference:
        directory = Path(directory)
        paths = [directory / n for n in ("attribute_snippets.json", "idf.npy",
                                          "tfidf_vocab.json")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"consistency needs ROME's reference files: missing "
                                    f"{', '.join(missing)}")
        raw = json.loads(paths[0].read_text())
        snippets: dict[str, dict[str, list[str]]] = {}
        for entry in raw:
            texts = [s["text"] for s in entry["samples"]]
            snippets.setdefault(entry["relation_id"], {})[entry["target_id"]] = texts
        return cls(snippets, np.load(paths[1]), json.loads(paths[2].read_text()))

    def vector(self, text: str) -> np.ndarray:
        counts = Counter(self.vocab[t] for t in TFIDF_TOKEN.findall(text.lower())
                         if t in self.vocab)
        v = np.zeros(len(self.vocab))
        for index, count in counts.items():
            v[index] = count * self.idf[index]
        return v

    def similarity(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        denom = np.linalg.norm(va) * np.linalg.norm(vb)
        return float(va @ vb / denom) if denom else 0.0

    def references(self, relation_id: str | None, object_id: str | None) -> list[str]:
        return self.snippets.get(relation_id or "", {}).get(object_id or "", [])
