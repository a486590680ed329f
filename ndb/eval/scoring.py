"""Teacher-forced scoring of completions: the primitive every edit metric is built on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ndb.anchor import anchor_token_id, encode
from ndb.tokens import pad_rows, target_ids


@torch.no_grad()
def score_targets(
    model,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """For each (prompt, target): mean NLL per target token, and whether greedy decoding
    reproduces every target token (ZsRE's top-1 accuracy, as a fraction of tokens)."""
    device = next(model.parameters()).device
    pad = anchor_token_id(tokenizer)
    nll = np.zeros(len(prompts))
    top1 = np.zeros(len(prompts))
    order = np.argsort([-len(p) for p in prompts])  # similar lengths batch together
    for start in range(0, len(prompts), batch_size):
        idx = order[start : start + batch_size]
        seqs, spans = [], []
        for i in idx:
            prompt_ids, tgt = encode(tokenizer, prompts[i]), target_ids(tokenizer, targets[i])
            seqs.append(prompt_ids + tgt)
            spans.append((len(prompt_ids), tgt))
        ids, mask = pad_rows(seqs, pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, (i, (start_pos, tgt)) in enumerate(zip(idx, spans)):
            rows = logits[r, start_pos - 1 : start_pos - 1 + len(tgt)].float()
            tgt_t = torch.tensor(tgt, device=rows.device)
            logp = F.log_softmax(rows, -1).gather(1, tgt_t[:, None]).squeeze(1)
            nll[i] = float(-logp.mean())
            top1[i] = float((rows.argmax(-1) == tgt_t).float().mean())
    return nll, top1
