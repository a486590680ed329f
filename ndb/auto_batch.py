"""``--batch-size auto``: how many facts a build optimizes at once on CUDA, measured on a
probe batch; loaded only when asked for."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import replace

import torch

from ndb.compute import check_encodable, compute_residuals
from ndb.config import ComputeConfig
from ndb.errors import FactError
from ndb.facts import Fact

AUTO_BATCH_LIMIT = 4096  # the most facts auto optimizes at once (what --batch-size allows)
# of the device's free memory: room for the allocator's fragmentation and for batches whose
# rows pad to a longer length than the probe's
AUTO_MEMORY_SHARE = 0.8


def auto_batch_size(model, tokenizer, facts: Sequence[Fact], layer: int,
                    prefixes: Sequence[str], config: ComputeConfig, probe: int = 16) -> int:
    """How many facts to optimize at once. On CUDA: the most that fit in the device's free
    memory, scaled from the peak memory of a measured probe (two optimization steps of the
    ``probe`` longest computable facts, each its own residual): the memory of a fact depends
    on its prompts, contexts, KL prompts, the vocabulary and the layers above ``layer``, which
    an estimate from the model's size would miss. Elsewhere ComputeConfig's default."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return ComputeConfig.batch_size
    by_length = heapq.nlargest(4 * probe, facts, key=lambda f: len(f.text) + len(f.target_new))
    sample = [f for f in by_length if _encodable(f, model, tokenizer, prefixes, config)][:probe]
    if not sample:  # nothing to build: the build itself says why
        return ComputeConfig.batch_size
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    # two steps and no extra ones; stop_loss 0: no fact leaves the probe before its backward pass
    compute_residuals(model, tokenizer, sample, layer, prefixes,
                      replace(config, steps=2, extra_steps=0, stop_loss=0.0,
                              batch_size=len(sample)))
    per_fact = (torch.cuda.max_memory_allocated(device) - before) / len(sample)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(AUTO_BATCH_LIMIT, int(AUTO_MEMORY_SHARE * free / per_fact)))


def _encodable(fact: Fact, model, tokenizer, prefixes: Sequence[str],
               config: ComputeConfig) -> bool:
    try:
        check_encodable([fact], model, tokenizer, prefixes, config)
    except FactError:
        return False
    return True
