"""The paper's edit metrics (appendix D), in the ROME/MEMIT code's conventions.

CounterFact: a prompt counts as a success when the mean per-token NLL of the wanted object
is lower than that of the other one; each case's rate is averaged over its prompts, then
over cases. Magnitudes are mean P(wanted) - P(other), with P = exp(-mean NLL).
ZsRE: top-1 accuracy of each answer token under teacher forcing.

Generative metrics judge what the model writes, greedily, as people use it: a prompt counts
when its continuation mentions the wanted object (``generation.mentions``), a chat question
when the answer does. ``ndb.eval.legend`` says what each one counts.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import numpy as np

from ndb.eval.generation import answers_with, mentions
from ndb.eval.scoring import score_choices, score_targets
from ndb.facts import Fact


@dataclass
class PromptSet:
    """Prompts of one kind for many cases, flattened, with the case each came from."""

    prompts: list[str]
    case: np.ndarray

    @classmethod
    def of(cls, per_case: Sequence[Sequence[str]]) -> PromptSet:
        prompts = [p for ps in per_case for p in ps]
        case = np.repeat(np.arange(len(per_case)), [len(ps) for ps in per_case])
        return cls(prompts, case)


def _per_case_mean(values: np.ndarray, case: np.ndarray, n_cases: int) -> np.ndarray:
    """Mean of ``values`` within each case; NaN for cases without prompts."""
    total = np.bincount(case, weights=values, minlength=n_cases)
    count = np.bincount(case, minlength=n_cases)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count


def preference(model, tokenizer, prompts: PromptSet, wanted: Sequence[str],
               other: Sequence[str], n_cases: int, batch_size: int = 32
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per case: rate at which ``wanted`` beats ``other``, and mean P(wanted) - P(other)."""
    if not prompts.prompts:
        nan = np.full(n_cases, np.nan)
        return nan, nan
    pairs = [(wanted[c], other[c]) for c in prompts.case]
    nll, _ = score_choices(model, tokenizer, prompts.prompts, pairs, batch_size)
    nll_w, nll_o = nll[:, 0], nll[:, 1]
    success = (nll_w < nll_o).astype(float)
    magnitude = np.exp(-nll_w) - np.exp(-nll_o)
    return (_per_case_mean(success, prompts.case, n_cases),
            _per_case_mean(magnitude, prompts.case, n_cases))


def counterfact_metrics(model, tokenizer, facts: Sequence[Fact], batch_size: int = 32
                        ) -> dict[str, np.ndarray]:
    """Per-case efficacy, generalization, specificity and their magnitudes.

    Facts without ``target_true`` cannot be scored this way and are refused.
    """
    missing = [i for i, f in enumerate(facts) if not f.target_true]
    if missing:
        raise ValueError(f"CounterFact metrics need target_true; fact {missing[0] + 1} has none")
    n = len(facts)
    new = [f.target_new for f in facts]
    true = [f.target_true for f in facts]
    out = {}
    sets = {
        "efficacy": (PromptSet.of([[f.text] for f in facts]), new, true),
        "generalization": (PromptSet.of([f.paraphrases for f in facts]), new, true),
        "specificity": (PromptSet.of([f.extra.get("neighborhood_prompts", []) for f in facts]),
                        true, new),
    }
    for name, (prompts, wanted, other) in sets.items():
        out[name], out[f"{name}_magnitude"] = preference(
            model, tokenizer, prompts, wanted, other, n, batch_size)
    return out


