"""Facts: the plain record a user writes, checked (CounterFact and ZsRE records, and facts
files, are read in ndb.record_formats), and the records a database stores (``read_stored``).

Every reader validates the whole input before returning, so a bad record stops the
command before anything is written; errors name the file, the record and the problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

import numpy as np

from ndb.errors import FactError, StoreError

if TYPE_CHECKING:
    from ndb.store import Store


@dataclass(frozen=True)
class Fact:
    """One edit: ``prompt.format(subject)`` should be completed by ``target_new``."""

    subject: str
    prompt: str  # holds "{}" where the subject goes
    target_new: str
    target_true: str | None = None
    key: str | None = None  # the user's own unique name for the fact; the database ids are ints
    paraphrases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # e.g. eval prompts

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    @property
    def edit(self) -> tuple[str, str, str]:
        """What the fact changes: facts with the same edit (and key) are the same fact."""
        return (self.subject, self.prompt, self.target_new)

    def to_json(self) -> dict[str, Any]:
        record = {k: v for k, v in asdict(self).items() if v not in (None, (), {})}
        if self.paraphrases:
            record["paraphrases"] = list(self.paraphrases)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any], where: str = "record") -> Fact:
        """The fact ``record`` (as ``to_json`` writes it, or any record of a facts file)
        describes, checked like a facts file's; a FactError starts with ``where``."""
        return parse_record(record, where)


MAX_TEXT_CHARS = 1_000  # per text field: subject, prompt, target, id, each paraphrase...
MAX_PROMPTS = 100  # per list of prompts: paraphrases, neighborhood prompts...
PROMPT_LISTS = ("neighborhood_prompts", "attribute_prompts", "generation_prompts",
                "spillover_prompts")
