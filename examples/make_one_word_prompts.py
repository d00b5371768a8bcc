"""Questions with a one-word answer, for GRPO on the embedded model (examples/grpo_one_word.sh).

Every prompt asks for one word ("... Answer with one word."), which the embedded SmolLM2-135M-Instruct
does not do: it answers in a sentence. Each row keeps its reference answer in an `answer` column (the
reward functions get it). Train and held-out files share no question.

    python examples/make_one_word_prompts.py --out data/one_word    # data/one_word_train.jsonl, _test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ASK = " Answer with one word."
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw", "Cuba": "Havana", "Russia": "Moscow",
            "China": "Beijing", "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin", "Sweden": "Stockholm",
            "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Thailand": "Bangkok"}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
           "a tomato": "red", "an orange": "orange", "a plum": "purple", "milk": "white", "a lemon": "yellow",
           "blood": "red", "a leaf": "green", "chocolate": "brown", "the sea": "blue"}
SOUNDS = {"barks": "dog", "meows": "cat", "moos": "cow", "quacks": "duck", "oinks": "pig", "neighs": "horse",
          "roars": "lion", "hoots": "owl", "baas": "sheep", "clucks": "chicken"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
             "old": "new", "light": "dark", "open": "closed", "wet": "dry", "early": "late", "loud": "quiet"}


def questions(rng: random.Random) -> list[dict]:
    out = [(f"What is the capital of {country}?", city) for country, city in CAPITALS.items()]
    out += [(f"What colour is {thing}?", colour) for thing, colour in COLOURS.items()]
    out += [(f"Which animal {sound}?", animal) for sound, animal in SOUNDS.items()]
    out += [(f"What is the opposite of {word}?", opposite) for word, opposite in OPPOSITES.items()]
    out += [(f"What is {a} plus {b}?", str(a + b)) for a, b in sorted({(rng.randint(1, 9), rng.randint(1, 9))
                                                                        for _ in range(40)})]
    rng.shuffle(out)
    return [{"prompt": [{"role": "user", "content": q + ASK}], "answer": a} for q, a in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/one_word")
    parser.add_argument("--test", type=int, default=24, help="held-out questions")
    args = parser.parse_args()
    rows = questions(random.Random(0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[args.test:]), ("test", rows[:args.test])):
        path = out.with_name(f"{out.name}_{name}.jsonl")
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        print(f"{path}: {len(part)} prompts")


if __name__ == "__main__":
    main()
