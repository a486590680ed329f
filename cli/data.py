"""``ndb data``: generate benchmark data sets."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import click

from ndb.errors import FactError
from ndb.eval.geo import DEFAULT_HOLDOUT, RELATIONS, build_geo, to_zsre, write_records
from ndb.record_formats import read_facts


@click.group("data")
def data() -> None:
    """Generate benchmark data sets."""


def _writable(path: Path) -> None:
    """Fail before a long build rather than after it."""
    if path.suffix not in (".json", ".jsonl"):
        raise click.ClickException(f"{path}: the file name must end in .json or .jsonl")
    if path.is_dir():
        raise click.ClickException(f"{path} is a directory")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise click.ClickException(f"cannot write {path}: {folder} is not a writable directory")


@data.command("geo")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="File to write: .json (a list) or .jsonl (one record per line).",
)
@click.option("--n", type=click.IntRange(min=1), help="Number of facts [default: all].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--relations",
    help=f"Comma-separated relations [default: all]: {', '.join(RELATIONS)}.",
)
@click.option(
    "--format",
    "record_format",
    type=click.Choice(["counterfact", "zsre"]),
    default="counterfact",
    show_default=True,
)
@click.option(
    "--min-city-population",
    type=click.IntRange(min=0),
    default=500,
    show_default=True,
    help="Leave out smaller cities.",
)
@click.option(
    "--holdout",
    type=click.FloatRange(0, 1, max_open=True),
    default=DEFAULT_HOLDOUT,
    show_default=True,
    help="Share of subjects never edited, kept as unedited neighbors.",
)
@click.option(
    "--groups",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Edit groups of 2 to K relations of one subject (country: capital, currency, "
    "language, continent, subregion; city: country, continent, US state); 1: no groups.",
)
@click.option(
    "--group-share",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Share of the facts that belong to groups (with --groups 2 or more).",
)
@click.option(
    "--exclude",
    type=click.Path(path_type=Path),
    multiple=True,
    help="A facts file (e.g. the dev set) whose subjects are never edited here; repeatable.",
)
def geo(
    output: Path,
    n: int | None,
    seed: int,
    relations: str | None,
    record_format: str,
    min_city_population: int,
    holdout: float,
    groups: int,
    group_share: float,
    exclude: tuple[Path, ...],
) -> None:
    """Knowledge-editing records of real geographic facts (GeoNames, ISO, countryinfo).

    Each record also carries a chat question ("chat_question") and prompts about its
    subject on relations the set does not edit ("spillover_prompts"), for ndb eval's
    generative metrics.
    """
    _writable(output)
    chosen = [r.strip() for r in relations.split(",") if r.strip()] if relations else None
    try:
        excluded = [f.subject for path in exclude for f in read_facts(path)]
    except FactError as err:
        raise click.ClickException(f"--exclude: {err}") from None
    try:
        records = build_geo(
            n=n,
            seed=seed,
            relations=chosen,
            min_city_population=min_city_population,
            holdout=holdout,
            progress=sys.stderr.isatty(),
            groups=groups,
            group_share=group_share,
            exclude=excluded,
        )
        counts = Counter(r["requested_rewrite"]["relation_id"] for r in records)
        in_groups = sum("group" in r for r in records)
        if record_format == "zsre":
            records = to_zsre(records, seed=seed, min_city_population=min_city_population)
    except (ValueError, ImportError) as err:
        raise click.ClickException(str(err)) from None
    try:
        write_records(records, output)
    except OSError as err:
        raise click.ClickException(f"cannot write {output}: {err.strerror or err}") from None
    per_relation = ", ".join(f"{r} {counts[r]}" for r in RELATIONS if counts[r])
    grouped = f" ({in_groups} in groups)" if in_groups else ""
    click.echo(
        f"wrote {len(records)} {record_format} records to {output}{grouped}: {per_relation}",
        err=True,
    )
