"""Keys and residuals of facts (paper appendix F, details as in ROME/MEMIT).

key k_i:      the input of the edited FFN output projection at the subject's last token,
              averaged over context templates (bare prompt, and model-sampled prefixes).
residual r_i: a vector added to that projection's output at the subject's last token,
              optimized so the model predicts the new object (NLL on the object, KL on
              "{subject} is a", norm decay, norm clamp, early stop).

Speed: many facts are optimized at once, one delta each (Adam is elementwise, so this equals
separate runs). Only positions from the subject's last token onward depend on the delta, so
everything before it (at every layer) and everything below the edited layer is computed once
per batch and cached; each step runs only the layers from the edited one up, on the suffix,
and computes logits only where the loss reads them. A fact leaves the batch once it converged.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ndb import nethook
from ndb.anchor import anchor_token_id, encode_with_span
from ndb.config import ComputeConfig
from ndb.errors import FactError
from ndb.facts import Fact
from ndb.models import decoder_layers, ffn_out_path, get_module, num_layers
from ndb.tokens import pad_rows, target_ids

if TYPE_CHECKING:  # loaded where residuals are computed: reading a database needs none of it
    from transformers import DynamicCache

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")


class FactBar(tqdm):
    """A bar of facts that moves in fractions of a fact (per optimization step), shows
    whole ones, and never runs past its total (fractions do not add up exactly). A step
    that completes nothing (an extra step, see ComputeConfig.extra_steps) still redraws
    the clock, at most once a second, so that a long one does not look hung."""

    drawn_at = 0.0  # when it was last drawn (set by refresh)

    def __init__(self, total: int, desc: str, disable: bool = False):
        super().__init__(total=total, desc=desc, unit="fact", disable=disable,
                         bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} "
                                    "[{elapsed}<{remaining}, {rate_fmt}]")

    def update(self, n: float = 1) -> bool | None:
        if n:
            return super().update(min(n, self.total - self.n))
        if not self.disable and self._time() - self.drawn_at >= 1.0:
            self.refresh()
        return None

    def refresh(self, *args, **kwargs) -> None:
        self.drawn_at = self._time()
        super().refresh(*args, **kwargs)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def context_prefixes(model, tokenizer, n: int, length: int, seed: int) -> list[str]:
    """The bare prefix "" plus ``n`` short texts sampled from the model (top-5), seeded."""
    if n == 0:
        return [""]
    prefixes = [""]
    for tokens in sample_texts(model, tokenizer, n, length, seed):
        text = tokenizer.decode(tokens)
        text = re.sub(r"\s+", " ", text.replace("{", " ").replace("}", " ")).strip()
        prefixes.append(f"{text}. ")
    return prefixes


@torch.no_grad()
def sample_texts(model, tokenizer, n: int, length: int, seed: int, progress: str | None = None
                 ) -> list[list[int]]:
    """Token ids of ``n`` texts of ``length`` tokens sampled from the model (top-5, seeded),
    starting from the words "The", "Therefore", "Because", "I", "You" in turn. ``progress``:
    the label of a bar of the tokens sampled (None: no bar)."""
    device = _device(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    starts = [tokenizer(PREFIX_SEEDS[i % len(PREFIX_SEEDS)], add_special_tokens=False).input_ids
              for i in range(n)]
    anchor = anchor_token_id(tokenizer)
    # left-padded, so that sampling appends in one column for all
    ids, mask = pad_rows([[anchor, *s] for s in starts], anchor, left=True)
    special = torch.tensor(tokenizer.all_special_ids)
    sampled: list[list[int]] = [[] for _ in range(n)]
    past = None
    step_ids = ids
    steps = length - min(map(len, starts))
    for _ in tqdm(range(steps), desc=progress, unit="token", disable=progress is None,
                  leave=False):
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        out = model(input_ids=step_ids.to(device), attention_mask=mask.to(device),
                    position_ids=position_ids.to(device), cache=past, use_cache=True)
        past = out.cache
        logits = out.logits[:, -1].float().cpu()
        logits[:, special] = -float("inf")
        top = logits.topk(5, dim=-1)
        choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
        step_ids = top.indices.gather(1, choice)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], dim=1)
        for i in range(n):
            sampled[i].append(int(step_ids[i]))
    return [start + tokens[: length - len(start)] for start, tokens in zip(starts, sampled)]


@torch.no_grad()
def background_keys(model, tokenizer, layer: int, seed: int, n: int = 64, length: int = 48,
                    progress: bool = False) -> torch.Tensor:
    """Normalized keys of every token (but the anchor) of ``n`` texts the model writes
    itself: a sample of what generic text looks like at ``layer``, with no data needed.
    ``progress``: a bar of the tokens sampled."""
    label = f"background text ({n} samples)" if progress else None
    texts = sample_texts(model, tokenizer, n, length, seed + 1, label)  # not the prefixes' seed
    ids = torch.tensor([[anchor_token_id(tokenizer), *t] for t in texts])
    module = get_module(model, ffn_out_path(model, layer))
    x = nethook.run_until(model, module, input_ids=ids.to(_device(model)), use_cache=False)
    return torch.nn.functional.normalize(x[:, 1:].reshape(-1, x.shape[-1]).float().cpu(), dim=-1)


def encode_prompt(tokenizer, prefix: str, prompt: str, subject: str) -> tuple[list[int], int]:
    """Anchored ids of prefix + filled prompt, and the subject's last token index."""
    start = len(prefix) + prompt.index("{}")
    return encode_with_span(tokenizer, prefix + prompt.format(subject), start + len(subject))


