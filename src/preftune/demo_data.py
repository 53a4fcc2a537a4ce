"""A small, self-made preference data set for `preftune demo` (no downloads).

The preference is about FORMAT, so a rule can judge it:

- chosen:   the reply is a one-line JSON object, e.g. ``{"answer": "Paris"}``
- rejected: the same (correct) fact in ordinary prose, e.g. ``"The capital of France is Paris."``

The prompts never ask for JSON, so a base chat model practically never answers that way by itself,
while a few minutes of DPO + LoRA on CPU is enough to teach a 135M model the habit. The
``json_answer`` rule judge (see `preftune.evaluation.judges`) then shows the pass rate going from
~0% to most of the held-out prompts.

Prompts are built from small embedded fact tables (capitals, chemical symbols, arithmetic, opposites,
plurals, animal sounds, colors, days and months, everyday counts) with several phrasings each.
Train and test hold out different *facts*, not just different phrasings of the same fact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# The rule judge spec that scores this data set (see `preftune.evaluation.judges.get_rule_judge`).
DEMO_JUDGE_SPEC = "json_answer"

# -----------------------------------------------------------------------------
# fact tables

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Greece": "Athens", "Turkey": "Ankara", "Poland": "Warsaw", "Sweden": "Stockholm",
    "Norway": "Oslo", "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "the Czech Republic": "Prague",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Australia": "Canberra",
    "New Zealand": "Wellington", "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Indonesia": "Jakarta", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota", "Cuba": "Havana",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Iran": "Tehran", "Saudi Arabia": "Riyadh",
    "the United Kingdom": "London", "Scotland": "Edinburgh",
}  # fmt: skip

ELEMENTS = {
    "hydrogen": "H", "helium": "He", "lithium": "Li", "carbon": "C", "nitrogen": "N", "oxygen": "O",
    "fluorine": "F", "neon": "Ne", "sodium": "Na", "magnesium": "Mg", "aluminum": "Al", "silicon": "Si",
    "phosphorus": "P", "sulfur": "S", "chlorine": "Cl", "argon": "Ar", "potassium": "K", "calcium": "Ca",
    "iron": "Fe", "nickel": "Ni", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "tin": "Sn",
    "iodine": "I", "gold": "Au", "mercury": "Hg", "lead": "Pb", "uranium": "U",
}  # fmt: skip

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "open": "closed",
    "early": "late", "full": "empty", "hard": "soft", "wet": "dry", "tall": "short", "rich": "poor",
    "strong": "weak", "loud": "quiet", "thick": "thin", "heavy": "light", "clean": "dirty",
    "first": "last", "inside": "outside", "left": "right", "push": "pull", "win": "lose", "buy": "sell",
    "above": "below", "day": "night", "black": "white", "north": "south", "east": "west",
    "true": "false", "before": "after", "love": "hate", "young": "old", "cheap": "expensive",
    "remember": "forget", "arrive": "leave", "never": "always",
}  # fmt: skip

PLURALS = {
    "child": "children", "mouse": "mice", "goose": "geese", "man": "men", "woman": "women",
    "tooth": "teeth", "foot": "feet", "person": "people", "ox": "oxen", "cactus": "cacti",
    "leaf": "leaves", "knife": "knives", "wolf": "wolves", "half": "halves", "box": "boxes",
    "city": "cities", "baby": "babies", "bus": "buses", "fish": "fish", "sheep": "sheep",
    "deer": "deer", "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "wife": "wives",
    "life": "lives", "church": "churches", "glass": "glasses", "country": "countries", "louse": "lice",
}  # fmt: skip

ANIMAL_SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "sheep": "baa", "duck": "quack", "pig": "oink",
    "horse": "neigh", "lion": "roar", "owl": "hoot", "snake": "hiss", "bee": "buzz", "frog": "croak",
    "donkey": "hee-haw", "rooster": "cock-a-doodle-doo", "mouse": "squeak", "chicken": "cluck",
    "crow": "caw", "turkey": "gobble",
}  # fmt: skip

# thing (with article) -> color
COLORS = {
    "a ripe banana": "yellow", "fresh grass": "green", "a clear daytime sky": "blue", "fresh snow": "white",
    "coal": "black", "a ripe tomato": "red", "a carrot": "orange", "a ripe lemon": "yellow",
    "a flamingo": "pink", "milk": "white", "a crow": "black", "a lime": "green", "blood": "red",
    "milk chocolate": "brown", "an eggplant": "purple", "a polar bear's fur": "white",
    "a ripe strawberry": "red", "a school bus in the United States": "yellow", "charcoal": "black",
    "a pine tree's needles": "green", "a pumpkin": "orange",
}  # fmt: skip

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip

# question (without the "How many") -> number
COUNTS = {
    "days are in a week": "7", "hours are in a day": "24", "minutes are in an hour": "60",
    "seconds are in a minute": "60", "months are in a year": "12", "days are in a leap year": "366",
    "days are in a non-leap year": "365", "sides does a triangle have": "3", "sides does a square have": "4",
    "sides does a pentagon have": "5", "sides does a hexagon have": "6", "sides does an octagon have": "8",
    "legs does a spider have": "8", "legs does an insect have": "6", "legs does a dog have": "4",
    "legs does a chicken have": "2", "arms does an octopus have": "8", "continents are there": "7",
    "planets are in the solar system": "8", "cents are in a US dollar": "100",
    "centimeters are in a meter": "100", "grams are in a kilogram": "1000", "items are in a dozen": "12",
    "players does a soccer team have on the field": "11", "strings does a standard guitar have": "6",
    "wheels does a bicycle have": "2", "years are in a century": "100", "years are in a decade": "10",
}  # fmt: skip

# -----------------------------------------------------------------------------
# phrasings: prompt templates and prose (rejected) templates per category

PROMPTS = {
    "capital": ["What is the capital of {country}?", "What's the capital city of {country}?",
                "Which city is the capital of {country}?", "Name the capital of {country}.",
                "Tell me the capital of {country}."],
    "element": ["What is the chemical symbol for {element}?", "What's the symbol of the element {element}?",
                "Which chemical symbol does {element} have?", "Give the chemical symbol of {element}."],
    "add": ["What is {a} plus {b}?", "What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
            "What do you get when you add {a} and {b}?", "What is the sum of {a} and {b}?"],
    "sub": ["What is {a} minus {b}?", "What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.",
            "What do you get when you take {b} away from {a}?"],
    "mul": ["What is {a} times {b}?", "What is {a} x {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.",
            "What is the product of {a} and {b}?"],
    "opposite": ["What is the opposite of \"{word}\"?", "What's the opposite of {word}?",
                 "Give me the antonym of \"{word}\".", "Which word means the opposite of {word}?"],
    "plural": ["What is the plural of \"{word}\"?", "What's the plural form of {word}?",
               "How do you write more than one {word}?", "Give the plural of the word \"{word}\"."],
    "sound": ["What sound does a {animal} make?", "What noise does a {animal} make?",
              "How does a {animal} sound?", "Which sound is a {animal} known for?"],
    "color": ["What color is {thing}?", "What colour is {thing}?", "Which color is {thing} usually?",
              "Tell me the color of {thing}."],
    "day_after": ["What day comes after {day}?", "Which day of the week follows {day}?",
                  "If today is {day}, what day is tomorrow?"],
    "day_before": ["What day comes before {day}?", "Which day of the week comes right before {day}?",
                   "If today is {day}, what day was yesterday?"],
    "month_after": ["What month comes after {month}?", "Which month follows {month}?",
                    "What is the month after {month}?"],
    "month_before": ["What month comes before {month}?", "Which month comes right before {month}?",
                     "What is the month before {month}?"],
    "count": ["How many {what}?", "Do you know how many {what}?", "Quick question: how many {what}?"],
}  # fmt: skip

PROSE = {
    "capital": ["The capital of {country} is {answer}.", "{answer} is the capital of {country}.",
                "The capital city of {country} is {answer}.", "That would be {answer}.",
                "It's {answer}, the capital city of {country}."],
    "element": ["The chemical symbol for {element} is {answer}.", "{element} has the symbol {answer}.",
                "Its symbol is {answer}.", "On the periodic table, {element} is written as {answer}."],
    "add": ["{a} plus {b} equals {answer}.", "The sum is {answer}.", "Adding {a} and {b} gives {answer}.",
            "That comes out to {answer}."],
    "sub": ["{a} minus {b} equals {answer}.", "The difference is {answer}.",
            "Subtracting {b} from {a} leaves {answer}.", "That comes out to {answer}."],
    "mul": ["{a} times {b} equals {answer}.", "The product is {answer}.",
            "Multiplying {a} by {b} gives {answer}.", "That comes out to {answer}."],
    "opposite": ["The opposite of \"{word}\" is \"{answer}\".", "The antonym of {word} is {answer}.",
                 "The word you are looking for is \"{answer}\".", "{answer} is the opposite of {word}."],
    "plural": ["The plural of \"{word}\" is \"{answer}\".", "More than one {word} are called {answer}.",
               "The plural form is \"{answer}\".", "You would say \"{answer}\"."],
    "sound": ["A {animal} makes a \"{answer}\" sound.", "A {animal} goes \"{answer}\".",
              "The typical sound of a {animal} is \"{answer}\".", "It says \"{answer}\"."],
    "color": ["{thing} is {answer}.", "The color of {thing} is {answer}.", "It is usually {answer}.",
              "Typically, {thing} is {answer}."],
    "day_after": ["The day after {day} is {answer}.", "{answer} comes after {day}.",
                  "After {day} comes {answer}."],
    "day_before": ["The day before {day} is {answer}.", "{answer} comes before {day}.",
                   "Right before {day} is {answer}."],
    "month_after": ["The month after {month} is {answer}.", "{answer} comes after {month}.",
                    "After {month} comes {answer}."],
    "month_before": ["The month before {month} is {answer}.", "{answer} comes before {month}.",
                     "Right before {month} comes {answer}."],
    "count": ["The number you are looking for is {answer}.", "The answer is {answer}.", "The number is {answer}.",
              "It's {answer}."],
}  # fmt: skip

# optional second sentences that make the prose replies a little more chatty and varied
PROSE_EXTRAS = ["I hope that helps!", "Let me know if you have any other questions.",
                "Happy to help with more questions like this.", "Feel free to ask me anything else.",
                "That is a common question.", "Good question!"]  # fmt: skip


@dataclass(frozen=True)
class Fact:
    """One fact: a category (which picks the phrasings), template fields and the short answer."""

    category: str
    fields: tuple[tuple[str, str], ...]
    answer: str


def _fact(category: str, answer: str | int, **fields: str | int) -> Fact:
    return Fact(category, tuple((k, str(v)) for k, v in fields.items()), str(answer))


def all_facts() -> dict[str, list[Fact]]:
    """Every fact the demo data can use, grouped by topic (each fact appears once)."""
    n = len(DAYS)
    m = len(MONTHS)
    return {
        "capital": [_fact("capital", a, country=c) for c, a in CAPITALS.items()],
        "element": [_fact("element", s, element=e) for e, s in ELEMENTS.items()],
        "opposite": [_fact("opposite", a, word=w) for w, a in OPPOSITES.items()],
        "plural": [_fact("plural", p, word=w) for w, p in PLURALS.items()],
        "sound": [_fact("sound", s, animal=a) for a, s in ANIMAL_SOUNDS.items()],
        "color": [_fact("color", c, thing=t) for t, c in COLORS.items()],
        "count": [_fact("count", k, what=w) for w, k in COUNTS.items()],
        # both directions of an unordered pair count as one fact, so we only keep a <= b
        "add": [_fact("add", a + b, a=a, b=b) for a in range(1, 21) for b in range(a, 21)],
        "sub": [_fact("sub", a - b, a=a, b=b) for a in range(5, 31) for b in range(1, a)],
        "mul": [_fact("mul", a * b, a=a, b=b) for a in range(2, 13) for b in range(a, 13)],
        "day": [_fact("day_after", DAYS[(i + 1) % n], day=d) for i, d in enumerate(DAYS)]
        + [_fact("day_before", DAYS[(i - 1) % n], day=d) for i, d in enumerate(DAYS)],
        "month": [_fact("month_after", MONTHS[(i + 1) % m], month=mo) for i, mo in enumerate(MONTHS)]
        + [_fact("month_before", MONTHS[(i - 1) % m], month=mo) for i, mo in enumerate(MONTHS)],
    }


# -----------------------------------------------------------------------------
# rendering a fact into a preference pair


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def chosen_reply(answer: str) -> str:
    """The preferred reply: a one-line JSON object with the answer."""
    return json.dumps({"answer": answer})


def _render(fact: Fact, rng: random.Random) -> dict:
    fields = dict(fact.fields)
    prompt = rng.choice(PROMPTS[fact.category]).format(**fields)
    prose = _capitalize(rng.choice(PROSE[fact.category]).format(answer=fact.answer, **fields))
    if rng.random() < 0.4:
        prose += " " + rng.choice(PROSE_EXTRAS)
    return {"prompt": prompt, "chosen": chosen_reply(fact.answer), "rejected": prose}


def _interleave(groups: list[list[Fact]]) -> list[Fact]:
    """Round-robin over the topics so any prefix of the result mixes all of them."""
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out.extend(g[i] for g in groups if i < len(g))
        i += 1
    return out


def make_demo_pairs(n_train: int = 256, n_test: int = 64, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Build (train, test) preference rows ``{"prompt", "chosen", "rejected"}``.

    Facts are shuffled within each topic and dealt round-robin across topics, and every
    ``(n_train + n_test) / n_test``-th fact goes to the test split, so both splits mix all topics.
    A fact lands in exactly one split, so no test prompt (nor its fact) is seen in training.
    The result is deterministic for a given seed.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    rng = random.Random(seed)
    groups = []
    for facts in all_facts().values():
        facts = list(facts)
        rng.shuffle(facts)
        groups.append(facts)
    pool = _interleave(groups)
    total = n_train + n_test
    if total > len(pool):
        raise ValueError(f"asked for {total} pairs but the demo tables only hold {len(pool)} distinct facts")

    train, test = [], []
    for i, fact in enumerate(pool[:total]):
        # evenly spaced test picks: exactly n_test of the first `total` positions
        is_test = (i + 1) * n_test // total > i * n_test // total
        (test if is_test else train).append(_render(fact, rng))
    return train, test


def write_demo_dataset(folder: str | Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``test.jsonl`` demo pairs into `folder` (created if needed); return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, test = make_demo_pairs(n_train, n_test, seed)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(folder / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return folder
