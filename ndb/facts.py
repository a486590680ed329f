"""Facts, and readers for plain JSONL/JSON, CounterFact and ZsRE records.

Every reader validates the whole input before returning, so a bad record stops the
command before anything is written; errors name the file, the record and the problem.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ndb.errors import FactError


@dataclass(frozen=True)
class Fact:
    """One edit: ``prompt.format(subject)`` should be completed by ``target_new``."""

    subject: str
    prompt: str  # holds "{}" where the subject goes
    target_new: str
    target_true: str | None = None
    id: str | None = None  # the user's own id, if any; the database assigns its own integer ids
    paraphrases: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # e.g. eval prompts

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)

    def to_json(self) -> dict[str, Any]:
        record = {k: v for k, v in asdict(self).items() if v not in (None, (), {})}
        if self.paraphrases:
            record["paraphrases"] = list(self.paraphrases)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Fact:
        return cls(
            subject=record["subject"],
            prompt=record["prompt"],
            target_new=record["target_new"],
            target_true=record.get("target_true"),
            id=record.get("id"),
            paraphrases=tuple(record.get("paraphrases", ())),
            extra=dict(record.get("extra", {})),
        )


def validate(fact: Fact, where: str) -> Fact:
    def bad(problem: str) -> FactError:
        return FactError(f"{where}: {problem}")

    for name in ("subject", "prompt", "target_new"):
        value = getattr(fact, name)
        if not isinstance(value, str) or not value.strip():
            raise bad(f"'{name}' must be a non-empty string, got {value!r}")
    if fact.target_true is not None and not isinstance(fact.target_true, str):
        raise bad(f"'target_true' must be a string, got {fact.target_true!r}")
    if fact.prompt.count("{}") != 1:
        raise bad(f"'prompt' must contain exactly one '{{}}' for the subject: {fact.prompt!r}")
    try:
        fact.prompt.format(fact.subject)
    except (IndexError, KeyError, ValueError) as err:
        raise bad(f"'prompt' has braces other than one '{{}}': {fact.prompt!r} ({err})") from None
    if fact.prompt.rstrip() != fact.prompt:
        raise bad(f"'prompt' must not end with whitespace: {fact.prompt!r}")
    for p in fact.paraphrases:
        if not isinstance(p, str) or not p.strip():
            raise bad(f"paraphrases must be non-empty strings, got {p!r}")
    if fact.target_true is not None and fact.target_true.strip() == fact.target_new.strip():
        raise bad(f"'target_new' equals 'target_true' ({fact.target_new!r}): nothing to edit")
    return fact


def _from_plain(record: dict[str, Any]) -> Fact:
    missing = [k for k in ("subject", "prompt", "target_new") if k not in record]
    if missing:
        raise KeyError(", ".join(missing))
    paraphrases = record.get("paraphrases") or ()
    if isinstance(paraphrases, str):
        paraphrases = (paraphrases,)
    ident = record.get("id")
    return Fact(
        subject=record["subject"],
        prompt=record["prompt"],
        target_new=record["target_new"],
        target_true=record.get("target_true"),
        id=None if ident is None else str(ident),
        paraphrases=tuple(paraphrases),
    )


def _target(value: Any) -> str:
    return value["str"] if isinstance(value, dict) else value


def _target_id(value: Any) -> str | None:
    return value.get("id") if isinstance(value, dict) else None


def _from_counterfact(record: dict[str, Any]) -> Fact:
    rw = record["requested_rewrite"]
    extra = {
        k: record[k]
        for k in ("neighborhood_prompts", "attribute_prompts", "generation_prompts",
                  "chat_question", "group", "spillover_prompts")
        if k in record
    }
    for key, value in (("relation_id", rw.get("relation_id")),
                       ("target_new_id", _target_id(rw["target_new"]))):
        if value:
            extra[key] = value
    ident = record.get("case_id", record.get("id"))
    return Fact(
        subject=rw["subject"],
        prompt=rw["prompt"],
        target_new=_target(rw["target_new"]),
        target_true=_target(rw["target_true"]) if "target_true" in rw else None,
        id=None if ident is None else str(ident),
        paraphrases=tuple(record.get("paraphrase_prompts", ())),
        extra=extra,
    )


def _from_zsre(record: dict[str, Any]) -> Fact:
    subject, question = record["subject"], record["src"]
    if subject not in question:
        raise ValueError(f"subject {subject!r} does not occur in 'src' {question!r}")
    answer = record.get("alt") or record.get("answers", [None])[0]
    if not answer:
        raise KeyError("alt")
    true = record.get("answers", [None])[0] if record.get("alt") else None
    rephrase = record.get("rephrase")
    ident = record.get("case_id", record.get("id"))
    return Fact(
        subject=subject,
        prompt=question.replace(subject, "{}", 1),
        target_new=answer,
        target_true=true if true != answer else None,
        id=None if ident is None else str(ident),
        paraphrases=(rephrase,) if rephrase else (),
        extra={k: record[k] for k in ("loc", "loc_ans") if k in record},
    )


def record_format(record: dict[str, Any]) -> str:
    if "requested_rewrite" in record:
        return "counterfact"
    if "src" in record and "subject" in record:
        return "zsre"
    return "plain"


_READERS = {"plain": _from_plain, "counterfact": _from_counterfact, "zsre": _from_zsre}


def parse_record(record: Any, where: str) -> Fact:
    if not isinstance(record, dict):
        raise FactError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind = record_format(record)
    try:
        fact = _READERS[kind](record)
    except KeyError as err:
        raise FactError(f"{where}: {kind} record is missing field {err.args[0]}") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise FactError(f"{where}: malformed {kind} record ({err})") from None
    return validate(fact, where)


def _records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise FactError(f"{name}: not valid JSON ({err})") from None
        for i, record in enumerate(data):
            yield f"{name}: record {i + 1}", record
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{name}: line {lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            raise FactError(f"{name}: line {lineno}: not valid JSON ({err.msg})") from None


def parse_facts(text: str, name: str = "<facts>") -> list[Fact]:
    facts = [parse_record(record, where) for where, record in _records(text, name)]
    seen: dict[str, int] = {}
    for i, fact in enumerate(facts):
        if fact.id is not None:
            if fact.id in seen:
                raise FactError(
                    f"{name}: duplicate id {fact.id!r} (records {seen[fact.id] + 1} and {i + 1})"
                )
            seen[fact.id] = i
    if not facts:
        raise FactError(f"{name}: no facts found")
    return facts


def read_facts(path: str | Path) -> list[Fact]:
    """Read facts from a JSONL or JSON file; '-' reads JSONL from standard input."""
    if str(path) == "-":
        return parse_facts(sys.stdin.read(), "<stdin>")
    path = Path(path)
    if not path.is_file():
        raise FactError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise FactError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    return parse_facts(text, str(path))


def as_facts(items: Iterable[Fact | dict[str, Any]]) -> list[Fact]:
    """Accept Fact objects or plain/CounterFact/ZsRE dicts, validated."""
    facts = [
        validate(x, f"fact {i + 1}") if isinstance(x, Fact) else parse_record(x, f"fact {i + 1}")
        for i, x in enumerate(items)
    ]
    if not facts:
        raise FactError("no facts given")
    return facts