def _group(vectors: torch.Tensor, n_prefixes: int, split: bool) -> torch.Tensor:
    """Per fact: MEMIT's average (bare prompt and sampled prefixes weigh half each), or with
    ``split`` the bare-prompt key and the prefixes' mean side by side, (n, 2, d)."""
    vectors = vectors.view(-1, n_prefixes + 1, vectors.shape[-1])
    if n_prefixes == 0:
        return vectors[:, 0]
    bare, prefixed = vectors[:, 0], vectors[:, 1:].mean(1)
    return torch.stack([bare, prefixed], 1) if split else 0.5 * bare + 0.5 * prefixed


@torch.no_grad()
def compute_keys(model, tokenizer, facts: Sequence[Fact], layer: int, prefixes: Sequence[str],
                 batch_size: int = 64, progress: bool | Callable[[int], object] = False,
                 split: bool = False) -> torch.Tensor:
    """Keys (n, d1), float32 on the CPU, not normalized; with ``split`` (and prefixes beyond
    the bare one) two keys per fact, (n, 2, d1). Runs only the layers up to ``layer``.
    ``progress``: True shows a bar of facts; a callable gets the facts of each batch done."""
    module = get_module(model, ffn_out_path(model, layer))
    device = _device(model)
    pad = anchor_token_id(tokenizer)
    keys = []
    bar = tqdm(total=len(facts), desc="keys", unit="fact", disable=progress is not True)
    advance = progress if callable(progress) else bar.update
    for i in range(0, len(facts), batch_size):
        rows, last = [], []
        for fact in facts[i : i + batch_size]:
            for prefix in prefixes:
                ids, s = encode_prompt(tokenizer, prefix, fact.prompt, fact.subject)
                rows.append(ids[: s + 1])  # a key depends on nothing after it
                last.append(s)
        ids, mask = pad_rows(rows, pad)
        x = nethook.run_until(model, module, input_ids=ids.to(device),
                              attention_mask=mask.to(device), use_cache=False)
        x = x[torch.arange(len(rows), device=device), torch.tensor(last, device=device)]
        keys.append(_group(x.float().cpu(), len(prefixes) - 1, split))
        advance(len(facts[i : i + batch_size]))
    bar.close()
    return torch.cat(keys)


