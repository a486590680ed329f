"""General ability: zero-shot accuracy with lm-evaluation-harness on local copies of the data.

Editing must not hurt what the model could already do, so ndb scores the model, with or
without its fact database attached, on the benchmarks the NeuralDB paper uses (ARC-easy,
ARC-challenge, CommonsenseQA, WSC273, LAMBADA, MMLU; PIQA, BoolQ, COPA, OpenBookQA and
WinoGrande optional). The scoring is lm-eval's own (its ``HFLM`` model wrapper, task
machinery, metrics and aggregation); only the task definitions are ndb's: each mirrors
lm-eval's built-in task of the same name (prompt, choices, target, metrics) but reads
local files, so nothing is downloaded. The data directory holds (llm-foundry's JSONL
format, except LAMBADA and MMLU):

- ``arc_easy.jsonl``, ``arc_challenge.jsonl``, ``openbook_qa.jsonl``, ``piqa.jsonl``,
  ``boolq.jsonl``, ``copa.jsonl``, ``commonsense_qa.jsonl``: ``{"query", "choices", "gold"}``
- ``winograd_wsc.jsonl``, ``winogrande.jsonl``: ``{"context_options", "continuation", "gold"}``
- ``lambada_test.jsonl``: ``{"text"}``, the LAMBADA (OpenAI) test set lm-eval uses
- ``mmlu/test/<subject>_test.csv`` for the 57 subjects: question, choice0-3, answer (0-3)

Every request reaches the model starting with ndb's anchor token, exactly as ndb's own
scoring does: ``HFLM`` is told ``add_bos_token=True``, which makes it tokenize with
``add_special_tokens=True``, and the tokenizer ndb hands out prepends the anchor then.
"""

from __future__ import annotations

import copy
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ndb.anchor import anchor_token_id

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "commonsense_qa", "wsc273", "lambada", "mmlu")
OPTIONAL_TASKS = ("piqa", "boolq", "copa", "openbookqa", "winogrande")
KNOWN_TASKS = DEFAULT_TASKS + OPTIONAL_TASKS

# lm-eval estimates the stderr of corpus-level metrics (LAMBADA's perplexity) by bootstrap;
# its default of 100,000 resamples takes minutes on a small CPU for no visible gain.
BOOTSTRAP_ITERS = 10_000

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_PERPLEXITY = {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}


class GeneralEvalError(ValueError):
    """An unknown task or a missing data file."""


def _csqa_text(doc: dict) -> str:
    # The local prompt has a "Choices:" line that lm-eval's commonsense_qa prompt does not.
    return doc["query"].replace("\nChoices:\n", "\n", 1)


def _wsc_target(doc: dict) -> str:
    # lm-eval scores the original sentence after the pronoun, which keeps the space before a
    # following word (its default target delimiter then adds a second one); the local file
    # stores the continuation stripped.
    cont = doc["continuation"]
    return cont if cont.startswith((".", ",", ";", ":", "!", "?")) else " " + cont


def _copa_choices(doc: dict) -> list[str]:
    # lm-eval's copa choices carry a leading space of their own, on top of the delimiter.
    return [" " + c for c in doc["choices"]]


def _boolq_text(doc: dict) -> str:
    return doc["query"].removeprefix("Passage: ") + "\nAnswer:"


