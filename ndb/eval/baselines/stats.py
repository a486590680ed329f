"""Preserved-knowledge statistics for the weight editors: C0 = E[k k^T] over generic text.

MEMIT and AlphaEdit protect what the model already does by keeping W k unchanged for keys
k of generic text. The originals sample Wikipedia; here the text is whatever the user points
at (by default LAMBADA passages, which ndb's evaluation already reads). The second moment
is accumulated in float64 over up to ``n_positions`` token positions and cached on disk per
model fingerprint, layer, text source and count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ndb import nethook
from ndb.anchor import encode
from ndb.errors import ConfigError
from ndb.models import ffn_out_path, get_module, ndb_home
from ndb.store import atomic_path
from ndb.tokens import pad_rows


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """Texts from .txt files (one per non-empty line) or JSONL ({"text"} or {"context"})."""
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"text file for C0 statistics not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason})") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix in (".jsonl", ".json"):
                line = _jsonl_text(line, f"{path}: line {lineno}")
            texts.append(line)
    if not texts:
        raise ConfigError(f"no text found in {', '.join(map(str, paths))}")
    return texts


def _jsonl_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
    text = record.get("text") or record.get("context", "") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected an object with a string 'text' or 'context'")
    return text


def _cache_path(fingerprint: str, layer: int, texts: Sequence[str], n_positions: int) -> Path:
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    return ndb_home() / "stats" / fingerprint / f"layer{layer}-{digest}-{n_positions}.pt"


@torch.no_grad()
def key_second_moments(model, tokenizer, texts: Sequence[str], layers: Sequence[int],
                       fingerprint: str, n_positions: int = 100_000, max_tokens: int = 256,
                       batch_size: int = 16, progress: bool = False) -> dict[int, torch.Tensor]:
    """E[k k^T] (d1 x d1, float64) of the FFN keys at each layer over generic text."""
    out, todo = {}, []
    for layer in layers:
        path = _cache_path(fingerprint, layer, texts, n_positions)
        if path.is_file():
            out[layer] = torch.load(path)["moment"]
        else:
            todo.append(layer)
    if not todo:
        return out
    modules = {layer: get_module(model, ffn_out_path(model, layer)) for layer in todo}
    sums: dict[int, torch.Tensor] = {}
    count = 0
    device = next(model.parameters()).device
    bar = tqdm(total=n_positions, desc="C0 statistics", unit="tok", disable=not progress)
    for start in range(0, len(texts), batch_size):
        rows = [encode(tokenizer, t)[:max_tokens] for t in texts[start : start + batch_size]]
        ids, mask = pad_rows(rows, 0)
        with ExitStack() as stack:
            boxes = {layer: stack.enter_context(
                nethook.capture_input(modules[layer], stop=layer == max(todo)))
                for layer in todo}
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except nethook.StopForward:
                pass
        keep = mask.bool().to(device)
        take = min(int(keep.sum()), n_positions - count)
        for layer in todo:
            k = boxes[layer]["x"][keep][:take].double()
            sums[layer] = sums.get(layer, 0) + k.T @ k
        count += take
        bar.update(take)
        if count >= n_positions:
            break
    bar.close()
    for layer in todo:
        moment = (sums[layer] / count).cpu()
        path = _cache_path(fingerprint, layer, texts, n_positions)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"moment": moment, "positions": count, "texts": len(texts)}, tmp)
        out[layer] = moment
    return out
