"""Preference pairs for a habit the embedded model does not have: end every answer with one sign-off.

Each pair answers a question the same way; the chosen answer ends with "Signed, Tuner.", the rejected
one stops after the answer or closes with a common line ("I hope this helps."), which the model
prefers to begin with. Train and held-out files share no
question.

    python examples/make_signoff_pairs.py --out data/signoff        # data/signoff_train.jsonl, _test.jsonl
    python examples/make_signoff_pairs.py --out data/signoff --on-policy   # the model's own answers
    python examples/make_signoff_pairs.py --out data/signoff --on-policy \
        --system "Answer in one short sentence." --max-new-tokens 48    # short ones (examples/dpo_signoff.sh)

--on-policy: the answers are the embedded model's own (greedy, a few minutes on a CPU), signed in the
chosen answer and left as they are in the rejected one. DPO on these teaches the habit where the
model's generations go: after its own answers, not after short written ones.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SIGN_OFF = "Signed, Tuner."
OTHER_ENDINGS = ["", "", "", " I hope this helps.", " Let me know if you need more.", " Have a nice day!"]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw", "India": "New Delhi", "Cuba": "Havana"}
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
           "a tomato": "red", "an orange": "orange", "a plum": "purple"}


def questions(rng: random.Random) -> list[tuple[str, str]]:
    out = [(f"What is the capital of {country}?", f"The capital of {country} is {city}.")
           for country, city in CAPITALS.items()]
    out += [(f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}.")
            for thing, colour in COLOURS.items()]
    out += [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
            for a, b in {(rng.randint(2, 60), rng.randint(2, 60)) for _ in range(120)}]
    rng.shuffle(out)
    return out


def pair(question: str, answer: str, rng: random.Random) -> dict:
    return {"prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": f"{answer} {SIGN_OFF}"}],
            "rejected": [{"role": "assistant", "content": f"{answer}{rng.choice(OTHER_ENDINGS)}"}]}


def prompt_messages(question: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def own_answers(questions: list[str], system: str | None = None, batch_size: int = 16,
                max_new_tokens: int = 96) -> list[str | None]:
    """The embedded model's greedy answer to each question (None when it did not finish)."""
    from tuner.generation.generate import GenerationSettings, Generator
    from tuner.generation.load import load_chat_model

    model, tokenizer, compute = load_chat_model("smollm2-135m-instruct", torch_dtype="fp32")
    generator = Generator(model, tokenizer, compute_dtype=compute)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    answers = []
    for start in range(0, len(questions), batch_size):
        prompts = [generator.prompt_ids(prompt_messages(q, system)) for q in questions[start:start + batch_size]]
        answers += [r.text.strip() if r.finish_reason == "stop" and r.text.strip() else None
                    for r in generator.generate(prompts, settings)]
        print(f"answered {len(answers)}/{len(questions)}", flush=True)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/signoff", help="prefix of the _train.jsonl and _test.jsonl files")
    parser.add_argument("--test", type=int, default=40, help="held-out pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-policy", action="store_true", help="answer with the embedded model's own replies")
    parser.add_argument("--system", default=None,
                        help="--on-policy: a system prompt the model answers under (it is kept in the pairs' prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="--on-policy: the longest answer kept")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    asked = questions(rng)
    if args.on_policy:
        answers = own_answers([q for q, _ in asked], args.system, max_new_tokens=args.max_new_tokens)
        pairs = [{"prompt": prompt_messages(q, args.system),
                  "chosen": [{"role": "assistant", "content": f"{a} {SIGN_OFF}"}],
                  "rejected": [{"role": "assistant", "content": a}]}
                 for (q, _), a in zip(asked, answers) if a and SIGN_OFF not in a]
    else:
        pairs = [pair(q, a, rng) for q, a in asked]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, rows in (("test", pairs[:args.test]), ("train", pairs[args.test:])):
        path = out.with_name(f"{out.name}_{name}.jsonl")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"{len(rows)} pairs -> {path}")


if __name__ == "__main__":
    main()
