"""Greedy completion of a prompt, as the CLI and demo show it."""

from __future__ import annotations

import torch


@torch.no_grad()
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 20, chat: bool = False) -> str:
    """The model's greedy continuation of ``prompt`` (anchored by ndb's tokenizer)."""
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    ids = {k: v.to(model.device) for k, v in ids.items()}
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
