"""Gated retrieval on the edited FFN output projection (paper eqs. 11-12).

For every searched token: k = the projection's input, j = argmax_i cos(k, k_i), and the
output becomes W k + r_j if cos(k, k_j) > gamma, else W k (left untouched, bit for bit).

Which tokens are searched: every attended token except each sequence's first one (the
anchor, or an attention sink when the input has no anchor), never padding. The attention
mask is read by a pre-hook on the base model, so this also holds for generate() with its
KV cache, where each call carries only the new tokens and the mask covers them all.

On an accelerator nothing in a forward pass waits for the device: an index that searches on
the device (torch, gpu-flat) gets every row and the mask picks the decisions, the residuals
are gathered on the device (ndb.residual_cache), and the counters stay device tensors until
read. A host index (flat, ivf) gets the searchable rows only, which cross to the host anyway.
Either way a row that does not fire is returned bit for bit.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Collection

import numpy as np
import torch
from torch import nn

from ndb.indexes import KeyIndex
from ndb.residual_cache import ResidualCache


class GateStats:
    """Counters since the last reset, for benchmarks and the gate-score view.

    ``searched`` and ``hits`` may be set (to reset them). The hook adds device tensors to them
    without reading them back, so that a forward pass on an accelerator never waits for the
    device; they are read back when asked for.
    """

    def __init__(self):
        self.calls = 0
        self._searched: int | torch.Tensor = 0
        self._hits: int | torch.Tensor = 0
        self.scores: list[np.ndarray] = []  # filled only when recording

    @property
    def searched(self) -> int:
        return int(self._searched)

    @searched.setter
    def searched(self, value: int) -> None:
        self._searched = value

    @property
    def hits(self) -> int:
        return int(self._hits)

    @hits.setter
    def hits(self, value: int) -> None:
        self._hits = value

    def count(self, searched: int | torch.Tensor, hits: torch.Tensor) -> None:
        self._searched = self._searched + searched
        self._hits = self._hits + hits.sum()


def searchable_positions(batch: int, length: int, attention_mask: torch.Tensor | None,
                         past_length: int, device: torch.device | str | None = None
                         ) -> torch.Tensor:
    """(batch, length) bool: tokens of this call that may be searched (on the mask's device,
    else on ``device``)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.bool()
        total = mask.shape[1]
        first = mask.int().argmax(dim=1)  # each row's first attended column
        cols = torch.arange(total - length, total, device=mask.device)
        return mask[:, total - length :] & (cols[None, :] != first[:, None])
    positions = torch.arange(past_length, past_length + length, device=device)
    return (positions != 0).expand(batch, length)


class GatedRetrieval:
    """The hooks that put a fact database into a model's forward pass."""

    def __init__(self, index: KeyIndex, residuals: ResidualCache, gamma: float,
                 anchor_id: int | None = None, keys_per_fact: int = 1,
                 fixed_first: Collection[int] = ()):
        self.index = index
        self.keys_per_fact = keys_per_fact  # index ids are fact_id * keys_per_fact + k
        self.residuals = residuals
        self.gamma = gamma
        self.anchor_id = anchor_id
        # first tokens that need no warning: the anchor, and special tokens such as a chat
        # template's <|im_start|> (no subject can sit there; see anchor.fixed_first_ids)
        allowed = {*fixed_first} if anchor_id is None else {anchor_id, *fixed_first}
        self._fixed_first = torch.tensor(sorted(allowed), dtype=torch.long)
        self.enabled = True
        self.record = False
        self.stats = GateStats()
        # which tokens the current forward pass may search, per thread: the pre-hook sets
        # it and the projection hook of the same call reads it, so that one model can run in
        # several threads at once
        self._call = threading.local()
        self._handles: list = []
        self._warned = False

    def attach(self, base_model: nn.Module, projection: nn.Module) -> None:
        self._handles = [
            base_model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            projection.register_forward_hook(self._after_projection),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._call = threading.local()

    def _before_forward(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = (ids if ids is not None else embeds).shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        device = (ids if ids is not None else embeds).device
        self._call.searchable = searchable_positions(shape[0], shape[1], mask, past, device)
        if ids is not None and past == 0 and self.anchor_id is not None and not self._warned:
            self._check_anchor(ids, mask)

    def _check_anchor(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        first = mask.int().argmax(1) if mask is not None and mask.dim() == 2 else None
        starts = ids[:, 0] if first is None else ids.gather(1, first[:, None].to(ids.device))[:, 0]
        if not bool(torch.isin(starts.cpu(), self._fixed_first).all()):
            self._warned = True
            warnings.warn(
                f"ndb: an input does not start with the anchor token (id {self.anchor_id}); "
                "its first token is never searched, so an edit whose subject is the very "
                "first word cannot apply. Use the tokenizer from ndb.load_model, or "
                "ndb.anchor_tokenizer(tokenizer).",
                stacklevel=3,
            )

    @torch.no_grad()
    def _after_projection(self, _module, inputs, output):
        if not self.enabled or self.index.ntotal == 0:
            return None
        self.stats.calls += 1
        keys = inputs[0].reshape(-1, inputs[0].shape[-1])
        searchable = getattr(self._call, "searchable", None)
        if searchable is None or searchable.shape != inputs[0].shape[:2]:
            # called outside the base model's forward: search all but absolute position 0
            searchable = searchable_positions(*inputs[0].shape[:2], None, 0, keys.device)
        searchable = searchable.reshape(-1).to(keys.device)
        # see the module docstring: a device index searches every row, a host index only
        # the searchable ones (which spares its searches and keeps padding out of it)
        rows = None if self.index.searches_on_device else searchable.nonzero().squeeze(1)
        queries = keys if rows is None else keys.index_select(0, rows)
        if len(queries) == 0:
            return None
        queries = queries.float()
        queries = queries / queries.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        found = self.index.search_tensor(queries, floor=self.gamma)
        scores, ids = (t.to(keys.device) for t in found)
        fire = scores > self.gamma
        if rows is None:
            fire &= searchable
            self.stats.count(searchable.sum(), fire)
        else:
            self.stats.count(len(rows), fire)
        if self.record:
            searched = scores if rows is not None else scores[searchable]
            self.stats.scores.append(searched.cpu().numpy())
        if rows is not None and not bool(fire.any()):
            # a host index has already synchronized: when nothing fires (most tokens), leave
            # the output alone rather than gather and rewrite it
            return None
        residuals = self.residuals.lookup(ids // self.keys_per_fact, fire)
        out = output.reshape(-1, output.shape[-1])
        chosen = out if rows is None else out.index_select(0, rows)
        # where(), not an add of zeros: rows that do not fire stay bit for bit (-0.0 + 0 = +0.0)
        edited = torch.where(fire[:, None], chosen + residuals.to(out.dtype), chosen)
        out = edited if rows is None else out.index_copy(0, rows, edited)
        return out.view_as(output)
