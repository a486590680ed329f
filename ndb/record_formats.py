"""The formats users bring facts in: files of JSONL or a JSON list (``read_facts``), and the
published edit datasets' records, CounterFact (``requested_rewrite``) and ZsRE (``subject``,
``src``, ``alt``, ``answers``, ...), which ndb.facts reads here when a record is one of them.
A database's writes of Fact objects or plain dicts never load this module."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ndb.errors import FactError
from ndb.facts import (
    PROMPT_LISTS,
    Fact,
    check_text,
    check_texts,
    loads_json,
    parse_record,
    required,
    type_name,
    user_key,
)


def _target(rewrite: dict[str, Any], name: str) -> str:
    """CounterFact's {"str": ..., "id": ...} target, or a plain string."""
    value = required(rewrite, name)
    if isinstance(value, dict):
        return check_text(required(value, "str"), f"{name}.str")
    return check_text(value, name)


def _target_id(value: Any) -> str | None:
    return value.get("id") if isinstance(value, dict) else None


def _from_counterfact(record: dict[str, Any]) -> Fact:
    rw = record["requested_rewrite"]
    if not isinstance(rw, dict):
        raise FactError(f"'requested_rewrite' must be an object, got {type_name(rw)}")
    extra = {k: list(check_texts(record[k], k)) for k in PROMPT_LISTS if k in record}
    for name in ("chat_question", "group"):
        if name in record:
            extra[name] = check_text(record[name], name)
    for key, value in (("relation_id", rw.get("relation_id")),
                       ("target_new_id", _target_id(rw.get("target_new")))):
        if value:
            extra[key] = check_text(value, key)
    return Fact(
        subject=required(rw, "subject"),
        prompt=required(rw, "prompt"),
        target_new=_target(rw, "target_new"),
        target_true=_target(rw, "target_true") if "target_true" in rw else None,
        key=user_key(record, "case_id", "id"),
        paraphrases=check_texts(record.get("paraphrase_prompts", ()), "paraphrase_prompts"),
        extra=extra,
    )


def _from_zsre(record: dict[str, Any]) -> Fact:
    subject = check_text(record["subject"], "subject")
    question = check_text(record["src"], "src")
    if subject not in question:
        raise FactError(f"subject {subject!r} does not occur in 'src' {question!r}")
    answers = ()
    if record.get("answers") is not None:
        answers = check_texts(record["answers"], "answers")
        if not answers:
            raise FactError("'answers' must be a non-empty list of non-empty strings, got []")
    alt = record.get("alt")
    if alt is not None:
        check_text(alt, "alt")
    elif not answers:
        raise FactError("missing field alt (or answers)")
    answer = alt if alt is not None else answers[0]
    true = answers[0] if alt is not None and answers else None
    rephrase = record.get("rephrase")
    if rephrase is not None:
        check_text(rephrase, "rephrase", empty_ok=True)
    return Fact(
        subject=subject,
        prompt=question.replace(subject, "{}", 1),
        target_new=answer,
        target_true=true if true != answer else None,
        key=user_key(record, "case_id", "id"),
        paraphrases=(rephrase,) if rephrase else (),
        extra={k: check_text(record[k], k, empty_ok=True) for k in ("loc", "loc_ans")
               if k in record},
    )


READERS = {"counterfact": _from_counterfact, "zsre": _from_zsre}


def _records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    if text.lstrip().startswith("["):
        for i, record in enumerate(loads_json(text, name, with_position=True, fields_once=True)):
            yield f"{name}: record {i + 1}", record
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            where = f"{name}: line {lineno}"
            yield where, loads_json(line, where, fields_once=True)


def parse_facts(text: str, name: str = "<facts>") -> list[Fact]:
    facts = [parse_record(record, where) for where, record in _records(text, name)]
    seen: dict[str, int] = {}
    for i, fact in enumerate(facts):
        if fact.key is not None:
            first = seen.setdefault(fact.key, i)
            if facts[first].edit != fact.edit:
                raise FactError(f"{name}: key {fact.key!r} names two different facts "
                                f"(records {first + 1} and {i + 1})")
    if not facts:
        raise FactError(f"{name}: no facts found")
    return facts


def read_facts(path: str | Path) -> list[Fact]:
    """Read facts from a JSONL or JSON file; '-' reads JSONL from standard input."""
    if str(path) == "-":  # bytes where there are, so that bad UTF-8 gets a clear error
        raw = getattr(sys.stdin, "buffer", None)
        text = _decode(raw.read(), "<stdin>") if raw is not None else sys.stdin.read()
        return parse_facts(text, "<stdin>")
    path = Path(path)
    if not path.exists():
        raise FactError(f"{path}: no such file")
    if not path.is_file():
        raise FactError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FactError(f"{path}: cannot read ({err.strerror})") from None
    return parse_facts(_decode(data, str(path)), str(path))


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FactError(f"{name}: not UTF-8 text (byte {err.start}: {err.reason})") from None
