"""Read a few groups by hand: build a database of the chosen subjects' facts with
ComputeConfig overrides, then print each edit's greedy continuation and chat answer, per
group, and a summary (greedy paraphrase success, groups holding, rewrite success, chat
success, cross-talk pairs).

    python benchmarks/group_probe.py benchmarks/results/sweep_method_groups_facts.json \
        sum --subjects Mongolia,Belarus,Greenland,Iran,Yemen,Andorra --set '{"lr": 1.0}'

Databases go to .scratch/group_probe/NAME (reused when complete).
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_method import built  # noqa: E402

from ndb import load_model, read_facts  # noqa: E402
from ndb.eval.generation import ModelGenerator, mentions  # noqa: E402
from ndb.eval.metrics import chat_question  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("facts")
ap.add_argument("name")
ap.add_argument("--subjects", default="", help="comma-separated subjects (default: all)")
ap.add_argument("--set", default="{}", help="ComputeConfig overrides, as JSON")
a = ap.parse_args()
facts = read_facts(a.facts)
if a.subjects:
    keep = set(a.subjects.split(","))
    facts = [f for f in facts if f.subject in keep]
model, tok = load_model()
cache = Path(__file__).resolve().parents[1] / ".scratch" / "group_probe" / a.name
db, seconds = built(cache, facts, model, tok, json.loads(a.set))
print(f"build {seconds} s/fact", flush=True)
db.attach(model, tok)
gen = ModelGenerator(model, tok)
groups = defaultdict(list)
for f in facts:
    groups[f.extra.get("group") or f.subject].append(f)
stats = defaultdict(list)
texts = gen.complete([f.text for f in facts])
paraphrases = gen.complete([p for f in facts for p in f.paraphrases])
chats = gen.chat([chat_question(f) for f in facts])
out = {id(f): (t, c) for f, t, c in zip(facts, texts, chats)}
wanted = [f.target_new for f in facts for _ in f.paraphrases]
stats["para"] = [mentions(t, new) for t, new in zip(paraphrases, wanted)]
for fs in groups.values():
    ok = all(mentions(out[id(f)][0], f.target_new) for f in fs)
    if len(fs) > 1:
        stats["hold"].append(ok)
    print(f"== {'HOLD' if ok else 'FAIL'} {fs[0].subject}")
    for f in fs:
        t, c = out[id(f)]
        stats["gen"].append(mentions(t, f.target_new))
        stats["chat"].append(mentions(c, f.target_new))
        for o in fs:
            if o is not f:
                stats["cross"].append(mentions(t, o.target_new) or mentions(c, o.target_new))
        mark = "ok" if mentions(t, f.target_new) else "--"
        chat_mark = "ok" if mentions(c, f.target_new) else "--"
        print(f"  [{mark}|chat {chat_mark}] {f.text!r} new={f.target_new}\n"
              f"      gen: {t!r}\n      chat: {c!r}")
print("SUMMARY", a.name, {k: f"{100 * sum(v) / len(v):.1f} ({len(v)})" for k, v in stats.items()})
