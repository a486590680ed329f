"""One evaluation run: the unedited model and each editing method, on the same facts.

Rows: "pre-edited" (the model as loaded), then one per method. Each row holds the edit
metrics of the facts' schema (CounterFact or ZsRE), the generative ones (greedy
continuations and chat answers, ``metrics.LEGEND``), fluency and consistency where the facts
allow, and general ability when a data directory is given. The pre-edited row decides which
facts the model knows in chat, for every method's ``chat_known``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ndb.eval.generation import (
    ModelGenerator,
    TfidfReference,
    ngram_entropy,
    sample_generations,
)
from ndb.eval.metrics import counterfact_metrics, generative_metrics, summarize, zsre_metrics
from ndb.facts import Fact
from ndb.models import params_fingerprint
from ndb.store import atomic_write_json


@dataclass
class EvalSettings:
    batch_size: int = 32  # prompts scored at once (teacher-forced; no faster with more)
    # texts generated at once: on this 2-core CPU greedy texts came 1.28x faster per fact in
    # batches of 64 than of 32, the same texts (benchmarks/results/eval_speed_batches.md)
    gen_batch_size: int = 64
    fluency_cases: int = 100  # cases whose first generation prompt is sampled from
    fluency_tokens: int = 100
    # fluency samples drawn at once: every capped prompt in one batch, since a CPU reads the
    # weights once per step whatever the batch (0.22 s per prompt against 0.32 at 64 and
    # 0.45 at 32 on this 2-core CPU: benchmarks/results/decode_batch.md); the samples
    # differ with the batches
    fluency_batch_size: int = 100
    seed: int = 0
    consistency: TfidfReference | None = None
    general_dir: str | None = None
    general_tasks: Sequence[str] | None = None
    general_limit: int | None = None
    mmlu_limit: int | None = None  # questions per MMLU subject (57 subjects); default as above
    generation: bool = True  # greedy continuations: gen_*, spill_*, groups_hold, cross_talk
    chat: bool = True  # chat answers, for models with a chat template
    gen_prompts: int = 2  # neighborhood and spill-over prompts generated per case
    gen_tokens: int = 16  # greedy tokens per continuation
    chat_tokens: int = 32  # greedy tokens per chat answer
    timings: dict[str, float] = field(default_factory=dict)  # seconds per row and stage


def schema_of(facts: Sequence[Fact]) -> str:
    """"zsre" when the facts carry ZsRE's locality question, else "counterfact"."""
    return "zsre" if all("loc" in f.extra for f in facts) else "counterfact"


def _generation_metrics(model, tok, facts: Sequence[Fact], settings: EvalSettings
                        ) -> dict[str, float]:
    cases = [f for f in facts if f.extra.get("generation_prompts")][: settings.fluency_cases]
    if not cases or settings.fluency_cases == 0:
        return {}
    texts = sample_generations(model, tok, [f.extra["generation_prompts"][0] for f in cases],
                               settings.fluency_tokens, seed=settings.seed,
                               batch_size=settings.fluency_batch_size)
    out = {"fluency": 100 * float(np.mean([ngram_entropy(t) for t in texts]))}
    ref = settings.consistency
    if ref is not None:
        scores = [ref.similarity(text, " ".join(refs)) for f, text in zip(cases, texts)
                  if (refs := ref.references(f.extra.get("relation_id"),
                                             f.extra.get("target_new_id")))]
        if scores:
            out["consistency"] = 100 * float(np.mean(scores))
    return out


def measure(model, tok, facts: Sequence[Fact], settings: EvalSettings,
            label: str = "") -> dict[str, float]:
    """All metrics of one model state, as percentages (fluency: ROME's x100 entropy)."""
    return measure_cases(model, tok, facts, settings, label)[0]


