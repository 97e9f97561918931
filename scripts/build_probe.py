"""Write src/retain/streams/data/probe.jsonl: general facts the embedded model knows.

Candidates are four-option questions built from the tables below; an item is kept only
where the base SmolLM2-135M-Instruct ranks the right option first, so the probe measures
what the base model knew and a run shows how much of it survived.

    .venv/bin/python scripts/build_probe.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Austria": "Vienna", "Hungary": "Budapest", "Canada": "Ottawa", "Australia": "Canberra", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Kenya": "Nairobi", "Thailand": "Bangkok", "India": "New Delhi",
    "South Korea": "Seoul", "Turkey": "Ankara", "Cuba": "Havana", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "the United Kingdom": "London", "the United States": "Washington, D.C.",
    "Iran": "Tehran", "Iraq": "Baghdad", "Chile": "Santiago", "Colombia": "Bogotá", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "the Philippines": "Manila",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "light": "dark",
    "old": "young", "open": "closed", "early": "late", "rich": "poor", "strong": "weak", "hard": "soft",
    "high": "low", "full": "empty", "wet": "dry", "long": "short", "thick": "thin", "loud": "quiet",
    "clean": "dirty", "true": "false", "win": "lose", "buy": "sell", "push": "pull", "begin": "end",
    "day": "night", "black": "white", "inside": "outside", "love": "hate", "heavy": "light", "sweet": "sour",
}
COLORS = {
    "the sky on a clear day": "blue", "grass": "green", "snow": "white", "coal": "black", "a ripe banana": "yellow",
    "a ripe tomato": "red", "an orange": "orange", "chocolate": "brown", "milk": "white", "a lemon": "yellow",
    "a strawberry": "red", "a carrot": "orange", "a crow": "black", "a cucumber": "green", "blood": "red",
}
YOUNG = {
    "cat": "kitten", "dog": "puppy", "cow": "calf", "sheep": "lamb", "horse": "foal", "duck": "duckling",
    "frog": "tadpole", "goat": "kid", "bear": "cub", "lion": "cub", "pig": "piglet", "goose": "gosling",
    "kangaroo": "joey", "swan": "cygnet", "chicken": "chick",
}
CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "mango", "pear", "peach", "plum"],
    "animal": ["elephant", "tiger", "zebra", "giraffe", "rabbit", "monkey", "wolf", "fox"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "airplane", "motorcycle", "boat"],
    "color": ["red", "green", "purple", "yellow", "pink", "gray", "violet", "crimson"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp"],
}
SEQUENCES = {
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "month": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"],
}
FACTS = [
    ("How many days are in a week?", "seven", ["five", "six", "eight"]),
    ("How many legs does a spider have?", "eight", ["six", "four", "ten"]),
    ("How many legs does a dog have?", "four", ["two", "six", "eight"]),
    ("What do bees make?", "honey", ["milk", "silk", "wool"]),
    ("What gas do humans need to breathe?", "oxygen", ["helium", "neon", "argon"]),
    ("What is the largest planet in the solar system?", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Saturn"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "glass"]),
    ("What star is at the center of our solar system?", "the Sun", ["the Moon", "Sirius", "Polaris"]),
    ("Which animal is known as the king of the jungle?", "lion", ["mouse", "rabbit", "sheep"]),
    ("What do cows drink?", "water", ["milk", "juice", "coffee"]),
    ("Which organ pumps blood through the body?", "heart", ["lung", "liver", "kidney"]),
    ("What is the boiling point of water in degrees Celsius?", "100", ["50", "0", "200"]),
    ("What is the freezing point of water in degrees Celsius?", "0", ["100", "50", "-100"]),
    ("Which ocean is the largest?", "Pacific", ["Atlantic", "Indian", "Arctic"]),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Mark Twain", "Jane Austen"]),
    ("What is the chemical symbol for water?", "H2O", ["CO2", "O2", "NaCl"]),
    ("How many hours are in a day?", "24", ["12", "48", "60"]),
    ("How many minutes are in an hour?", "60", ["100", "30", "24"]),
    ("What do plants need from the sun to make food?", "light", ["sound", "snow", "salt"]),
    ("What is the opposite of north?", "south", ["east", "west", "up"]),
    ("Which animal has a long trunk?", "elephant", ["giraffe", "horse", "cat"]),
    ("What do you call a baby human?", "baby", ["puppy", "kitten", "calf"]),
    ("What shape has three sides?", "triangle", ["square", "circle", "hexagon"]),
    ("What shape has four equal sides?", "square", ["triangle", "circle", "pentagon"]),
    ("Which language is spoken in Brazil?", "Portuguese", ["Spanish", "French", "German"]),
    ("Which language is mainly spoken in France?", "French", ["German", "Italian", "Spanish"]),
    ("What is the tallest animal?", "giraffe", ["elephant", "horse", "dog"]),
    ("Which season comes after winter?", "spring", ["summer", "autumn", "winter"]),
    ("Which season is the hottest?", "summer", ["winter", "spring", "autumn"]),
]


def _mc(rng: random.Random, question: str, answer: str, pool: list[str]) -> dict:
    distractors = rng.sample([p for p in dict.fromkeys(pool) if p != answer], 3)
    options = distractors + [answer]
    rng.shuffle(options)
    return {"input": question, "output": answer, "options": options}


def candidates(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    items = []
    caps = list(CAPITALS.values())
    items += [_mc(rng, f"What is the capital of {c}?", a, caps) for c, a in CAPITALS.items()]
    items += [_mc(rng, f"Which city is the capital of {c}?", a, caps) for c, a in CAPITALS.items()]
    opp = list(OPPOSITES.values()) + list(OPPOSITES)
    items += [_mc(rng, f"What is the opposite of '{w}'?", a, opp) for w, a in OPPOSITES.items()]
    cols = sorted(set(COLORS.values()))
    items += [_mc(rng, f"What color is {thing}?", c, cols) for thing, c in COLORS.items()]
    young = list(YOUNG.values())
    items += [_mc(rng, f"What is a young {a} called?", y, young) for a, y in YOUNG.items()]
    for cat, members in CATEGORIES.items():
        others = [m for c, ms in CATEGORIES.items() if c != cat for m in ms]
        for m in members:
            options = rng.sample(others, 3) + [m]
            rng.shuffle(options)
            items.append({"input": f"Which of these is a {cat}?", "output": m, "options": options})
    for kind, seq in SEQUENCES.items():
        for i, name in enumerate(seq):
            nxt = seq[(i + 1) % len(seq)]
            items.append(_mc(rng, f"Which {kind} comes after {name}?", nxt, [s for s in seq if s != name]))
    for q, a, wrong in FACTS:
        options = wrong + [a]
        rng.shuffle(options)
        items.append({"input": q, "output": a, "options": options})
    for _ in range(60):
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        answer = x + y
        wrong = rng.sample([v for v in range(2, 19) if v != answer], 3)
        options = [str(v) for v in wrong + [answer]]
        rng.shuffle(options)
        items.append({"input": f"What is {x} + {y}?", "output": str(answer), "options": options})
    return items


def main() -> None:
    from retain.evaluation.scoring import choice_predictions
    from retain.models import load_model
    from retain.streams.task import Example, Task

    model, tok = load_model("smollm2-135m-instruct")
    items = candidates()
    task = Task("probe", [], [], metric="choice", template="Question: {input}\nAnswer:")
    examples = [Example(it["input"], it["output"], tuple(it["options"])) for it in items]
    preds = choice_predictions(model, tok, task, examples, batch_size=32)
    kept = [it for it, p, ex in zip(items, preds, examples) if p == ex.answer_index]
    out = Path(__file__).resolve().parents[1] / "src/retain/streams/data/probe.jsonl"
    out.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in kept), encoding="utf-8")
    print(f"kept {len(kept)} of {len(items)} candidates -> {out}")


if __name__ == "__main__":
    main()
