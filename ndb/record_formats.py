"""Readers for the published edit datasets' records, CounterFact (``requested_rewrite``)
and ZsRE (``subject``, ``src``, ``alt``, ``answers``, ...); ndb.facts loads them only when a
record is one of these."""

from __future__ import annotations

from typing import Any

from ndb.errors import FactError
from ndb.facts import PROMPT_LISTS, Fact, check_text, check_texts, required, type_name, user_key


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