def zsre_metrics(model, tokenizer, facts: Sequence[Fact], batch_size: int = 32
                 ) -> dict[str, np.ndarray]:
    """Per-case top-1 token accuracy of the new answer on the question (efficacy) and its
    rephrasing (generalization), and of the unchanged answer to an unrelated question."""
    n = len(facts)
    out = {}
    sets = {
        "efficacy": (PromptSet.of([[f.text] for f in facts]), [f.target_new for f in facts]),
        "generalization": (PromptSet.of([f.paraphrases for f in facts]),
                           [f.target_new for f in facts]),
        "specificity": (PromptSet.of([[f.extra["loc"] + "?"] if "loc" in f.extra else []
                                      for f in facts]),
                        [f.extra.get("loc_ans", "") for f in facts]),
    }
    for name, (prompts, targets) in sets.items():
        if not prompts.prompts:
            out[name] = np.full(n, np.nan)
            continue
        _, top1 = score_targets(model, tokenizer, prompts.prompts,
                                [targets[c] for c in prompts.case], batch_size)
        out[name] = _per_case_mean(top1, prompts.case, n)
    return out


def summarize(per_case: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over cases (cases without prompts of a kind are left out of that mean)."""
    return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            for k, v in per_case.items()}


class Generator(Protocol):
    """Greedy text for prompts (continuations) and questions (chat answers). ``watch[i]``
    lists every name the i-th text will be searched for: a generator may stop a text once
    it mentions them all for good (``generation.settled_mentions``)."""

    has_chat: bool

    def complete(self, prompts: Sequence[str], watch: Sequence[Sequence[str]] | None = None
                 ) -> list[str]: ...

    def chat(self, questions: Sequence[str], watch: Sequence[Sequence[str]] | None = None
             ) -> list[str]: ...


@functools.lru_cache(maxsize=1)
def _question_templates() -> dict[str, str]:
    text = resources.files("ndb").joinpath("data/chat_questions.json").read_text("utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def chat_question(fact: Fact) -> str | None:
    """The fact as a user would ask it: the record's own question, ZsRE's question, or one
    made from the relation id's template; None when there is none."""
    if fact.extra.get("chat_question"):
        return fact.extra["chat_question"]
    if "loc" in fact.extra:  # ZsRE: the prompt is the question
        return fact.text
    template = _question_templates().get(fact.extra.get("relation_id", ""))
    return template.format(fact.subject) if template else None


def _hits(texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
    return np.array([mentions(t, n) for t, n in zip(texts, names)], dtype=float)


def _groups(facts: Sequence[Fact]) -> list[list[int]]:
    """Indices of the facts of each group of two or more (the record's "group" field)."""
    members: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(facts):
        if f.extra.get("group"):
            members[f.extra["group"]].append(i)
    return [m for m in members.values() if len(m) > 1]


def generative_metrics(generator: Generator, facts: Sequence[Fact], max_prompts: int = 2,
                       generation: bool = True, chat: bool = True,
                       known: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Generative metrics (``legend.GENERATIVE``) as arrays of per-unit successes: per case, except
    groups_hold (per group) and cross_talk (per pair). ``generation`` turns on the prompt
    continuations, ``chat`` the chat answers. ``known`` marks the cases whose true object
    the unedited model gave in chat (its ``chat_true``); by default this row's own.
    ``max_prompts`` caps the neighborhood and spill-over prompts generated per case."""
    answers = _chat_answers(generator, facts) if chat else None
    out = _chat_metrics(facts, answers, known) if answers is not None else {}
    if generation:
        out.update(_continuation_metrics(generator, facts, max_prompts, answers))
    return out


def _chat_metrics(facts: Sequence[Fact], answers: list[str | None],
                  known: np.ndarray | None) -> dict[str, np.ndarray]:
    asked = np.array([a is not None for a in answers])
    said_new = np.array([mentions(a, f.target_new) if a is not None else np.nan
                         for a, f in zip(answers, facts)])
    said_true = np.array([mentions(a, f.target_true) if a is not None and f.target_true
                          else np.nan for a, f in zip(answers, facts)])
    known = (said_true == 1) if known is None else np.asarray(known, dtype=bool)
    return {"chat": said_new, "chat_true": said_true,
            "chat_known": np.where(known & asked, said_new, np.nan)}


def _continuation_metrics(generator: Generator, facts: Sequence[Fact], max_prompts: int,
                          answers: list[str | None] | None) -> dict[str, np.ndarray]:
    n = len(facts)
    new = [f.target_new for f in facts]
    true = [f.target_true or "" for f in facts]
    subject_new: dict[str, list[str]] = defaultdict(list)
    for f in facts:
        subject_new[f.subject].append(f.target_new)
    sets = {
        "rewrite": PromptSet.of([[f.text] for f in facts]),
        "paraphrase": PromptSet.of([f.paraphrases for f in facts]),
        "neighbor": PromptSet.of([f.extra.get("neighborhood_prompts", [])[:max_prompts]
                                  for f in facts]),
        "spill": PromptSet.of([f.extra.get("spillover_prompts", [])[:max_prompts]
                               for f in facts]),
    }
    others = _group_others(facts)
    watch = {"rewrite": lambda c: [new[c], *others[c]], "paraphrase": lambda c: [new[c]],
             "neighbor": lambda c: [true[c], new[c]],
             "spill": lambda c: subject_new[facts[c].subject]}
    texts = generator.complete([p for s in sets.values() for p in s.prompts],
                               [watch[name](c) for name, s in sets.items() for c in s.case])
    split, start = {}, 0
    for name, s in sets.items():
        split[name], start = texts[start : start + len(s.prompts)], start + len(s.prompts)

    def per_case(name: str, wanted: Sequence[str]) -> np.ndarray:
        case = sets[name].case
        return _per_case_mean(_hits(split[name], [wanted[c] for c in case]), case, n)

    out = {"gen_efficacy": per_case("rewrite", new),
           "gen_generalization": per_case("paraphrase", new)}
    kept = [mentions(t, true[c]) and not mentions(t, new[c])
            for t, c in zip(split["neighbor"], sets["neighbor"].case)]
    out["gen_specificity"] = _per_case_mean(np.array(kept, dtype=float),
                                            sets["neighbor"].case, n)
    out["spill_neighbors"] = per_case("neighbor", new)
    spilled = [any(mentions(t, o) for o in subject_new[facts[c].subject])
               for t, c in zip(split["spill"], sets["spill"].case)]
    out["spill_subject"] = _per_case_mean(np.array(spilled, dtype=float), sets["spill"].case, n)
    groups = _groups(facts)
    if groups:
        out["groups_hold"] = np.array([float(all(out["gen_efficacy"][i] == 1 for i in g))
                                       for g in groups])
        rewrite = split["rewrite"]
        out["cross_talk"] = np.array([
            float(mentions(rewrite[i], new[j])
                  or (answers is not None and answers[i] is not None
                      and mentions(answers[i], new[j])))
            for g in groups for i in g for j in g if i != j])
        out["cross_answer"] = np.array([
            float(answers_with(rewrite[i], new[j], new[i])
                  or (answers is not None and answers[i] is not None
                      and answers_with(answers[i], new[j], new[i])))
            for g in groups for i in g for j in g if i != j])
    return out


def _group_others(facts: Sequence[Fact]) -> list[list[str]]:
    """Per fact: the new objects of the other edits of its group (what cross_talk looks for)."""
    others: list[list[str]] = [[] for _ in facts]
    for group in _groups(facts):
        for i in group:
            others[i] = [facts[j].target_new for j in group if j != i]
    return others


def _chat_answers(generator: Generator, facts: Sequence[Fact]) -> list[str | None] | None:
    """Each fact's chat answer (None where it has no question); None without a template."""
    if not generator.has_chat:
        return None
    questions = [chat_question(f) for f in facts]
    asked = [i for i, q in enumerate(questions) if q]
    others = _group_others(facts)
    watch = [[facts[i].target_new, facts[i].target_true or "", *others[i]] for i in asked]
    answers: list[str | None] = [None] * len(facts)
    for i, text in zip(asked, generator.chat([questions[i] for i in asked], watch)):
        answers[i] = text
    return answers
