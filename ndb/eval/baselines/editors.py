"""MEMIT and AlphaEdit, the linear weight editors NeuralDB is compared with (paper sec. 3).

Both reuse ndb's keys and residuals. For a spread over layers l_1 < ... < l_n = l*, with
z_i = h_{l*}(fact i) + r_i the wanted output of layer l* at the subject's last token:

    for each layer l_j:  K = keys at l_j (current weights), R = (z - h_{l*}) / (n - j + 1)
        MEMIT:      Delta = R K^T (lambda C0 + K K^T)^-1
        AlphaEdit:  Delta = [(P K K^T + l2 I)^-1 P K R^T]^T,  P = projector on the null
                    space of C0 (eigenvalues below a threshold)
        W_l += Delta

A single layer (n = 1) gives R = the residuals themselves. These methods change weights;
``applied`` restores the originals on exit, so a model is never left edited by accident.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ndb import nethook
from ndb.compute import compute_keys, encode_prompt
from ndb.facts import Fact
from ndb.models import decoder_layers, ffn_out_weight
from ndb.tokens import pad_rows


@dataclass
class WeightEditConfig:
    """Hyper-parameters (MEMIT's and AlphaEdit's published values unless noted)."""

    method: str = "memit"  # or "alphaedit"
    layers: list[int] = field(default_factory=list)  # the last one is the residuals' layer
    mom2_weight: float = 15000.0  # MEMIT's lambda (GPT-J and Llama-3 settings)
    l2: float = 10.0  # AlphaEdit's L2 term
    null_threshold: float = 2e-2  # AlphaEdit: eigenvalues of C0 below this span the null space

    def __post_init__(self):
        if self.method not in ("memit", "alphaedit"):
            raise ValueError(f"unknown weight-editing method {self.method!r}")
        if not self.layers or sorted(self.layers) != list(self.layers):
            raise ValueError(f"layers must be a non-empty ascending list, got {self.layers}")


@torch.no_grad()
def layer_outputs(model, tokenizer, facts: Sequence[Fact], layer: int) -> torch.Tensor:
    """Output of decoder ``layer`` at each fact's subject (bare prompt), (n, d2)."""
    device = next(model.parameters()).device
    rows = [encode_prompt(tokenizer, "", f.prompt, f.subject) for f in facts]
    ids, mask = pad_rows([r for r, _ in rows], 0)
    with nethook.capture_output(decoder_layers(model)[layer]) as box:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return box["x"][torch.arange(len(rows)), torch.tensor([s for _, s in rows])].float().cpu()


def null_space_projector(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U0 U0^T over the eigenvectors of C0 whose eigenvalues are below ``threshold``."""
    values, vectors = torch.linalg.eigh(moment.double())
    null = vectors[:, values < threshold]
    return null @ null.T


@contextmanager
def applied(model: nn.Module, deltas: dict[int, torch.Tensor]) -> Iterator[None]:
    """Add ``deltas`` (layer -> (d2, d1)) to the model's weights; restore them on exit."""
    saved = {}
    try:
        for layer, delta in deltas.items():
            w = ffn_out_weight(model, layer)
            saved[layer] = w.detach().clone()
            w.data += delta.to(w.device, w.dtype)
        yield
    finally:
        for layer, original in saved.items():
            ffn_out_weight(model, layer).data.copy_(original)


def compute_deltas(model, tokenizer, facts: Sequence[Fact], residuals: torch.Tensor,
                   prefixes: Sequence[str], moments: dict[int, torch.Tensor],
                   config: WeightEditConfig) -> dict[int, torch.Tensor]:
    """Weight updates per layer for ``facts`` with ``residuals`` at ``config.layers[-1]``.

    Layers are edited in turn (later keys see earlier edits, as in MEMIT) inside
    ``applied``, so the model comes back unchanged.
    """
    top = config.layers[-1]
    targets = layer_outputs(model, tokenizer, facts, top).double() + residuals.double()
    deltas: dict[int, torch.Tensor] = {}
    for j, layer in enumerate(config.layers):
        with applied(model, deltas):
            keys = compute_keys(model, tokenizer, facts, layer, prefixes).double().T  # (d1, n)
            current = layer_outputs(model, tokenizer, facts, top).double()
        spread = (targets - current).T / (len(config.layers) - j)  # (d2, n)
        c0 = moments[layer].double()
        if config.method == "memit":
            adjusted = torch.linalg.solve(config.mom2_weight * c0 + keys @ keys.T, keys)
            delta = spread @ adjusted.T
        else:
            p = null_space_projector(c0, config.null_threshold)
            eye = torch.eye(len(c0), dtype=torch.float64)
            delta = torch.linalg.solve(p @ (keys @ keys.T) + config.l2 * eye,
                                       p @ keys @ spread.T).T
        deltas[layer] = delta.float()
    return deltas


def weight_scores(keys: torch.Tensor, queries: torch.Tensor, moment: torch.Tensor,
                  config: WeightEditConfig) -> torch.Tensor:
    """The paper's Figure 2 view, w = K^T S k: how much of each fact's residual a query
    key retrieves under the single-layer update (queries (m, d1) -> w (m, n))."""
    keys, queries, c0 = keys.double().T, queries.double().T, moment.double()
    if config.method == "memit":
        s_k = torch.linalg.solve(config.mom2_weight * c0 + keys @ keys.T, queries)
    else:
        p = null_space_projector(c0, config.null_threshold)
        eye = torch.eye(len(c0), dtype=torch.float64)
        s_k = p @ torch.linalg.solve(keys @ keys.T @ p + config.l2 * eye, queries)
    return (s_k.T @ keys).float()