EXTRA_TEXTS = ("relation_id", "target_new_id", "loc", "loc_ans")
# C0 and C1 control characters (tab and newline are text), and UTF-16 surrogates, which
# only occur in a str that did not come from valid Unicode
_BAD_CHARACTER = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(value: Any, name: str, *, empty_ok: bool = False,
               limit: int = MAX_TEXT_CHARS) -> str:
    """``value`` if it is usable text; else a FactError naming the field and the problem."""
    if not isinstance(value, str):
        raise FactError(f"'{name}' must be a string, got {type_name(value)}")
    if not empty_ok and not value.strip():
        raise FactError(f"'{name}' must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise FactError(f"'{name}' has {len(value):,} characters; the limit is {limit:,}")
    bad = _BAD_CHARACTER.search(value)
    if bad:
        code = ord(bad.group())
        what = ("a lone surrogate (not valid Unicode)" if 0xD800 <= code <= 0xDFFF
                else "a control character")
        raise FactError(f"'{name}' contains {what} U+{code:04X} at position {bad.start()}")
    return value


def check_texts(value: Any, name: str) -> tuple[str, ...]:
    """A list of at most MAX_PROMPTS usable texts, as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise FactError(f"'{name}' must be a list of strings, got {type_name(value)}")
    if len(value) > MAX_PROMPTS:
        raise FactError(f"'{name}' has {len(value):,} entries; the limit is {MAX_PROMPTS}")
    return tuple(check_text(v, f"{name}[{i}]") for i, v in enumerate(value))


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_fact(fact: Fact) -> None:
    if not isinstance(fact.extra, dict):
        raise FactError(f"'extra' must be an object, got {type_name(fact.extra)}")
    for name in ("subject", "prompt", "target_new"):
        check_text(getattr(fact, name), name)
    if fact.target_true is not None:
        check_text(fact.target_true, "target_true")
    if fact.key is not None and "\n" in check_text(fact.key, "key"):
        raise FactError(f"'key' must be one line, got {fact.key!r}")
    check_texts(fact.paraphrases, "paraphrases")
    for name in PROMPT_LISTS:
        if name in fact.extra:
            check_texts(fact.extra[name], name)
    for name in EXTRA_TEXTS:
        if name in fact.extra:
            check_text(fact.extra[name], name, empty_ok=True)
    if fact.prompt.count("{}") != 1:
        raise FactError(f"'prompt' must contain exactly one '{{}}' for the subject: "
                        f"{fact.prompt!r}")
    try:
        fact.prompt.format(fact.subject)
    except (IndexError, KeyError, ValueError) as err:
        raise FactError(f"'prompt' has braces other than one '{{}}': {fact.prompt!r} "
                        f"({err})") from None
    if fact.prompt.rstrip() != fact.prompt:
        raise FactError(f"'prompt' must not end with whitespace: {fact.prompt!r}")
    if fact.target_true is not None and fact.target_true.strip() == fact.target_new.strip():
        raise FactError(f"'target_new' equals 'target_true' ({fact.target_new!r}): "
                        "nothing to edit")


def validate(fact: Fact, where: str) -> Fact:
    """``fact`` if every field is usable; else a FactError that starts with ``where``."""
    try:
        _check_fact(fact)
    except FactError as err:
        raise FactError(f"{where}: {err}") from None
    return fact


def required(record: dict[str, Any], name: str) -> Any:
    if name not in record:
        raise FactError(f"missing field {name}")
    return record[name]


def user_key(record: dict[str, Any], *fields: str) -> str | None:
    """The first of ``fields`` present in ``record`` (null: no key), as a key: a string (an
    integer, e.g. a dataset's case_id, becomes its decimal string)."""
    for name in fields:
        if name in record:
            value = record[name]
            if value is None or isinstance(value, str):
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            raise FactError(f"'{name}' must be a string or an integer, got {type_name(value)}")
    return None


def _from_plain(record: dict[str, Any]) -> Fact:
    paraphrases = record.get("paraphrases")
    if paraphrases is None:
        paraphrases = ()
    elif isinstance(paraphrases, str):
        paraphrases = (paraphrases,)
    extra = record.get("extra") or {}
    if not isinstance(extra, dict):
        raise FactError(f"'extra' must be an object, got {type_name(extra)}")
    return Fact(
        subject=required(record, "subject"),
        prompt=required(record, "prompt"),
        target_new=required(record, "target_new"),
        target_true=record.get("target_true"),
        # a record with a "key" field (e.g. from 'ndb list --json') never reads "id" as a key
        key=user_key(record, "key", "id"),
        paraphrases=check_texts(paraphrases, "paraphrases"),
        extra=dict(extra),
    )


def record_format(record: dict[str, Any]) -> str:
    if "requested_rewrite" in record:
        return "counterfact"
    if "src" in record and "subject" in record:
        return "zsre"
    return "plain"


def parse_record(record: Any, where: str) -> Fact:
    if not isinstance(record, dict):
        raise FactError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind = record_format(record)
    try:  # the published datasets' readers are loaded only for their records
        fact = _from_plain(record) if kind == "plain" else \
            import_module("ndb.record_formats").READERS[kind](record)
    except FactError as err:
        raise FactError(f"{where}: {kind} record: {err}") from None
    return validate(fact, where)


def loads_json(text: str | bytes, where: str, with_position: bool = False,
               fields_once: bool = False) -> Any:
    """``text`` as JSON; else a FactError naming ``where`` (and, within a whole file, the
    position). ``fields_once``: refuse an object that gives a field twice, where JSON keeps
    the last (for what a user wrote: a third slower to parse)."""
    try:
        return json.loads(text, object_pairs_hook=_fields_once if fields_once else None)
    except _FieldTwice as err:
        raise FactError(f"{where}: field {err.args[0]!r} is given twice") from None
    except json.JSONDecodeError as err:
        raise FactError(f"{where}: not valid JSON ({err if with_position else err.msg})"
                        ) from None
    except ValueError:  # Python reads integers of at most 4,300 digits
        raise FactError(f"{where}: not valid JSON (a number too long)") from None
    except RecursionError:
        raise FactError(f"{where}: JSON nested too deeply") from None


class _FieldTwice(Exception):
    pass


def _fields_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a field given twice (JSON would keep the last)."""
    fields = dict(pairs)
    if len(fields) < len(pairs):
        seen = set()
        raise _FieldTwice(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return fields


def as_facts(items: Iterable[Fact | dict[str, Any]]) -> list[Fact]:
    """Accept Fact objects or plain/CounterFact/ZsRE dicts, validated."""
    facts = [_storable(x, f"fact {i + 1}") if isinstance(x, Fact)
             else parse_record(x, f"fact {i + 1}") for i, x in enumerate(items)]
    if not facts:
        raise FactError("no facts given")
    return facts


def _storable(fact: Fact, where: str) -> Fact:
    """``fact``, validated, if the record a database stores for it reads back (what a Fact
    built in code may hold in ``extra`` need not)."""
    validate(fact, where)
    try:
        record = json.loads(json.dumps(fact.to_json()))
    except (TypeError, ValueError) as err:
        raise FactError(f"{where}: 'extra' holds what JSON cannot ({err})") from None
    parse_record(record, where)
    return fact


def read_stored(store: Store, ids: np.ndarray | None = None) -> dict[int, Fact]:
    """The facts the store holds under ``ids`` (every one if None), by id, each checked
    like a facts file's record (the directory may come from anyone)."""
    wanted = store.entries.ids if ids is None else ids
    records = store.read("facts", ids) if len(wanted) else []
    facts = {}
    for fact_id, record in zip(wanted.tolist(), records):
        where = f"{store.path}: stored fact {fact_id}"
        try:
            facts[fact_id] = Fact.from_json(loads_json(record, where), where)
        except FactError as err:
            raise StoreError(str(err)) from None
    return facts


def caught_up(store: Store, stored: dict[int, Fact], version: int, changed: np.ndarray,
              deleted: np.ndarray) -> dict[int, Fact] | None:
    """``stored``, the facts as of manifest ``version``, brought up to the store's state by
    reading only the ``changed`` entries written since (Store.read_entries_since), as a new
    dict (callers may hold the old one); None when a compaction since has folded deletions
    away (then read them all again)."""
    if store.manifest.compacted_through > version:
        return None
    facts = dict(stored)
    for fact_id in deleted.tolist():
        facts.pop(fact_id, None)
    facts.update(read_stored(store, changed))
    return facts
