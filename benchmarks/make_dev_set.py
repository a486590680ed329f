"""The dev set the layer/gamma sweep runs on: well-known facts, CounterFact schema.

Each relation lists (subject, true object) pairs. Within a group of subjects sharing an
object, every other subject is edited and the rest serve only as neighbors, so that a
neighborhood prompt never names an edited subject. New objects are drawn, seeded, from the
relation's other objects.

Every record carries a chat question (its relation's template in ndb/data/chat_questions.json).
After those facts come groups: well-known countries, none named elsewhere in the set, with 2
to 4 of capital, currency, language and continent edited, each record naming its group and
carrying spill-over prompts (the subject's relations the group leaves unedited).

    python benchmarks/make_dev_set.py   # writes ndb/data/dev_counterfact.json
"""

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "ndb" / "data"
OUT = DATA / "dev_counterfact.json"
QUESTIONS = json.loads((DATA / "chat_questions.json").read_text(encoding="utf-8"))

# relation id: (prompt, paraphrase templates, (subject, true object) pairs)
R = {
    "P17": (
        "{} is located in the country of",
        [
            "Where is {}? It is located in the country of",
            "A trip to {} means a visit to the country of",
        ],
        [
            ("Paris", "France"),
            ("Lyon", "France"),
            ("Marseille", "France"),
            ("Bordeaux", "France"),
            ("Munich", "Germany"),
            ("Hamburg", "Germany"),
            ("Berlin", "Germany"),
            ("Frankfurt", "Germany"),
            ("Milan", "Italy"),
            ("Naples", "Italy"),
            ("Venice", "Italy"),
            ("Florence", "Italy"),
            ("Osaka", "Japan"),
            ("Kyoto", "Japan"),
            ("Tokyo", "Japan"),
            ("Yokohama", "Japan"),
            ("Barcelona", "Spain"),
            ("Madrid", "Spain"),
            ("Seville", "Spain"),
            ("Valencia", "Spain"),
            ("Toronto", "Canada"),
            ("Vancouver", "Canada"),
            ("Montreal", "Canada"),
            ("Ottawa", "Canada"),
        ],
    ),
    "P103": (
        "The mother tongue of {} is",
        ["{} grew up speaking", "Everyone knows that {}'s native language is"],
        [
            ("Victor Hugo", "French"),
            ("Emmanuel Macron", "French"),
            ("Jacques Chirac", "French"),
            ("Édith Piaf", "French"),
            ("Angela Merkel", "German"),
            ("Johann Wolfgang von Goethe", "German"),
            ("Olaf Scholz", "German"),
            ("Friedrich Nietzsche", "German"),
            ("Vladimir Putin", "Russian"),
            ("Leo Tolstoy", "Russian"),
            ("Fyodor Dostoevsky", "Russian"),
            ("Mikhail Gorbachev", "Russian"),
            ("Pablo Picasso", "Spanish"),
            ("Gabriel García Márquez", "Spanish"),
            ("Penélope Cruz", "Spanish"),
            ("Miguel de Cervantes", "Spanish"),
        ],
    ),
    "P176": (
        "{} is produced by",
        ["The manufacturer of {} is", "{} is a product made by"],
        [
            ("iPhone", "Apple"),
            ("MacBook", "Apple"),
            ("iPad", "Apple"),
            ("Apple Watch", "Apple"),
            ("Windows", "Microsoft"),
            ("Xbox", "Microsoft"),
            ("Microsoft Office", "Microsoft"),
            ("Surface Pro", "Microsoft"),
            ("Galaxy S", "Samsung"),
            ("PlayStation", "Sony"),
            ("Walkman", "Sony"),
            ("Corolla", "Toyota"),
            ("Prius", "Toyota"),
            ("Camry", "Toyota"),
            ("Mustang", "Ford"),
            ("Model S", "Tesla"),
        ],
    ),
    "P641": (
        "{} plays the sport of",
        ["{} is a professional athlete who plays", "The sport that {} is famous for is"],
        [
            ("Michael Jordan", "basketball"),
            ("LeBron James", "basketball"),
            ("Kobe Bryant", "basketball"),
            ("Stephen Curry", "basketball"),
            ("Lionel Messi", "soccer"),
            ("Cristiano Ronaldo", "soccer"),
            ("Neymar", "soccer"),
            ("David Beckham", "soccer"),
            ("Roger Federer", "tennis"),
            ("Serena Williams", "tennis"),
            ("Rafael Nadal", "tennis"),
            ("Novak Djokovic", "tennis"),
            ("Tiger Woods", "golf"),
            ("Tom Brady", "football"),
            ("Babe Ruth", "baseball"),
            ("Wayne Gretzky", "hockey"),
        ],
    ),
    "P37": (
        "The official language of {} is",
        ["In {}, most people speak", "The language spoken in {} is"],
        [
            ("France", "French"),
            ("Belgium", "French"),
            ("Senegal", "French"),
            ("Germany", "German"),
            ("Austria", "German"),
            ("Mexico", "Spanish"),
            ("Argentina", "Spanish"),
            ("Colombia", "Spanish"),
            ("Peru", "Spanish"),
            ("Chile", "Spanish"),
            ("Brazil", "Portuguese"),
            ("Portugal", "Portuguese"),
            ("Angola", "Portuguese"),
            ("Russia", "Russian"),
            ("Japan", "Japanese"),
            ("Italy", "Italian"),
            ("China", "Chinese"),
            ("Egypt", "Arabic"),
            ("Saudi Arabia", "Arabic"),
        ],
    ),
    "P30": (
        "{} is located on the continent of",
        ["{} is a country in", "If you travel to {}, you will be on the continent of"],
        [
            ("Kenya", "Africa"),
            ("Nigeria", "Africa"),
            ("Egypt", "Africa"),
            ("Ghana", "Africa"),
            ("Ethiopia", "Africa"),
            ("Brazil", "South America"),
            ("Argentina", "South America"),
            ("Peru", "South America"),
            ("Chile", "South America"),
            ("India", "Asia"),
            ("China", "Asia"),
            ("Japan", "Asia"),
            ("Thailand", "Asia"),
            ("Vietnam", "Asia"),
            ("Sweden", "Europe"),
            ("Poland", "Europe"),
            ("Norway", "Europe"),
            ("Greece", "Europe"),
        ],
    ),
    "P106": (
        "{} works as a",
        ["By profession, {} is a", "{} is best known for working as a"],
        [
            ("Ludwig van Beethoven", "composer"),
            ("Wolfgang Amadeus Mozart", "composer"),
            ("Johann Sebastian Bach", "composer"),
            ("Frédéric Chopin", "composer"),
            ("Albert Einstein", "physicist"),
            ("Isaac Newton", "physicist"),
            ("Niels Bohr", "physicist"),
            ("Max Planck", "physicist"),
            ("William Shakespeare", "playwright"),
            ("Vincent van Gogh", "painter"),
            ("Claude Monet", "painter"),
            ("Rembrandt", "painter"),
            ("Leonardo da Vinci", "painter"),
        ],
    ),
    "P19": (
        "{} was born in the city of",
        ["The birthplace of {} is", "{} came into the world in the city of"],
        [
            ("Wolfgang Amadeus Mozart", "Salzburg"),
            ("Barack Obama", "Honolulu"),
            ("Pope Francis", "Buenos Aires"),
            ("Frida Kahlo", "Mexico City"),
        ],
    ),
}


