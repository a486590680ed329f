"""The fixed first token.

In a model whose tokenizer adds no BOS token (SmolLM2, GPT-2), the first real token of a
text sits at position 0, and from the middle layers on its FFN key is an attention-sink
vector that is nearly the same for every input. A fact key taken there would match position
0 of every input. ndb therefore starts every text it builds with one fixed token (the BOS
the tokenizer adds, else ``<|endoftext|>``, else EOS), makes the tokenizers it hands out do
the same, and never searches a sequence's first position.
"""

from __future__ import annotations

from tokenizers import processors

from ndb.errors import ModelError

_FALLBACK_ANCHORS = ("<|endoftext|>", "<|begin_of_text|>", "<s>")


def native_bos_id(tokenizer) -> int | None:
    """The BOS id the tokenizer already puts in front of every text, if any."""
    ids = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and len(ids) > 1 and ids[0] == bos else None


def anchor_token_id(tokenizer) -> int:
    """The token ndb puts at position 0 of every text for this tokenizer."""
    cached = getattr(tokenizer, "ndb_anchor_id", None)
    if cached is not None:
        return cached
    bos = native_bos_id(tokenizer)
    if bos is not None:
        return bos
    vocab = tokenizer.get_vocab()
    for token in _FALLBACK_ANCHORS:
        if token in vocab:
            return vocab[token]
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return token_id
    raise ModelError("the tokenizer has no BOS, EOS or <|endoftext|> token to use as anchor")


def anchor_tokenizer(tokenizer):
    """Make ``tokenizer(text)`` start with the anchor token (in place); returns the tokenizer.

    Chat templates, which tokenize with ``add_special_tokens=False``, are unaffected: they
    already start with a fixed token of their own. ``tokenizer.save_pretrained`` still
    writes the tokenizer as it was, so a plain reload of it adds no anchor.
    """
    anchor = anchor_token_id(tokenizer)
    tokenizer.ndb_anchor_id = anchor
    if native_bos_id(tokenizer) is not None:
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{type(tokenizer).__name__} is not a fast tokenizer; ndb needs one")
    if not isinstance(tokenizer.save_pretrained, _SaveUnanchored):  # not anchored before
        tokenizer.save_pretrained = _SaveUnanchored(tokenizer, backend.post_processor)
    token = tokenizer.convert_ids_to_tokens(anchor)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{token} $A",
        pair=f"{token} $A $B:1",
        special_tokens=[(token, anchor)],
    )
    return tokenizer


class _SaveUnanchored:
    """save_pretrained of an anchored tokenizer: writes the post-processor it had before,
    so that what it saves reloads without ndb's anchor (a callable object, not a closure,
    so that the tokenizer still pickles and copies)."""

    def __init__(self, tokenizer, original):
        self.tokenizer = tokenizer
        self.original = original

    def __call__(self, *args, **kwargs):
        backend = self.tokenizer.backend_tokenizer
        anchored = backend.post_processor
        backend.post_processor = self.original
        try:
            return type(self.tokenizer).save_pretrained(self.tokenizer, *args, **kwargs)
        finally:
            backend.post_processor = anchored


def fixed_first_ids(anchor: int, tokenizer=None, model=None) -> set[int]:
    """Token ids an input may start with and still need no anchor: the anchor, and special
    tokens (a chat template's ``<|im_start|>``), which no subject can be."""
    ids = {anchor}
    if tokenizer is not None:
        ids.update(tokenizer.all_special_ids)
    config = getattr(model, "config", None)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the anchor in front, whatever the tokenizer's own setup."""
    return [anchor_token_id(tokenizer), *tokenizer(text, add_special_tokens=False).input_ids]


def encode_with_span(tokenizer, text: str, end: int) -> tuple[list[int], int]:
    """Anchored ids of ``text`` and the index among them of the last token that starts
    before character ``end`` (the last token of a span ending there)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    last = max(i for i, (a, _) in enumerate(enc.offset_mapping) if a < end)
    return [anchor_token_id(tokenizer), *enc.input_ids], last + 1