# Each task: its local file and the lm-eval fields that mirror the built-in task, written
# against the local file's columns (llm-foundry's format; LAMBADA the exact lm-eval text).
_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "arc_easy": (
        "arc_easy.jsonl",
        {
            "doc_to_text": "{{query}}\nAnswer:",  # query is "Question: ..."
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "arc_challenge": (
        "arc_challenge.jsonl",
        {
            "doc_to_text": "{{query}}\nAnswer:",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "commonsense_qa": (
        "commonsense_qa.jsonl",
        {
            "doc_to_text": _csqa_text,
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [_ACC],
        },
    ),
    "wsc273": (
        "winograd_wsc.jsonl",
        {
            # An int from doc_to_text makes lm-eval score one continuation after each context.
            "doc_to_text": "gold",
            "doc_to_choice": "context_options",
            "doc_to_target": _wsc_target,
            "metric_list": [_ACC],
        },
    ),
    "lambada": (
        "lambada_test.jsonl",
        {
            "output_type": "loglikelihood",
            "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
            "doc_to_target": "{{' '+text.split(' ')[-1]}}",
            "metric_list": [_PERPLEXITY, _ACC],
        },
    ),
    "piqa": (
        "piqa.jsonl",
        {
            "doc_to_text": "{{query}}Answer:",  # query is "Question: ...\n"
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "boolq": (
        "boolq.jsonl",
        {
            "doc_to_text": _boolq_text,
            "doc_to_choice": ["no", "yes"],
            "doc_to_target": "gold",
            "metric_list": [_ACC],
        },
    ),
    "copa": (
        "copa.jsonl",
        {
            "doc_to_text": "query",
            "doc_to_choice": _copa_choices,
            "doc_to_target": "gold",
            "metric_list": [_ACC],
        },
    ),
    "openbookqa": (
        "openbook_qa.jsonl",
        {
            "doc_to_text": "query",
            "doc_to_choice": "choices",
            "doc_to_target": "gold",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "winogrande": (
        "winogrande.jsonl",
        {
            "doc_to_text": "gold",
            "doc_to_choice": "context_options",
            "doc_to_target": "continuation",
            "metric_list": [_ACC],
        },
    ),
}

_MMLU_TEMPLATE = {
    "doc_to_text": (
        "{{question.strip()}}\nA. {{choice0}}\nB. {{choice1}}\nC. {{choice2}}\n"
        "D. {{choice3}}\nAnswer:"
    ),
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "metric_list": [_ACC],
}


def _mmlu_features():
    from datasets import Features, Value

    # Left to itself, the CSV reader (pandas) reads answer options such as "None" or "NA" as
    # missing values and "4" as a number.
    return Features(
        {
            "question": Value("string"),
            **{f"choice{i}": Value("string") for i in range(4)},
            "answer": Value("int64"),
        }
    )


# lm-eval's mmlu group: four category groups over the 57 subject tasks, each averaging
# accuracy over questions (weight_by_size), which also fixes how the stderr is pooled.
MMLU_CATEGORIES = {
    "stem": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry "
        "college_computer_science college_mathematics college_physics computer_security "
        "conceptual_physics electrical_engineering elementary_mathematics high_school_biology "
        "high_school_chemistry high_school_computer_science high_school_mathematics "
        "high_school_physics high_school_statistics machine_learning"
    ),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging "
        "management marketing medical_genetics miscellaneous nutrition professional_accounting "
        "professional_medicine virology"
    ),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics "
        "high_school_macroeconomics high_school_microeconomics high_school_psychology "
        "human_sexuality professional_psychology public_relations security_studies sociology "
        "us_foreign_policy"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history "
        "high_school_world_history international_law jurisprudence logical_fallacies "
        "moral_disputes moral_scenarios philosophy prehistory professional_law world_religions"
    ),
}
_BY_SIZE = [{"metric": "acc", "weight_by_size": True}]


def _mmlu_task(data_dir: Path, subject: str) -> dict[str, Any]:
    path = data_dir / "mmlu" / "test" / f"{subject}_test.csv"
    if not path.is_file():
        raise GeneralEvalError(f"mmlu: data file {path} does not exist")
    return {
        "task": f"mmlu_{subject}",
        "dataset_path": "csv",
        "dataset_kwargs": {
            "data_files": {"test": str(path)},
            "features": _mmlu_features(),
            "keep_default_na": False,
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about "
        f"{subject.replace('_', ' ')}.\n\n",
        "num_fewshot": 0,
        **_MMLU_TEMPLATE,
    }


def _mmlu_config(data_dir: Path) -> dict[str, Any]:
    return {
        "group": "mmlu",
        "task": [
            {
                "group": f"mmlu_{category}",
                "task": [_mmlu_task(data_dir, s) for s in subjects.split()],
                "aggregate_metric_list": _BY_SIZE,
            }
            for category, subjects in MMLU_CATEGORIES.items()
        ],
        "aggregate_metric_list": _BY_SIZE,
    }


def task_configs(data_dir: str | Path, tasks: Sequence[str] | None = None) -> list[dict]:
    """lm-eval task (or, for ``mmlu``, group) configs reading the local files in ``data_dir``.

    Raises ``GeneralEvalError`` for an unknown task or a missing data file.
    """
    data_dir = Path(data_dir)
    names = list(DEFAULT_TASKS if tasks is None else tasks)
    unknown = [n for n in names if n not in KNOWN_TASKS]
    if unknown:
        raise GeneralEvalError(
            f"unknown task(s) {', '.join(map(repr, unknown))} (known: {', '.join(KNOWN_TASKS)})"
        )
    configs = []
    for name in names:
        if name == "mmlu":
            configs.append(_mmlu_config(data_dir))
            continue
        filename, fields = _TASKS[name]
        path = data_dir / filename
        if not path.is_file():
            raise GeneralEvalError(f"{name}: data file {path} does not exist")
        configs.append(
            {
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(path)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "num_fewshot": 0,
                **fields,
            }
        )
    return configs


@contextmanager
def _quiet(active: bool) -> Iterator[None]:
    """Silence lm-eval and datasets for a while: their progress bars and prints cannot be
    turned off one by one, so stdout and stderr go nowhere and lm-eval logs errors only."""
    if not active:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with redirect_stdout(sink), redirect_stderr(sink):
            yield
    finally:
        logger.setLevel(level)


@contextmanager
def _no_telemetry() -> Iterator[None]:
    """Stop datasets from pinging its S3 bucket (a download counter) on every local load.

    Unless ``HF_HUB_OFFLINE`` or ``HF_UPDATE_DOWNLOAD_COUNTS=0`` was set before it was
    imported, each load of a local file makes a request that, with no network, can wait
    its 3 s timeout: minutes for MMLU's 57 files.
    """
    from datasets import config

    counts = config.HF_UPDATE_DOWNLOAD_COUNTS
    config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        config.HF_UPDATE_DOWNLOAD_COUNTS = counts


def make_lm(model, tokenizer, batch_size: int = 16):
    """lm-eval's ``HFLM`` around an already-loaded model, fed ndb's anchored token ids."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=model,
        # HFLM may set a pad token on the tokenizer it is given; keep the caller's intact.
        tokenizer=copy.deepcopy(tokenizer),
        batch_size=batch_size,
        add_bos_token=True,
        # Used only for an empty context, which these tasks never have; keep it ndb's anyway.
        prefix_token_id=anchor_token_id(tokenizer),
    )


def _is_group(config: dict | str) -> bool:
    return isinstance(config, dict) and "group" in config


def _build_group(manager, config: dict):
    """An lm-eval ``Group`` of inline task dicts and groups.

    lm-eval 0.4.13 cannot load such a group itself: it hands the group's own keys down to
    its tasks, whose config then rejects them.
    """
    from lm_eval.api.group import Group

    group = Group.from_config({k: v for k, v in config.items() if k != "task"})
    tasks = [c for c in config["task"] if not _is_group(c)]
    for task in manager.load(tasks)["tasks"].values() if tasks else ():
        group.add(task)
    for sub in config["task"]:
        if _is_group(sub):
            group.add(_build_group(manager, sub))
    return group


def load_tasks(configs: list, task_manager=None) -> dict:
    """lm-eval tasks and groups, zero-shot, for ``configs``: task or group dicts, or names
    known to ``task_manager`` (default: one that knows no built-in task)."""
    from lm_eval.tasks import TaskManager

    manager = task_manager or TaskManager(include_defaults=False)
    with _no_telemetry():  # the tasks load their data as they are built
        loaded = manager.load([_build_group(manager, c) if _is_group(c) else c for c in configs])
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


def run_lm_eval(lm, configs: list, limit: int | None, task_manager=None) -> dict:
    """Evaluate ``configs`` (see ``load_tasks``) with lm-eval's ``evaluate``; its raw results."""
    from lm_eval.evaluator import evaluate

    return evaluate(
        lm=lm,
        task_dict=load_tasks(configs, task_manager),
        limit=limit,
        bootstrap_iters=BOOTSTRAP_ITERS,
        log_samples=False,
    )


def _leaf_tasks(raw: dict, name: str) -> list[str]:
    children = raw.get("group_subtasks", {}).get(name)
    if children is None:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(raw, child)]


def task_scores(raw: dict, names: Sequence[str], rename: Callable[[str], str] = str) -> dict:
    """Per task: acc, acc_stderr, n, and acc_norm / perplexity where lm-eval reports them.

    ``rename`` maps ndb's task name to the key of lm-eval's results (they differ when the
    results come from a built-in task, e.g. ``lambada`` -> ``lambada_openai``).
    """
    results = raw["results"]
    counts = raw["n-samples"]
    out = {}
    for name in names:
        key = rename(name)
        metrics = results[key]
        entry: dict[str, Any] = {}
        for metric in ("acc", "acc_norm", "perplexity"):
            if f"{metric},none" in metrics:
                entry[metric] = float(metrics[f"{metric},none"])
                stderr = metrics.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = None if stderr in (None, "N/A") else float(stderr)
        leaves = _leaf_tasks(raw, key)
        entry["n"] = sum(counts[t]["effective"] for t in leaves)
        if leaves != [key]:
            entry["subtasks"] = len(leaves)
        out[name] = entry
    return out


def general_ability(
    model,
    tokenizer,
    data_dir: str | Path,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, dict]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (default ``DEFAULT_TASKS``), by lm-eval.

    ``model`` is used as is (with any hooks attached); ``tokenizer`` must be ndb's, which
    starts every text with the anchor token. ``limit`` caps the documents of each task,
    taken from the start of its file (lm-eval's ``--limit``); for ``mmlu`` it caps each of
    the 57 subjects, so up to 57 x ``limit`` questions. ``progress`` shows lm-eval's progress
    bars and log; without it, stdout and stderr are silenced while lm-eval runs.

    Returns ``{task: {"acc", "acc_stderr", "n", ..., "settings"}}``: ``acc_norm`` too for
    ARC, PIQA and OpenBookQA, ``perplexity`` for LAMBADA, ``subtasks`` for MMLU, and under
    ``settings`` how lm-eval was run (version, ``add_bos_token``, anchor token, limit).
    """
    names = list(DEFAULT_TASKS if tasks is None else tasks)
    configs = task_configs(data_dir, names)
    anchor = anchor_token_id(tokenizer)
    with _quiet(not progress):
        raw = run_lm_eval(make_lm(model, tokenizer, batch_size), configs, limit)
    settings = {
        "lm_eval_version": version("lm_eval"),
        "num_fewshot": 0,
        "add_bos_token": True,
        "anchor_token_id": anchor,
        "anchor_token": tokenizer.convert_ids_to_tokens(anchor),
        "limit": limit,
        "limit_applies_to": "each task; each MMLU subject",
        "batch_size": batch_size,
        "bootstrap_iters": BOOTSTRAP_ITERS,
    }
    return {
        task: scores | {"settings": dict(settings)}
        for task, scores in task_scores(raw, names).items()
    }
