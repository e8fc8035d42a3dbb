"""Writes tests/data/corpus.txt: English-like prose generated from a small hand-written grammar
(short village tales: characters, places, weather, trades, dialogue), for the accuracy tests
(a character-level language model is trained on it and its held-out perplexity measured).
Everything here, words and templates, was written for lutflash; the output is deterministic.

    python scripts/make_corpus.py            # about 300 KB
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

NAMES = ["Ada", "Bram", "Cora", "Dov", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
         "Lev", "Mira", "Nils", "Odile", "Pavel", "Quinn", "Rosa", "Sami", "Tilde", "Ulrich",
         "Vera", "Wim", "Yara", "Zeno"]
TRADES = {"baker": ("bread", "oven", "flour"), "smith": ("nails", "forge", "iron"),
          "weaver": ("cloth", "loom", "wool"), "miller": ("meal", "mill", "grain"),
          "fisher": ("fish", "boat", "nets"), "potter": ("jars", "wheel", "clay"),
          "carpenter": ("chairs", "bench", "timber"), "shepherd": ("lambs", "fold", "sheep"),
          "gardener": ("beans", "garden", "seeds"), "teacher": ("lessons", "school", "chalk")}
PLACES = ["the market", "the river", "the old bridge", "the hill", "the harbour", "the square",
          "the forest", "the chapel", "the orchard", "the well", "the meadow", "the inn"]
WEATHER = ["the rain fell softly", "a cold wind came down from the hills", "the sun was warm",
           "fog lay over the fields", "snow covered the roofs", "the sky was clear and pale",
           "thunder rolled far away", "the air smelled of apples"]
TIMES = ["In the morning", "At noon", "Late in the evening", "Before dawn", "On market day",
         "After the harvest", "In the middle of winter", "One spring day", "That night",
         "Some days later"]
ADJ = ["small", "old", "quiet", "bright", "heavy", "careful", "tired", "cheerful", "patient",
       "stubborn", "clever", "young", "gentle", "proud", "honest"]
FEELINGS = ["glad", "worried", "surprised", "angry", "calm", "curious", "afraid", "hopeful",
            "sad", "amused"]
ANIMALS = ["a grey cat", "a lame dog", "an old goat", "a pair of geese", "a red fox", "a donkey",
           "a crow", "a young horse"]
OBJECTS = ["a letter", "a lantern", "a basket of eggs", "a silver coin", "a broken key",
           "a map", "a blue scarf", "a jar of honey", "a wooden box", "a rope"]
VERBS_PAST = ["carried", "found", "lost", "mended", "sold", "bought", "hid", "opened",
              "painted", "counted"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "ten", "twelve", "twenty"]


class Teller:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.people = {name: rng.choice(list(TRADES)) for name in NAMES}

    def pick(self, seq):
        return self.rng.choice(seq)

    def person(self):
        name = self.pick(NAMES)
        return name, self.people[name]

    def pronoun(self, name):
        return "she" if name[-1] in "aeiu" else "he"

    def sentence(self, hero, other) -> str:
        name, trade = hero
        oname, otrade = other
        thing, shop, stuff = TRADES[trade]
        he, she = self.pronoun(name), self.pronoun(oname)
        forms = [
            lambda: f"{self.pick(TIMES)}, {name} the {trade} walked to {self.pick(PLACES)}.",
            lambda: f"{self.pick(WEATHER).capitalize()}, and {name} stayed by the {shop}.",
            lambda: f"{name} {self.pick(VERBS_PAST)} {self.pick(OBJECTS)} near {self.pick(PLACES)}.",
            lambda: f"{he.capitalize()} had made {self.pick(NUMBERS)} {thing} from the {stuff}.",
            lambda: f"{oname} the {otrade} asked, \"Where did you get the {stuff}, {name}?\"",
            lambda: f"\"From {self.pick(PLACES)},\" said {name}, \"where {self.pick(WEATHER)}.\"",
            lambda: f"{name} was {self.pick(FEELINGS)}, because {oname} had {self.pick(VERBS_PAST)} "
                    f"{self.pick(OBJECTS)}.",
            lambda: f"The {self.pick(ADJ)} {trade} saw {self.pick(ANIMALS)} by {self.pick(PLACES)}.",
            lambda: f"{oname} and {name} shared a meal of {self.pick(['bread', 'soup', 'fish', 'beans'])} "
                    f"and {self.pick(['cheese', 'apples', 'tea', 'milk'])}.",
            lambda: f"\"I will sell you {self.pick(NUMBERS)} {thing} for {self.pick(OBJECTS)},\" "
                    f"{he} told {oname}.",
            lambda: f"{she.capitalize()} laughed and said that the {otrade} of {self.pick(PLACES)} "
                    f"was more {self.pick(ADJ)} than any {trade}.",
            lambda: f"When {self.pick(WEATHER)}, the {otrade} closed the door and counted "
                    f"{self.pick(NUMBERS)} coins.",
            lambda: f"Nobody in the village knew why {name} was so {self.pick(ADJ)} that year.",
            lambda: f"{name} thought about {self.pick(OBJECTS)} for a long time, and then "
                    f"{he} went back to the {shop}.",
        ]
        return self.pick(forms)()

    def tale(self) -> str:
        hero, other = self.person(), self.person()
        while other[0] == hero[0]:
            other = self.person()
        name, trade = hero
        title = f"The {self.pick(ADJ).capitalize()} {trade.capitalize()}"
        paragraphs = []
        for _ in range(self.rng.randint(2, 4)):
            count = self.rng.randint(3, 7)
            paragraphs.append(" ".join(self.sentence(hero, other) for _ in range(count)))
        ending = self.pick([
            f"And so {name} lived on by {self.pick(PLACES)}, {self.pick(FEELINGS)} and "
            f"{self.pick(ADJ)}.",
            f"The village still tells how {name} the {trade} {self.pick(VERBS_PAST)} "
            f"{self.pick(OBJECTS)}.",
            f"From that day on, {other[0]} never asked about the {TRADES[trade][2]} again."])
        paragraphs.append(ending)
        return title + "\n\n" + "\n\n".join(paragraphs) + "\n\n"


def generate(size: int, seed: int = 2026) -> str:
    teller = Teller(random.Random(seed))
    parts, total = [], 0
    while total < size:
        tale = teller.tale()
        parts.append(tale)
        total += len(tale)
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=300_000, help="characters, at least")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"
                                             / "corpus.txt"))
    args = parser.parse_args()
    text = generate(args.size, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="ascii")
    print(f"{args.out}: {len(text)} characters")


if __name__ == "__main__":
    main()
