"""The paper's edit metrics (appendix D), in the ROME/MEMIT code's conventions.

CounterFact: a prompt counts as a success when the mean per-token NLL of the wanted object
is lower than that of the other one; each case's rate is averaged over its prompts, then
over cases. Magnitudes are mean P(wanted) - P(other), with P = exp(-mean NLL).
ZsRE: top-1 accuracy of each answer token under teacher forcing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ndb.eval.scoring import score_targets
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
    w = [wanted[c] for c in prompts.case]
    o = [other[c] for c in prompts.case]
    nll_w, _ = score_targets(model, tokenizer, prompts.prompts, w, batch_size)
    nll_o, _ = score_targets(model, tokenizer, prompts.prompts, o, batch_size)
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