def measure_cases(model, tok, facts: Sequence[Fact], settings: EvalSettings, label: str = "",
                  known: np.ndarray | None = None) -> tuple[dict[str, float],
                                                           dict[str, np.ndarray]]:
    """``measure``'s row and the per-case results behind it; ``known`` marks the facts the
    unedited model answers truly in chat (default: this model state's own answers)."""
    label = label or "row"
    stage = _Stages(settings.timings, label)
    with stage("teacher-forced"):
        if schema_of(facts) == "zsre":
            per_case = zsre_metrics(model, tok, facts, settings.batch_size)
        else:
            per_case = counterfact_metrics(model, tok, facts, settings.batch_size)
    if settings.generation or settings.chat:
        generator = _TimedGenerator(ModelGenerator(model, tok, settings.gen_tokens,
                                                   settings.chat_tokens,
                                                   settings.gen_batch_size), stage)
        per_case.update(generative_metrics(generator, facts, settings.gen_prompts,
                                           settings.generation, settings.chat, known))
    row = {k: 100 * v for k, v in summarize(per_case).items()}
    if schema_of(facts) == "counterfact":
        with stage("fluency"):
            row.update(_generation_metrics(model, tok, facts, settings))
    if settings.general_dir:
        with stage("general"):
            general = _general(model, tok, settings)
        for task, result in general.items():
            row[f"general/{task}"] = 100 * result["acc"]
        row["general/mean"] = float(np.mean([100 * r["acc"] for r in general.values()]))
    settings.timings[label] = sum(v for k, v in settings.timings.items()
                                  if k.startswith(f"{label}/"))
    return row, per_case


class _Stages:
    """``with stage(name):`` records the block's seconds as ``timings["label/name"]``."""

    def __init__(self, timings: dict[str, float], label: str):
        self.timings, self.label = timings, label

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"{self.label}/{name}"
            self.timings[key] = time.perf_counter() - start


class _TimedGenerator:
    """A generator whose continuations count as the "generation" stage and whose chat
    answers count as "chat"."""

    def __init__(self, generator: ModelGenerator, stage: _Stages):
        self.generator, self.stage = generator, stage
        self.has_chat = generator.has_chat

    def complete(self, prompts: Sequence[str], watch: Sequence[Sequence[str]] | None = None
                 ) -> list[str]:
        with self.stage("generation"):
            return self.generator.complete(prompts, watch)

    def chat(self, questions: Sequence[str], watch: Sequence[Sequence[str]] | None = None
             ) -> list[str]:
        with self.stage("chat"):
            return self.generator.chat(questions, watch)


def _general(model, tok, settings: EvalSettings) -> dict[str, dict]:
    from ndb.eval.general import DEFAULT_TASKS, general_ability

    tasks = list(settings.general_tasks or DEFAULT_TASKS)
    mmlu_limit = settings.mmlu_limit or settings.general_limit
    others = [t for t in tasks if t != "mmlu"]
    results = general_ability(model, tok, settings.general_dir, others,
                              settings.general_limit) if others else {}
    if "mmlu" in tasks:
        results.update(general_ability(model, tok, settings.general_dir, ["mmlu"], mmlu_limit))
    return results


Method = Callable[[], AbstractContextManager]


def unedited_key(model, tok, facts: Sequence[Fact], settings: EvalSettings) -> str | None:
    """What the unedited row depends on, hashed: every weight and its dtype, the tokenizer,
    the facts, the settings, the general-ability data files and this package's code. None
    when it cannot be told (a consistency reference)."""
    if settings.consistency is not None:
        return None
    here = Path(__file__).parent
    general = sorted((str(f.relative_to(settings.general_dir)), f.stat().st_size,
                      f.stat().st_mtime_ns) for f in Path(settings.general_dir).rglob("*")
                     if f.is_file()) if settings.general_dir else []
    described = {
        "weights": params_fingerprint(model.named_parameters()),
        "dtype": str(next(model.parameters()).dtype),
        "tokenizer": [len(tok), getattr(tok, "chat_template", None)],
        "facts": [f.to_json() for f in facts],
        "settings": {f.name: getattr(settings, f.name) for f in fields(settings)
                     if f.name not in ("timings", "consistency")},
        "general": general,
        "code": [hashlib.sha256(f.read_bytes()).hexdigest()
                 for f in sorted([*here.rglob("*.py"), *here.glob("*.json")])],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()
                          ).hexdigest()[:24]