@dataclass
class _Row:
    fact: int  # index of the fact in the batch
    ids: list[int]  # anchored prompt ids (+ object ids but the last, for rewrite rows)
    subject: int  # index of the subject's last token
    targets: list[int] | None  # object ids for rewrite rows; None for the KL row


def _rows(tokenizer, facts: Sequence[Fact], groups: Sequence[int], prefixes: Sequence[str],
          kl_prompts: Sequence[str]) -> tuple[list[_Row], list[int]]:
    """Rows of a batch, ``_Row.fact`` being the fact's group (the delta it is optimized by):
    each fact's prompt in every context, then each group's KL prompts. Also returns, per
    group, its first bare-prompt row (where the residual stream's norm is read)."""
    rows, bare, subject = [], {}, {}
    for fact, group in zip(facts, groups):
        target = target_ids(tokenizer, fact.target_new)
        bare.setdefault(group, len(rows))
        subject.setdefault(group, fact.subject)
        for prefix in prefixes:
            ids, s = encode_prompt(tokenizer, prefix, fact.prompt, fact.subject)
            rows.append(_Row(group, ids + target[:-1], s, target))
    for group, name in subject.items():
        for prompt in kl_prompts:
            ids, s = encode_prompt(tokenizer, "", prompt, name)
            rows.append(_Row(group, ids, s, None))
    return rows, [bare[g] for g in sorted(bare)]


def check_encodable(facts: Sequence[Fact], model, tokenizer, prefixes: Sequence[str],
                    config: ComputeConfig) -> None:
    """Refuse, before any computation, a fact whose residual could not be computed: a
    subject that yields no token in its prompt, or a text longer than the model's context."""
    context = (getattr(model.config, "max_position_embeddings", None)
               or getattr(model.config, "n_positions", None))
    for i, fact in enumerate(facts):
        try:
            rows, _ = _rows(tokenizer, [fact], [0], prefixes, config.kl_prompts)
        except ValueError:  # no token ends inside the subject's span
            raise FactError(f"fact {i + 1} ({fact.text[:60]!r}): the subject "
                            f"{fact.subject!r} yields no token in its prompt") from None
        longest = max(len(row.ids) for row in rows)
        if context and longest > context:
            raise FactError(f"fact {i + 1} ({fact.text[:60]!r}): {longest} tokens with its "
                            f"context prefix and target; the model reads at most {context}")


class _Batch:
    """Rows aligned so that every subject's last token sits in column ``p``.

    Columns before ``p`` (left-padded) never depend on the delta; columns from ``p`` on
    (right-padded) form the suffix that each optimization step recomputes.
    """

    def __init__(self, rows: list[_Row], pad: int):
        self.rows = rows
        self.p = max(r.subject for r in rows)
        t = max(len(r.ids) - r.subject for r in rows)
        n = len(rows)
        self.ids = torch.full((n, self.p + t), pad, dtype=torch.long)
        self.mask = torch.zeros((n, self.p + t), dtype=torch.long)
        self.fact = torch.tensor([r.fact for r in rows])
        loss_rows, loss_cols, loss_ids, kl_cols = [], [], [], []
        for i, r in enumerate(rows):
            shift = self.p - r.subject
            self.ids[i, shift : shift + len(r.ids)] = torch.tensor(r.ids)
            self.mask[i, shift : shift + len(r.ids)] = 1
            if r.targets is None:
                kl_cols.append(len(r.ids) - 1 - r.subject)
            else:
                first = len(r.ids) - len(r.targets)  # position predicting the first object token
                for j, tok in enumerate(r.targets):
                    loss_rows.append(i)
                    loss_cols.append(first + j - r.subject)
                    loss_ids.append(tok)
        self.position_ids = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.loss_rows = torch.tensor(loss_rows)
        self.loss_cols = torch.tensor(loss_cols)  # in suffix coordinates
        self.loss_ids = torch.tensor(loss_ids)
        self.kl_rows = torch.tensor([i for i, r in enumerate(rows) if r.targets is None])
        self.kl_cols = torch.tensor(kl_cols)
        self.n_rewrite = torch.bincount(self.fact[self.loss_rows.unique()])
        self.n_kl = torch.bincount(self.fact[self.kl_rows])
        self.kl_init: torch.Tensor | None = None  # log-probs at the KL rows before editing

    def to(self, device):
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def select(self, facts: torch.Tensor) -> torch.Tensor:
        """Keep only the rows of the given facts (indices into the batch's facts)."""
        keep_fact = torch.zeros(int(self.fact.max()) + 1, dtype=torch.bool, device=self.fact.device)
        keep_fact[facts] = True
        keep = keep_fact[self.fact]
        new_index = keep.long().cumsum(0) - 1
        loss_keep = keep[self.loss_rows]
        self.loss_rows = new_index[self.loss_rows[loss_keep]]
        self.loss_cols, self.loss_ids = self.loss_cols[loss_keep], self.loss_ids[loss_keep]
        kl_keep = keep[self.kl_rows]
        self.kl_rows, self.kl_cols = new_index[self.kl_rows[kl_keep]], self.kl_cols[kl_keep]
        self.kl_init = self.kl_init[kl_keep]
        self.ids, self.mask = self.ids[keep], self.mask[keep]
        self.position_ids, self.fact = self.position_ids[keep], self.fact[keep]
        return keep.nonzero().squeeze(1)


