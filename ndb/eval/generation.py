"""Metrics on generated text: fluency (n-gram entropy), consistency (TF-IDF similarity), and
the greedy generations that generative success is judged on.

Conventions of the ROME code: generations are sampled top-5, fluency is the mean of
(2/3 * H2, 4/3 * H3) with H_n the entropy in bits of the text's n-gram distribution, and
consistency is the cosine between TF-IDF vectors of the generations and of reference texts
about the new object (ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ndb.anchor import anchor_token_id, encode
from ndb.tokens import pad_rows

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


def sample_generations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 100,
                       top_k: int = 5, seed: int = 0, batch_size: int = 16) -> list[str]:
    """Prompt + sampled top-k continuation for each prompt, from a generator seeded with
    ``seed`` (the process's random state is not used), decoded as the greedy texts are.
    Only the k best tokens of a step are drawn from: transformers' ``generate`` drew over the
    whole vocabulary for every row and step."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        top, at = logits.float().topk(top_k, -1)
        return at.gather(-1, torch.multinomial(top.softmax(-1), 1, generator=generator))[:, 0]

    new = generate(model, tokenizer, [tokenizer(p).input_ids for p in prompts],
                   max_new_tokens, batch_size, choose=draw)
    return [p + n for p, n in zip(prompts, new)]


def _normalized(text: str) -> str:
    """Compatibility forms, accents dropped, case folded, curly quotes and whitespace runs
    made plain: "São  Tomé" and "sao tome" compare equal."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(text.casefold().split())


def first_mention(text: str, name: str) -> int | None:
    """Where ``text`` first names ``name`` as a whole word or phrase, after normalization
    (an offset into the normalized text), or None.

    A word derived from the name does not count: "Japanese" does not mention "Japan", nor
    "Iranian" "Iran" (an adjective says where something is from, not that it is the place).
    """
    needle = _normalized(name)
    if not needle:
        return None
    found = re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", _normalized(text))
    return found.start() if found else None


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` names ``name`` (see ``first_mention``)."""
    return first_mention(text, name) is not None


def answers_with(text: str, name: str, instead_of: str) -> bool:
    """Whether ``text`` names ``name`` before ``instead_of``, or without it: the answer it
    gives is ``name``, whatever it goes on to say."""
    at, own = first_mention(text, name), first_mention(text, instead_of)
    return at is not None and (own is None or at < own)


def settled_mentions(text: str, names: Sequence[str]) -> bool:
    """Whether ``text`` mentions every name in ``names`` in a way no continuation can undo:
    each mention is followed by a character that is not part of a word (a mention at the
    very end may still grow into another word, "Japan" into "Japanese")."""
    if text.endswith("\ufffd"):  # a character cut between tokens: wait for the rest
        return False
    normalized = _normalized(text)
    return all(re.search(rf"(?<!\w){re.escape(needle)}(?=\W)", normalized) is not None
               for needle in map(_normalized, names) if needle) and any(names)


def _most_likely(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


@torch.no_grad()
def generate(model, tokenizer, inputs: Sequence[Sequence[int]], max_new_tokens: int,
             batch_size: int = 16, watch: Sequence[Sequence[str]] | None = None,
             choose: Callable[[torch.Tensor], torch.Tensor] = _most_likely) -> list[str]:
    """Continuation (the new text only) of each token-id sequence, each next token picked
    from the last logits by ``choose`` (default: the most likely).

    Batches are left-padded with an attention mask, so the hook skips the padding and each
    row's first real token; sequences of similar length share a batch. The tokenizer is
    not touched (padding is done here, not through ``padding_side``). A row stops at an
    end-of-sequence token or, when ``watch`` names what its text is judged on, once it
    mentions all of it for good (``settled_mentions``): the text may be shorter, but every
    judgement on it is the same as on the full one.
    """
    pad = anchor_token_id(tokenizer)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    out = [""] * len(inputs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        texts = _decode_batch(model, tokenizer, [inputs[i] for i in rows], max_new_tokens,
                              pad, None if watch is None else [watch[i] for i in rows], choose)
        for i, text in zip(rows, texts):
            out[i] = text
    return out


def _decode_batch(model, tokenizer, rows: list[Sequence[int]], max_new_tokens: int, pad: int,
                  watch: list[Sequence[str]] | None,
                  choose: Callable[[torch.Tensor], torch.Tensor]) -> list[str]:
    """One left-padded batch decoded with a key-value cache; rows that are done
    (end of sequence, or all their watched names settled) leave the batch, so they cost
    nothing more."""
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    ids, mask = pad_rows(rows, pad, left=True)
    mask = mask.to(device)
    position = mask.sum(1)
    out = model(input_ids=ids.to(device), attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True,
                logits_to_keep=1)
    cache, live = out.cache, list(range(len(rows)))
    new: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        tokens = choose(out.logits[:, -1])
        keep = []
        for n, r in enumerate(live):
            token = int(tokens[n])
            if token in eos:
                continue
            new[r].append(token)
            settled = watch is not None and settled_mentions(
                tokenizer.decode(new[r], skip_special_tokens=True), watch[r])
            if step + 1 < max_new_tokens and not settled:
                keep.append(n)
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens, mask, position = tokens[index], mask[index], position[index]
        live = [live[n] for n in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        out = model(input_ids=tokens[:, None], attention_mask=mask,
                    position_ids=position[:, None], cache=cache, use_cache=True)
        position = position + 1
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def chat_ids(tokenizer, question: str) -> list[int]:
    """A user question in the model's chat template, ready for the answer. The template
    starts with a fixed token of its own, so no anchor is added."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


class ModelGenerator:
    """Greedy continuations of prompts and chat answers to questions, from one model."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 16, chat_tokens: int = 32,
                 batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.chat_tokens, self.batch_size = (max_new_tokens, chat_tokens,
                                                                  batch_size)

    @property
    def has_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def complete(self, prompts: Sequence[str], watch: Sequence[Sequence[str]] | None = None
                 ) -> list[str]:
        return generate(self.model, self.tokenizer, [encode(self.tokenizer, p) for p in prompts],
                        self.max_new_tokens, self.batch_size, watch)

    def chat(self, questions: Sequence[str], watch: Sequence[Sequence[str]] | None = None
             ) -> list[str]:
        return generate(self.model, self.tokenizer,
                        [chat_ids(self.tokenizer, q) for q in questions],
                        self.chat_tokens, self.batch_size, watch)


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
