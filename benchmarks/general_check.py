"""Check that ndb's general-ability numbers are lm-evaluation-harness's own.

For each task, on the same documents, the same model and the same lm-eval settings:

(a) ``ndb.eval.general.general_ability``, whose task configs read the local files directly;
(b) lm-eval's built-in task of the same name, loaded from its installed YAML with only the
    dataset source replaced: the same local records, converted here to the Hugging Face
    schema the built-in task expects (plus, where the built-in task names train/validation
    splits that serve only as few-shot examples, those names are cleared; nothing here is
    few-shot).

Both runs go through lm-eval's ``evaluate``; (b) wraps the model in its own ``HFLM`` built
here with ``add_bos_token=True``. The script also compares the requests, the (context,
continuation) strings, that (a) and (b) build, and checks that every sequence reaching the
model starts with ndb's anchor token. It writes ``<out>.md`` and ``<out>.json``.

    python benchmarks/general_check.py --data-dir /work/shared/data/general --threads 1

(about 14 minutes on a shared 2-core CPU with the default limits).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from ndb.anchor import anchor_token_id  # noqa: E402
from ndb.eval import general  # noqa: E402
from ndb.loading import load_model  # noqa: E402
from ndb.output import write_strict_json

# ndb's task name -> lm-eval's built-in task (or group) name
BUILTIN = {
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
    "commonsense_qa": "commonsense_qa",
    "wsc273": "wsc273",
    "lambada": "lambada_openai",
    "mmlu": "mmlu",
    "piqa": "piqa",
    "boolq": "boolq",
    "copa": "copa",
    "openbookqa": "openbookqa",
    "winogrande": "winogrande",
}
LETTERS = "ABCDE"
# What the comparison does and does not show, per task.
NOTES = {
    "arc_easy": (
        "records become `allenai/ai2_arc` rows (question without its `Question: ` prefix, "
        "labels A-D); the built-in `train`/`validation` splits, used only for few-shot "
        "examples, are cleared as the local file has none."
    ),
    "arc_challenge": "as arc_easy.",
    "commonsense_qa": (
        "(b) cannot be run. The local file (llm-foundry's copy of the CommonsenseQA dev set) "
        "keeps 4 of the 5 answer options of every question, and lm-eval's built-in "
        "`commonsense_qa` hard-codes five (`choices['text'][4]`, letters A-E), so it fails on "
        "these records (error below). ndb's task keeps lm-eval's prompt format with the 4 "
        "options and letters A-D. Its scores are not comparable with published (5-option) "
        "CommonsenseQA scores, and the gold answer is C in 492 of the 1,221 questions (40%), "
        "so a model that always answers C scores 0.40."
    ),
    "wsc273": (
        "the local file stores each context with the candidate already in place of the "
        "pronoun, and the rest of the sentence stripped. The conversion rebuilds "
        "`lighteval/winograd_wsc` rows (`text`, `pronoun_loc`, `options`, with `it` standing "
        "in for the pronoun, which the file does not keep), and lm-eval's own `process_doc` "
        "then runs on them. The text after the pronoun gets back its leading space unless it "
        "starts with punctuation, the same rule ndb's task applies, so this rule is the one "
        "thing the comparison cannot test. It reproduces a quirk of the built-in task: the "
        "continuation is scored with two leading spaces (`'  feared violence.'`), since lm-eval "
        "adds its target delimiter to a target that already starts with a space."
    ),
    "lambada": (
        "the local `lambada_test.jsonl` is, per the data's README, the text lm-eval's "
        "`lambada_openai` reads (sha256-matched), so (b) is a stock lm-eval run but for where "
        "the file comes from."
    ),
    "mmlu": (
        "lm-eval's built-in `mmlu` group is used as it is (its four category groups, tags and "
        "size-weighted aggregation); each of its 57 subject tasks reads the local CSVs "
        "(test, and dev as the few-shot split it names) converted to `cais/mmlu` rows. ndb's "
        "task mirrors the same hierarchy, which is why its pooled stderr matches too."
    ),
}
PUNCTUATION = (".", ",", ";", ":", "!", "?")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_options(contexts: list[str]) -> tuple[str, list[str]]:
    """The shared start of the contexts (cut at a space) and what follows it in each."""
    a, b = contexts
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    cut = a.rfind(" ", 0, i) + 1
    return a[:cut], [c[cut:] for c in contexts]


# Converters: local record(s) -> records in the schema of the built-in task's HF dataset.


def arc(rows: list[dict]) -> list[dict]:
    return [
        {
            "id": str(i),
            "question": r["query"].removeprefix("Question: "),
            "choices": {"text": r["choices"], "label": list(LETTERS[: len(r["choices"])])},
            "answerKey": LETTERS[r["gold"]],
        }
        for i, r in enumerate(rows)
    ]


def commonsense_qa(rows: list[dict]) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        lines = r["query"].split("\n")  # Question: q / Choices: / A. x / ... / Answer:
        options = [line[3:] for line in lines[2:-1]]
        out.append(
            {
                "id": str(i),
                "question": lines[0].removeprefix("Question: "),
                "question_concept": "",
                "choices": {"label": list(LETTERS[: len(options)]), "text": options},
                "answerKey": r["choices"][r["gold"]],
            }
        )
    return out


def wsc273(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        prefix, options = split_options(r["context_options"])
        cont = r["continuation"]
        rest = cont if cont.startswith(PUNCTUATION) else " " + cont
        # The local file has the options already substituted for the pronoun, which it does
        # not keep; any non-possessive pronoun leaves lm-eval's option normalization a no-op.
        pronoun = "it"
        out.append(
            {
                "text": prefix + pronoun + rest,
                "pronoun": pronoun,
                "pronoun_loc": len(prefix),
                "quote": "",
                "quote_loc": 0,
                "options": options,
                "label": r["gold"],
                "source": "",
            }
        )
    return out


def lambada(rows: list[dict]) -> list[dict]:
    return [{"text": r["text"]} for r in rows]


def piqa(rows: list[dict]) -> list[dict]:
    return [
        {
            "goal": r["query"].removeprefix("Question: ").removesuffix("\n"),
            "sol1": r["choices"][0],
            "sol2": r["choices"][1],
            "label": r["gold"],
        }
        for r in rows
    ]


def boolq(rows: list[dict]) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        passage, question = r["query"].rsplit("\nQuestion: ", 1)
        out.append(
            {
                "idx": i,
                "passage": passage.removeprefix("Passage: "),
                "question": question.removesuffix("?"),
                "label": r["gold"],
            }
        )
    return out


def copa(rows: list[dict]) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        stem, connector = r["query"].rsplit(" ", 1)
        out.append(
            {
                "idx": i,
                # lm-eval drops the premise's last character (its full stop)
                "premise": stem + ".",
                "question": {"because": "cause", "therefore": "effect"}[connector],
                "choice1": r["choices"][0],
                "choice2": r["choices"][1],
                "label": r["gold"],
            }
        )
    return out


def openbookqa(rows: list[dict]) -> list[dict]:
    return [
        {
            "id": str(i),
            "question_stem": r["query"],
            "choices": {"text": r["choices"], "label": list(LETTERS[: len(r["choices"])])},
            "answerKey": LETTERS[r["gold"]],
        }
        for i, r in enumerate(rows)
    ]


def winogrande(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        prefix, options = split_options(r["context_options"])
        out.append(
            {
                "sentence": f"{prefix}_ {r['continuation']}",
                "option1": options[0],
                "option2": options[1],
                "answer": str(r["gold"] + 1),
            }
        )
    return out


def mmlu_rows(path: Path, subject: str) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return [
            {
                "question": r["question"],
                "subject": subject,
                "choices": [r[f"choice{i}"] for i in range(4)],
                "answer": int(r["answer"]),
            }
            for r in csv.DictReader(f)
        ]


# ndb task -> (local file, converter, split the built-in task evaluates, few-shot-only splits)
CONVERSIONS = {
    "arc_easy": ("arc_easy.jsonl", arc, "test", ("training_split", "validation_split")),
    "arc_challenge": ("arc_challenge.jsonl", arc, "test", ("training_split", "validation_split")),
    "commonsense_qa": ("commonsense_qa.jsonl", commonsense_qa, "validation", ("training_split",)),
    "wsc273": ("winograd_wsc.jsonl", wsc273, "test", ()),
    "lambada": ("lambada_test.jsonl", lambada, "test", ()),
    "piqa": ("piqa.jsonl", piqa, "validation", ("training_split",)),
    "boolq": ("boolq.jsonl", boolq, "validation", ("training_split",)),
    "copa": ("copa.jsonl", copa, "validation", ("training_split",)),
    "openbookqa": (
        "openbook_qa.jsonl",
        openbookqa,
        "test",
        ("training_split", "validation_split"),
    ),
    "winogrande": ("winogrande.jsonl", winogrande, "validation", ("training_split",)),
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def builtin_overrides(data_dir: Path, tasks: list[str], work: Path) -> Path:
    """YAMLs that include each built-in task and replace only its dataset source.

    Each keeps the built-in task's name, so lm-eval's own groups and tags (MMLU's) pick
    them up in place of the built-in ones. Returns the directory to index.
    """
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index
    yaml_dir = work / "yaml"
    yaml_dir.mkdir(parents=True)

    def override(name: str, files: dict[str, str], cleared: tuple[str, ...] = ()) -> None:
        config = {
            "include": str(index[name].yaml_path),
            "task": name,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
            **{key: None for key in cleared},
        }
        (yaml_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    for task in tasks:
        if task == "mmlu":
            for subjects in general.MMLU_CATEGORIES.values():
                for subject in subjects.split():
                    files = {
                        split: write_jsonl(
                            work / "mmlu" / split / f"{subject}.jsonl",
                            mmlu_rows(
                                data_dir / "mmlu" / split / f"{subject}_{split}.csv", subject
                            ),
                        )
                        for split in ("test", "dev")
                    }
                    override(f"mmlu_{subject}", files)
            continue
        filename, convert, split, cleared = CONVERSIONS[task]
        rows = convert(read_jsonl(data_dir / filename))
        path = write_jsonl(work / f"{task}.jsonl", rows)
        override(BUILTIN[task], {split: path}, cleared)
    return yaml_dir


def request_args(manager, configs: list, limit: int | None) -> dict[str, list[list]]:
    """Per leaf task, per document: the (context, continuation) pairs lm-eval builds."""
    out = {}
    for name, task in general.load_tasks(configs, manager)["tasks"].items():
        task.build_all_requests(limit=limit)
        docs: dict[int, list] = {}
        for inst in task.instances:
            docs.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
        out[name.split("::")[-1]] = [docs[i] for i in sorted(docs)]
    return out


class AnchorProbe:
    """Counts the sequences reaching the model and those not starting with the anchor."""

    def __init__(self, model, anchor: int):
        self.model = model
        self.anchor = anchor
        self.rows = 0
        self.bad = 0

    def __enter__(self) -> AnchorProbe:
        self.handle = self.model.register_forward_pre_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        self.rows += ids.shape[0]
        self.bad += int((ids[:, 0] != self.anchor).sum())

    def counts(self) -> dict[str, int]:
        return {"sequences": self.rows, "not_anchored": self.bad}


def compare_requests(ours: dict[str, list], theirs: dict[str, list]) -> dict:
    """How many documents get different requests from (a) and (b), and the first such one.

    Leaf tasks pair up by name (MMLU's subjects), or, for a single task, with each other
    (ndb's ``lambada`` is lm-eval's ``lambada_openai``).
    """
    if len(ours) == 1 and len(theirs) == 1:
        theirs = {next(iter(ours)): next(iter(theirs.values()))}
    ours_docs = [d for name in sorted(ours) for d in ours[name]]
    theirs_docs = [d for name in sorted(ours) for d in theirs.get(name, [])]
    pairs = list(zip(ours_docs, theirs_docs, strict=False))
    return {
        "docs_compared": len(ours_docs),
        "docs_with_different_requests": sum(a != b for a, b in pairs)
        + abs(len(ours_docs) - len(theirs_docs)),
        "first_difference": next(({"ndb": a, "builtin": b} for a, b in pairs if a != b), None),
    }


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="the benchmark files (required to run)")
    parser.add_argument("--tasks", nargs="+", default=list(general.DEFAULT_TASKS))
    parser.add_argument("--limit", type=int, default=100, help="documents per task")
    parser.add_argument("--mmlu-limit", type=int, default=2, help="questions per MMLU subject")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/general_check"))
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite <out>.md from <out>.json and stop"
    )
    args = parser.parse_args()
    if args.render_only:
        report = json.loads(args.out.with_suffix(".json").read_text())
        args.out.with_suffix(".md").write_text(markdown(report))
        return
    if args.data_dir is None:
        parser.error("--data-dir is required")
    command = "python benchmarks/general_check.py " + shlex.join(sys.argv[1:])
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    started = time.time()
    load_start = os.getloadavg()
    model, tok = load_model()
    anchor = anchor_token_id(tok)
    limits = {t: args.mmlu_limit if t == "mmlu" else args.limit for t in args.tasks}

    with tempfile.TemporaryDirectory() as tmp:
        yaml_dir = builtin_overrides(args.data_dir, args.tasks, Path(tmp))
        builtin_manager = TaskManager(include_path=str(yaml_dir))
        local_manager = TaskManager(include_defaults=False)
        builtin_lm = HFLM(
            pretrained=model, tokenizer=tok, batch_size=args.batch_size, add_bos_token=True
        )
        rows = {}
        for task in args.tasks:
            limit = limits[task]
            entry: dict = {"limit": limit}
            print(f"{task}: comparing requests", flush=True)
            ours_cfg = general.task_configs(args.data_dir, [task])
            t0 = time.time()
            ours_req = request_args(local_manager, ours_cfg, limit)
            entry["setup_seconds"] = time.time() - t0
            t0 = time.time()
            full_req = request_args(local_manager, ours_cfg, None)
            entry["setup_seconds_full"] = time.time() - t0
            entry["chars_per_doc_limited"] = chars_per_doc(ours_req)
            entry["chars_per_doc_full"] = chars_per_doc(full_req)
            entry["full_docs"] = sum(len(docs) for docs in full_req.values())
            try:
                theirs_req = request_args(builtin_manager, [BUILTIN[task]], limit)
            except Exception as err:  # a built-in task that cannot read these records
                entry["builtin_error"] = f"{type(err).__name__}: {err}"
            else:
                entry |= compare_requests(ours_req, theirs_req)

            print(f"{task}: ndb (a)", flush=True)
            with AnchorProbe(model, anchor) as probe:
                t0 = time.time()
                ours = general.general_ability(
                    model, tok, args.data_dir, [task], limit=limit, batch_size=args.batch_size
                )
                entry["seconds_ndb"] = time.time() - t0
            settings = ours[task].pop("settings")
            entry["ndb"] = ours[task]
            entry["anchor_ndb"] = probe.counts()

            if "builtin_error" not in entry:
                print(f"{task}: lm-eval built-in (b)", flush=True)
                with AnchorProbe(model, anchor) as probe:
                    t0 = time.time()
                    raw = general.run_lm_eval(
                        builtin_lm, [BUILTIN[task]], limit, task_manager=builtin_manager
                    )
                    entry["seconds_builtin"] = time.time() - t0
                entry["builtin"] = general.task_scores(raw, [task], BUILTIN.get)[task]
                entry["anchor_builtin"] = probe.counts()
            rows[task] = entry
            print(f"{task}: ndb {entry['ndb']}, built-in {entry.get('builtin')}", flush=True)

    report = {
        "command": command,
        "model": "smollm2-135m (SmolLM2-135M-Instruct, float32, CPU)",
        "lm_eval_version": version("lm_eval"),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "settings": settings | {"limit": None, "limits": limits},
        "total_seconds": time.time() - started,
        "tasks": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_strict_json(args.out.with_suffix(".json"), report, indent=2)
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out}.md and .json in {report['total_seconds']:.0f} s")


def chars_per_doc(requests: dict[str, list[list]]) -> float:
    """Mean characters per document over all its requests: a proxy for its compute."""
    docs = [d for v in requests.values() for d in v]
    return sum(len(c) + len(t) for d in docs for c, t in d) / max(len(docs), 1)


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    settings = report["settings"]
    out = [
        "# General ability: ndb's lm-eval tasks vs lm-eval's built-in tasks",
        "",
        "Reproduce (repository root):",
        "",
        "```",
        f"HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 {report['command']}",
        "```",
        "",
        f"Model: {report['model']}. lm-evaluation-harness {report['lm_eval_version']}, "
        f"torch {report['torch_version']}, zero-shot, batch size {settings['batch_size']}, "
        f"`add_bos_token=True` (every sequence starts with ndb's anchor "
        f"`{settings['anchor_token']}`, id {settings['anchor_token_id']}), "
        f"bootstrap iterations {settings['bootstrap_iters']}. Documents: the first "
        f"{next((v for k, v in settings['limits'].items() if k != 'mmlu'), '–')} of each task"
        + (
            f", the first {settings['limits']['mmlu']} of each of the 57 MMLU subjects"
            if "mmlu" in settings["limits"]
            else ""
        )
        + ".",
        "",
        "(a) is `ndb.eval.general.general_ability`: task configs that read the local files. "
        "(b) is lm-eval's built-in task of the same name, loaded from its installed YAML with "
        "only the dataset source replaced by the same local records converted to the schema "
        "of the Hugging Face dataset it names (and, where it names train/validation splits used "
        "only for few-shot examples, those cleared). Both run through lm-eval's `evaluate`.",
        "",
        "## Scores",
        "",
        "| task | metric | n | ndb (a) | lm-eval built-in (b) | (a) − (b) | stderr (a) "
        "| stderr (b) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, e in tasks.items():
        ours, theirs = e["ndb"], e.get("builtin")
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric not in ours:
                continue
            b = theirs[metric] if theirs else None
            diff = ours[metric] - b if b is not None else None
            out.append(
                f"| {task} | {metric} | {ours['n']} | {fmt(ours[metric])} | "
                f"{fmt(b) if theirs else 'n/a (see notes)'} | {fmt(diff)} | "
                f"{fmt(ours[f'{metric}_stderr'])} | "
                f"{fmt(theirs[f'{metric}_stderr']) if theirs else '–'} |"
            )
    out += [
        "",
        "## Requests and anchor token",
        "",
        "Documents whose (context, continuation) strings differ between (a) and (b), and "
        "sequences that reached the model without ndb's anchor as their first token.",
        "",
        "| task | documents compared | documents differing | sequences (a) | not anchored (a) "
        "| sequences (b) | not anchored (b) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task, e in tasks.items():
        a, b = e["anchor_ndb"], e.get("anchor_builtin")
        out.append(
            f"| {task} | {e.get('docs_compared', '–')} | "
            f"{e.get('docs_with_different_requests', '–')} | {a['sequences']} | "
            f"{a['not_anchored']} | {b['sequences'] if b else '–'} | "
            f"{b['not_anchored'] if b else '–'} |"
        )
    notes = [f"- **{t}**: {NOTES[t]}" for t in tasks if t in NOTES]
    if any(e.get("docs_with_different_requests") for e in tasks.values()):
        notes.append("- Tasks with differing requests: see `first_difference` in the JSON.")
    errors = [
        f"- **{t}**, built-in: `{e['builtin_error']}`"
        for t, e in tasks.items()
        if "builtin_error" in e
    ]
    if notes or errors:
        out += ["", "## Notes on the conversions", "", *notes, *errors]
    out += [
        "",
        "## Time on this machine",
        "",
        f"CPU: {report['cpu_count']} cores ({report['cpu']}), {report['torch_threads']} torch "
        f"thread(s); load average {report['loadavg_start'][0]:.1f} at the start and "
        f"{report['loadavg_end'][0]:.1f} at the end (the machine was shared). Whole script: "
        f"{report['total_seconds'] / 60:.1f} min.",
        "",
        "*s (a)*, *s (b)*: wall time of each run of the task. *setup*: the part of a run "
        "that does not use the model (loading the data, building the requests), timed on its "
        "own. *model s/doc*: the rest, per document, averaged over (a) and (b), which do the "
        "same computation (their spread shows how much the shared machine added). "
        "A full run is the setup for all "
        "documents (timed) plus the model time per document times the number of documents, "
        "and, in the last column, also scaled by the mean request length (characters) of all "
        "documents over that of the documents run, since the first documents of a file need "
        "not be typical.",
        "",
        "| task | docs run | s (a) | s (b) | setup s | model s/doc | full docs | full run "
        "| full run, length-adjusted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total = 0.0
    for task, e in tasks.items():
        n = e["ndb"]["n"]
        runs = [e["seconds_ndb"]] + ([e["seconds_builtin"]] if "seconds_builtin" in e else [])
        per_doc = max(sum(runs) / len(runs) - e["setup_seconds"], 0.0) / n
        model_full = per_doc * e["full_docs"]
        full = e["setup_seconds_full"] + model_full
        adjusted = e["setup_seconds_full"] + model_full * (
            e["chars_per_doc_full"] / e["chars_per_doc_limited"]
        )
        total += adjusted
        out.append(
            f"| {task} | {n} | {e['seconds_ndb']:.0f} | {fmt(e.get('seconds_builtin'), 0)} | "
            f"{e['setup_seconds']:.1f} | {per_doc:.3f} | {e['full_docs']} | "
            f"{full / 60:.0f} min | {adjusted / 60:.0f} min |"
        )
    out += ["", f"A full run of these tasks: about {total / 3600:.1f} h (length-adjusted)."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