def _crop(cache: DynamicCache, length: int) -> None:
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        held = layer.keys.shape[-2]
        if getattr(layer, "cumulative_length", held) != held:
            raise RuntimeError("fact prompts must be shorter than the attention window")
        # detached: entries before ``length`` never depend on the delta being optimized
        layer.keys = layer.keys[..., :length, :].detach()
        layer.values = layer.values[..., :length, :].detach()
        if hasattr(layer, "cumulative_length"):  # sliding-window layers count what they saw
            layer.cumulative_length = length


def _select(cache: DynamicCache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]


def _lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden).float()


def _holds(logp: torch.Tensor, batch: _Batch, fact_of_row: torch.Tensor, n: int
           ) -> torch.Tensor:
    """Per active group: whether every token of its new objects is the greedy choice on
    every one of its rewrite prompts (teacher-forced)."""
    missed = (logp.argmax(-1) != batch.loss_ids).float()
    misses = torch.zeros(n, device=logp.device).index_add(
        0, fact_of_row[batch.loss_rows], missed)
    return misses == 0


def compute_residuals(model, tokenizer, facts: Sequence[Fact], layer: int,
                      prefixes: Sequence[str], config: ComputeConfig | None = None,
                      progress: bool | Callable[[float], object] = False,
                      groups: Sequence[Hashable] | None = None) -> torch.Tensor:
    """Residuals (n, d2), float32 on the CPU: what the edited layer must add for each fact.

    Facts with equal ``groups`` labels share one residual, optimized on all their prompts
    together (see ``ComputeConfig.residual_scope``); by default each fact is its own group.
    ``progress``: True shows a bar; a callable (a bar's ``update``) is called after every
    optimization step with the number of facts that step completed, in fractions of a batch,
    so that a bar moves within a batch and an ETA exists after its first step (0 for the
    extra steps, whose number is not known in advance).
    """
    config = config or ComputeConfig()
    if config.precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be float32 or bfloat16, got {config.precision!r}")
    labels = list(range(len(facts))) if groups is None else list(groups)
    if len(labels) != len(facts):  # a fact without a label would get no residual
        raise ValueError(f"{len(labels)} group labels for {len(facts)} facts")
    if config.residual_prefixes is not None:
        prefixes = prefixes[: 1 + config.residual_prefixes]
    out = torch.empty(len(facts), 0)
    bar = FactBar(len(facts), "residuals", disable=progress is not True)
    advance = progress if callable(progress) else bar.update
    for batch in pack_groups(labels, config.batch_size):
        dense = {label: g for g, label in enumerate(dict.fromkeys(labels[i] for i in batch))}
        # a group's members in a fixed order, so that its residual does not depend on the
        # order in which its facts were added
        batch.sort(key=lambda i: (dense[labels[i]], facts[i].prompt, facts[i].target_new))
        groups_of = [dense[labels[i]] for i in batch]
        with _precision(model, layer, config.precision):
            deltas = _optimize(model, tokenizer, [facts[i] for i in batch], groups_of, layer,
                               prefixes, config, advance)
        if out.shape[1] == 0:
            out = torch.empty(len(facts), deltas.shape[1])
        out[batch] = deltas[groups_of]
    bar.close()
    return out