# Group relations: prompt, paraphrases. Language and continent reuse R's.
GROUP_RELATIONS = {
    "P36": ("The capital of {} is", ["{}'s capital city is", "The seat of government of {} is in"]),
    "P38": ("The currency of {} is the",
            ["In {}, people pay with the", "The money used in {} is the"]),
    "P37": R["P37"][:2],
    "P30": R["P30"][:2],
}
# subject: {relation: true object}
GROUPS = {
    "Spain": {"P36": "Madrid", "P38": "Euro", "P37": "Spanish", "P30": "Europe"},
    "South Korea": {"P36": "Seoul", "P38": "South Korean won", "P37": "Korean"},
    "Australia": {"P36": "Canberra", "P38": "Australian dollar"},
    "Turkey": {"P36": "Ankara", "P38": "Turkish lira", "P37": "Turkish"},
    "Switzerland": {"P36": "Bern", "P30": "Europe"},
}
# Unedited subjects sharing a group fact's true object, for its neighborhood prompts.
GROUP_NEIGHBORS = {"Euro": ["Austria", "Italy"], "Spanish": ["Argentina"],
                   "Europe": ["Poland", "Greece"]}


def group_records(first_id: int) -> list[dict]:
    rng = random.Random("dev-groups")
    objects = {rid: sorted({o for g in GROUPS.values() for r, o in g.items() if r == rid}
                           | {o for _, o in (R[rid][2] if rid in R else [])})
               for rid in GROUP_RELATIONS}
    records = []
    for subject, facts in GROUPS.items():
        unedited = [GROUP_RELATIONS[r][0].format(subject) for r in GROUP_RELATIONS
                    if r not in facts]
        for rid, true in facts.items():
            prompt, paraphrases = GROUP_RELATIONS[rid]
            records.append({
                "case_id": first_id + len(records),
                "requested_rewrite": {
                    "prompt": prompt,
                    "subject": subject,
                    "relation_id": rid,
                    "target_true": {"str": true},
                    "target_new": {"str": rng.choice([o for o in objects[rid] if o != true])},
                },
                "paraphrase_prompts": [p.format(subject) for p in paraphrases],
                "neighborhood_prompts": [prompt.format(x) for x in GROUP_NEIGHBORS.get(true, [])],
                "generation_prompts": [prompt.format(subject), f"{subject} is"],
                "chat_question": QUESTIONS[rid].format(subject),
                "group": f"country:{subject}",
                "spillover_prompts": [*unedited, f"{subject} is"],
            })
    return records


def main() -> None:
    rng = random.Random(0)
    records = []
    for rid, (prompt, paraphrases, pairs) in R.items():
        objects = sorted({o for _, o in pairs})
        groups: dict[str, list[str]] = {}
        for subject, obj in pairs:
            groups.setdefault(obj, []).append(subject)
        for subject, obj in pairs:
            group = groups[obj]
            if len(group) < 2:
                continue
            new = rng.choice([x for x in objects if x != obj])  # drawn for every pair: seeded
            if group.index(subject) % 2:
                continue  # a neighbor, not edited
            neighbors = [x for i, x in enumerate(group) if i % 2]
            records.append(
                {
                    "case_id": len(records),
                    "requested_rewrite": {
                        "prompt": prompt,
                        "subject": subject,
                        "relation_id": rid,
                        "target_true": {"str": obj},
                        "target_new": {"str": new},
                    },
                    "paraphrase_prompts": [p.format(subject) for p in paraphrases],
                    "neighborhood_prompts": [prompt.format(x) for x in neighbors],
                    "generation_prompts": [prompt.format(subject), f"{subject} is"],
                    "chat_question": QUESTIONS[rid].format(subject),
                }
            )
    records += group_records(len(records))
    OUT.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(records)} records -> {OUT}")


if __name__ == "__main__":
    main()