def measure_unedited(model, tok, facts: Sequence[Fact], settings: EvalSettings,
                     cache: Path | None = None) -> tuple[dict[str, float], np.ndarray | None]:
    """The unedited row and which facts it answers truly in chat, read from ``cache`` when
    the same model, facts, settings and code were measured before (then written there)."""
    key = unedited_key(model, tok, facts, settings) if cache is not None else None
    path = cache / f"unedited-{key}.json" if key else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        settings.timings["pre-edited"] = 0.0
        known = saved["chat_true"]
        return saved["row"], None if known is None else np.array(known, dtype=bool)
    row, per_case = measure_cases(model, tok, facts, settings, "pre-edited")
    known = per_case["chat_true"] == 1 if "chat_true" in per_case else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"row": row, "chat_true": None if known is None
                                 else known.tolist()})
    return row, known


def evaluate(model, tok, facts: Sequence[Fact], methods: dict[str, Method],
             settings: EvalSettings, say: Callable[[str], None] = lambda _: None,
             cache: Path | None = None) -> dict[str, dict[str, float]]:
    """Rows for the unedited model and for each method (a context manager that applies the
    edit to ``model`` on entry and takes it back on exit). The unedited row is kept in
    ``cache`` (see :func:`measure_unedited`)."""
    say("measuring the unedited model")
    rows = {}
    rows["pre-edited"], known = measure_unedited(model, tok, facts, settings, cache)
    say(_stage_line(settings.timings, "pre-edited"))
    for name, apply in methods.items():
        say(f"measuring {name}")
        with apply():
            rows[name], _ = measure_cases(model, tok, facts, settings, name, known)
        say(_stage_line(settings.timings, name))
    return rows


def _stage_line(timings: dict[str, float], label: str) -> str:
    stages = ", ".join(f"{k.removeprefix(label + '/')} {v:.1f} s" for k, v in timings.items()
                       if k.startswith(f"{label}/"))
    return f"{label}: {timings[label]:.1f} s ({stages or 'measured before, read from the cache'})"


COLUMNS = [("efficacy", "Eff."), ("generalization", "Gen."), ("specificity", "Spe."),
           ("efficacy_magnitude", "Eff.M"), ("generalization_magnitude", "Gen.M"),
           ("specificity_magnitude", "Spe.M"), ("gen_efficacy", "G.Eff."),
           ("gen_generalization", "G.Gen."), ("gen_specificity", "G.Spe."), ("chat", "Chat"),
           ("chat_known", "Chat(kn.)"), ("chat_true", "Chat(old)"), ("groups_hold", "Groups"),
           ("cross_talk", "Cross"), ("cross_answer", "Cross.A"), ("spill_subject", "Spill.S"),
           ("spill_neighbors", "Spill.N"), ("fluency", "Flu."), ("consistency", "Consis."),
           ("general/mean", "General")]


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    present = [(k, h) for k, h in COLUMNS if any(k in r for r in rows.values())]
    general = sorted({k for r in rows.values() for k in r
                      if k.startswith("general/") and k != "general/mean"})
    present += [(k, k.removeprefix("general/")) for k in general]
    lines = ["| method | " + " | ".join(h for _, h in present) + " |",
             "|---" * (len(present) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[k]:.1f}" if row.get(k) is not None and np.isfinite(row[k]) else "-"
                 for k, _ in present]  # None: not measurable, as read back from strict JSON
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_PROMPT_KINDS = {"efficacy": "rewrite", "generalization": "paraphrase"}
_SPECIFICITY_PROMPTS = {"counterfact": "neighborhood", "zsre": "locality ('loc')"}


def noted_rows(rows: dict[str, dict[str, float]], schema: str) -> dict[str, dict]:
    """``rows`` for a JSON report: a metric that could not be measured (NaN) gets a reason
    under the row's "notes", so that writing it as null loses nothing."""
    kinds = {**_PROMPT_KINDS, "specificity": _SPECIFICITY_PROMPTS[schema]}
    out = {}
    for name, row in rows.items():
        notes = {}
        for key, value in row.items():
            if value is None or not np.isfinite(value):
                kind = kinds.get(key.removesuffix("_magnitude"))
                notes[key] = (f"no {kind} prompts in the facts" if kind
                              else "not measurable on these facts")
        out[name] = {**row, "notes": notes} if notes else dict(row)
    return out
