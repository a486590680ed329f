"""Token rows: an object's ids as they follow a prompt, and ragged rows padded into a batch.

One place for each, so that what residuals are optimized on (ndb.compute) and what the
metrics score (ndb.eval) are the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def target_ids(tokenizer, target: str) -> list[int]:
    """Ids of an object as it follows a prompt: one leading space, no special tokens."""
    return tokenizer(" " + target.strip(), add_special_tokens=False).input_ids


def pad_rows(rows: Sequence[Sequence[int]], value: int, *, left: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(rows), longest row) long tensors: each row padded
    with ``value`` on the right, or on the left for generation (new tokens follow the last
    real one)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
