"""Teacher-forced scoring of completions: the primitive every edit metric is built on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ndb.anchor import anchor_token_id, encode
from ndb.tokens import pad_rows, target_ids


def score_targets(
    model,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """For each (prompt, target): mean NLL per target token, and whether greedy decoding
    reproduces every target token (ZsRE's top-1 accuracy, as a fraction of tokens)."""
    nll, top1 = score_choices(model, tokenizer, prompts, [[t] for t in targets], batch_size)
    return nll[:, 0], top1[:, 0]


@torch.no_grad()
def score_choices(
    model,
    tokenizer,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """``score_targets`` for several targets per prompt, as (len(prompts), k) arrays: each
    prompt runs once, and its targets continue from its cached keys and values (the shared
    prefix is not computed again). Prompts of the same token length share a batch."""
    device = next(model.parameters()).device
    pad = anchor_token_id(tokenizer)
    prompt_ids = [encode(tokenizer, p) for p in prompts]
    target_tokens = [[target_ids(tokenizer, t) for t in ts] for ts in choices]
    k = len(choices[0]) if len(choices) else 0
    nll, top1 = np.zeros((len(prompts), k)), np.zeros((len(prompts), k))
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        nll[rows], top1[rows] = _score_batch(model, [prompt_ids[i] for i in rows],
                                             [target_tokens[i] for i in rows], pad, device)
    return nll, top1


def _score_batch(model, prompts: list[list[int]], targets: list[list[list[int]]], pad: int,
                 device) -> tuple[np.ndarray, np.ndarray]:
    """``score_choices`` of one batch. Prompts are left-padded (positions count real tokens
    only), so each row's last token predicts its targets' first; the other target tokens are
    fed after it, one row per (prompt, target), reusing the prompts' cache."""
    ids, mask = pad_rows(prompts, pad, left=True)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), -1).cpu()
    rest = [(r, j) for r, ts in enumerate(targets) for j, t in enumerate(ts) if len(t) > 1]
    if rest:  # targets of more than one token: their later tokens, after the prompt's cache
        source = [r for r, _ in rest]
        cache = out.cache
        cache.batch_select_indices(torch.tensor(source, device=device))
        fed, fed_mask = pad_rows([targets[r][j][:-1] for r, j in rest], pad)
        fed_positions = (torch.tensor([len(prompts[r]) for r in source])[:, None]
                         + torch.arange(fed.shape[1])[None, :])
        later = model(input_ids=fed.to(device),
                      attention_mask=torch.cat([mask[source], fed_mask], 1).to(device),
                      position_ids=fed_positions.to(device), cache=cache, use_cache=False)
        later = F.log_softmax(later.logits.float(), -1).cpu()
    row_of = {pair: n for n, pair in enumerate(rest)}
    shape = (len(targets), len(targets[0]))
    nll, top1 = np.zeros(shape), np.zeros(shape)
    for r, ts in enumerate(targets):
        for j, tgt in enumerate(ts):
            logp = first[r][None]
            if (r, j) in row_of:
                logp = torch.cat([logp, later[row_of[r, j], : len(tgt) - 1]])
            wanted = torch.tensor(tgt, dtype=torch.long)
            nll[r, j] = float(-logp.gather(1, wanted[:, None]).mean())
            top1[r, j] = float((logp.argmax(-1) == wanted).float().mean())
    return nll, top1