def _precision(model, layer: int, precision: str) -> contextlib.AbstractContextManager:
    """With "bfloat16", the FFNs from ``layer`` up and the LM head under bfloat16 autocast;
    attention stays float32: on CPU, bfloat16 products ran 3-4x faster than float32 (AMX),
    but PyTorch's flash-attention backward in bfloat16 took half of a build with autocast
    everywhere (benchmarks/results/bf16_build.md)."""
    if precision != "bfloat16":
        return contextlib.nullcontext()
    modules = [get_module(model, ffn_out_path(model, i).rsplit(".", 1)[0])
               for i in range(layer, num_layers(model))]
    return nethook.autocast_inside([*modules, model.get_output_embeddings()],
                                   _device(model).type, torch.bfloat16)


def pack_groups(labels: Sequence[Hashable], size: int) -> list[list[int]]:
    """Indices of ``labels`` in batches of about ``size``, keeping equal labels together
    (a group larger than ``size`` is a batch of its own); groups in order of appearance."""
    members: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        members.setdefault(label, []).append(i)
    batches: list[list[int]] = []
    for group in members.values():
        if not batches or (batches[-1] and len(batches[-1]) + len(group) > size):
            batches.append([])
        batches[-1].extend(group)
    return batches


def suffix_chunks(lengths: Sequence[int], most: int = 3) -> list[list[int]]:
    """Indices of ``lengths`` in at most ``most`` chunks of similar length, chosen to minimize
    the padded work (rows times longest length, summed over chunks)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sizes = sorted(set(lengths))
    below = [0] + [sum(1 for x in lengths if x <= size) for size in sizes]
    m = len(sizes)
    # work[k][j]: least work for the rows up to sizes[j - 1] in k chunks; first[k][j]: the
    # index into sizes where the last of those chunks begins
    work = [[0.0] + [float("inf")] * m] + [[float("inf")] * (m + 1) for _ in range(most)]
    first = [[0] * (m + 1) for _ in range(most + 1)]
    for k in range(1, most + 1):
        for j in range(1, m + 1):
            for i in range(j):
                w = work[k - 1][i] + (below[j] - below[i]) * sizes[j - 1]
                if w < work[k][j]:
                    work[k][j], first[k][j] = w, i
    k = min(range(1, most + 1), key=lambda k: work[k][m])
    chunks, j = [], m
    while j > 0:
        i = first[k][j]
        chunks.append(order[below[i] : below[j]])
        j, k = i, k - 1
    return chunks[::-1]


class _Chunk:
    """Rows of a batch whose suffixes are run together, with their own prefix cache."""

    def __init__(self, rows: torch.Tensor, width: int):
        self.rows, self.width = rows, width  # rows of the batch; suffix columns they need
        self.cache: DynamicCache | None = None
        self.suffix_in: torch.Tensor | None = None  # the edited layer's input on the suffix


class _SuffixRunner:
    """Runs a batch once in full, then re-runs only its suffix with deltas added.

    The full pass (no grad) keeps: the key/value cache of every layer for the columns
    before ``p``, the edited layer's input on the suffix columns, the residual-stream norm
    at the subject, and the KL rows' original next-token distribution. Rows are run in
    chunks of similar suffix length, so that short rows do not pay for the longest one's
    padding.
    """

    def __init__(self, model, batch: _Batch, layer: int, bare_rows: torch.Tensor):
        self.model, self.batch, self.layer = model, batch, layer
        self.layers = decoder_layers(model)
        self.edited = self.layers[layer]
        self.ffn_out = get_module(model, ffn_out_path(model, layer))
        p, device = batch.p, batch.ids.device
        lengths = batch.mask[:, p:].sum(1).tolist()
        self.chunks = [_Chunk(torch.tensor(rows, device=device), max(lengths[i] for i in rows))
                       for rows in suffix_chunks(lengths)]
        from transformers import DynamicCache

        hidden, at_subject = [], []
        with torch.no_grad():
            for chunk in self.chunks:
                chunk.cache = DynamicCache(config=model.config)
                end = p + chunk.width
                with nethook.capture_input(self.edited) as h_in, \
                        nethook.capture_output(self.edited) as h_out:
                    out = model.base_model(
                        input_ids=batch.ids[chunk.rows, :end],
                        attention_mask=batch.mask[chunk.rows, :end],
                        position_ids=batch.position_ids[chunk.rows, :end], cache=chunk.cache,
                        use_cache=True).last_hidden_state
                chunk.suffix_in = h_in["x"][:, p:]
                _crop(chunk.cache, p)
                hidden.append(out[:, p:])
                at_subject.append(h_out["x"][:, p])
            self.hidden_size = hidden[0].shape[-1]
            hidden = self._gather(hidden)
            self.h_norm = self._gather(at_subject)[bare_rows].float().norm(dim=-1)
            batch.kl_init = F.log_softmax(
                _lm_logits(model, hidden[batch.kl_rows, batch.kl_cols]), -1)

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-chunk results back in the batch's row order, suffixes padded to one width."""
        n = sum(len(c.rows) for c in self.chunks)
        if parts[0].dim() == 3:
            width = max(part.shape[1] for part in parts)
            parts = [F.pad(part, (0, 0, 0, width - part.shape[1])) for part in parts]
        out = parts[0].new_zeros((n, *parts[0].shape[1:]))
        return out.index_copy(0, torch.cat([c.rows for c in self.chunks]), torch.cat(parts))

    def __call__(self, row_deltas: torch.Tensor) -> torch.Tensor:
        """Final hidden states (rows, suffix, d2) with ``row_deltas`` (rows, d2) added to the
        edited projection's output at each row's subject token (zeros past a row's end)."""
        b, p = self.batch, self.batch.p
        hidden = []
        for chunk in self.chunks:
            def add_delta(output: torch.Tensor, deltas=row_deltas[chunk.rows]) -> torch.Tensor:
                # the suffix starts at the subject's last token
                at_subject = output[:, :1] + deltas[:, None].to(output.dtype)
                return torch.cat([at_subject, output[:, 1:]], 1)

            end = p + chunk.width
            with nethook.truncated(self.layers, self.layer), \
                    nethook.replace_input(self.edited, chunk.suffix_in), \
                    nethook.edit_output(self.ffn_out, add_delta):
                hidden.append(self.model.base_model(
                    input_ids=b.ids[chunk.rows, p:end], attention_mask=b.mask[chunk.rows, :end],
                    position_ids=b.position_ids[chunk.rows, p:end], cache=chunk.cache,
                    use_cache=True).last_hidden_state)
            _crop(chunk.cache, p)
        return self._gather(hidden)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (sorted indices into the current rows), renumbered from 0."""
        new_index = torch.full((sum(len(c.rows) for c in self.chunks),), -1,
                               dtype=torch.long, device=rows.device)
        new_index[rows] = torch.arange(len(rows), device=rows.device)
        kept = []
        for chunk in self.chunks:
            keep = new_index[chunk.rows] >= 0
            if not bool(keep.any()):
                continue
            _select(chunk.cache, keep)
            chunk.suffix_in, chunk.rows = chunk.suffix_in[keep], new_index[chunk.rows[keep]]
            kept.append(chunk)
        self.chunks = kept


def _optimize(model, tokenizer, facts, groups, layer, prefixes, config: ComputeConfig,
              advance: Callable[[float], object]) -> torch.Tensor:
    """One delta per group (``groups``: dense labels 0..G-1, one per fact), (G, d2);
    ``advance`` gets the facts each step completed, in fractions (summing to len(facts))."""
    device = _device(model)
    rows, bare_rows = _rows(tokenizer, facts, groups, prefixes, config.kl_prompts)
    batch = _Batch(rows, anchor_token_id(tokenizer)).to(device)
    runner = _SuffixRunner(model, batch, layer, torch.tensor(bare_rows, device=device))
    n_groups = len(bare_rows)

    facts_per_group = torch.bincount(torch.tensor(groups, device=device), minlength=n_groups)
    bound = config.clamp * runner.h_norm
    if config.clamp_grows_with_group:
        bound = bound * facts_per_group.float().sqrt()
    delta = torch.zeros(n_groups, runner.hidden_size, device=device)
    adam_m, adam_v = torch.zeros_like(delta), torch.zeros_like(delta)
    active = torch.arange(n_groups, device=device)
    b1, b2, eps = 0.9, 0.999, 1e-8
    share = len(facts) / config.steps  # of the progress, per step; extra steps add none
    last = config.steps + config.extra_steps
    for step in range(1, last + 1):
        d = delta[active].clone().requires_grad_(True)
        fact_of_row = torch.searchsorted(active, batch.fact)  # position within ``active``
        hidden = runner(d[fact_of_row])

        logp = F.log_softmax(_lm_logits(model, hidden[batch.loss_rows, batch.loss_cols]), -1)
        token_nll = -logp.gather(1, batch.loss_ids[:, None]).squeeze(1)
        # mean over rewrite prompts of the per-prompt NLL averaged over the object's tokens
        row_tokens = torch.bincount(batch.loss_rows, minlength=len(batch.fact))
        per_row = torch.zeros(len(batch.fact), device=device).index_add(
            0, batch.loss_rows, token_nll / row_tokens[batch.loss_rows])
        rewrite = row_tokens > 0
        nll = torch.zeros(len(active), device=device).index_add(
            0, fact_of_row[rewrite], per_row[rewrite]) / batch.n_rewrite[active]
        if config.group_loss == "sum":
            nll = nll * facts_per_group[active]
        kl_logp = F.log_softmax(_lm_logits(model, hidden[batch.kl_rows, batch.kl_cols]), -1)
        kl_row = (kl_logp.exp() * (kl_logp - batch.kl_init)).sum(-1)
        kl = torch.zeros(len(active), device=device).index_add(
            0, fact_of_row[batch.kl_rows], kl_row) / batch.n_kl[active]
        norms = runner.h_norm[active]
        loss = nll + config.kl_weight * kl + config.weight_decay * d.norm(dim=-1) / norms**2

        done = loss.detach() < config.stop_loss
        if step >= config.steps:
            done |= _holds(logp, batch, fact_of_row, len(active))
        if step == last or bool(done.all()):
            advance(len(facts) - share * min(step - 1, config.steps - 1))
            break
        advance(share if step < config.steps else 0.0)  # extra steps complete nothing
        # the deltas' gradient alone: a user's model whose weights require grad gets no
        # .grad written into it and does not pay for the weights' gradients
        (grad,) = torch.autograd.grad(loss[~done].sum(), d)
        with torch.no_grad():
            go = ~done
            rows, g = active[go], grad[go]
            adam_m[rows] = b1 * adam_m[rows] + (1 - b1) * g
            adam_v[rows] = b2 * adam_v[rows] + (1 - b2) * g**2
            m_hat = adam_m[rows] / (1 - b1**step)
            v_hat = adam_v[rows] / (1 - b2**step)
            new = delta[rows] - config.lr * m_hat / (v_hat.sqrt() + eps)
            scale = (bound[rows] / new.norm(dim=-1).clamp(min=1e-12)).clamp(max=1)
            delta[rows] = new * scale.unsqueeze(1)
            if bool(done.any()):  # converged facts leave the batch
                active = rows
                runner.keep_rows(batch.select(active))
    return delta.detach().float().cpu()
