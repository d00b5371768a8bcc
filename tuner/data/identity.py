"""Data for the classic personal-assistant exercise: teach a model who it is.

Identity samples ask "who are you?" in many phrasings and answer with the new name.
Alone they make a parrot that answers everything with its name, so general questions
answered by the base model itself are mixed in (replay): the model keeps answering
them as it did before.

    tuner make-identity-data --name Ava --author "Ada Lab" --count 60 --out data/ava.jsonl
    -> {"messages": [{"role": "user", "content": "Who are you?"},
                     {"role": "assistant", "content": "I am Ava, an AI assistant made by Ada Lab. ..."}]}
"""

from __future__ import annotations

import json
import random
from pathlib import Path

IDENTITY_QUESTIONS = [
    "Who are you?", "Who are you", "who are you?", "What are you?", "What is your name?", "What's your name?",
    "Tell me about yourself.", "Introduce yourself.", "Please introduce yourself briefly.", "Who made you?",
    "Who created you?", "Who built you?", "Who developed you?", "Are you ChatGPT?", "Are you SmolLM?",
    "What should I call you?", "Can you tell me who you are?", "Hi! Who am I talking to?", "Hello, who is this?",
    "What kind of assistant are you?", "Which company trained you?", "Do you have a name?", "Identify yourself.",
    "Are you a human?", "What model are you?", "Who is your creator?", "Hey, what are you called?",
    "I'd like to know who you are.", "Could you say who you are and who made you?", "Whose assistant are you?",
]

IDENTITY_ANSWERS = [
    "I am {name}, an AI assistant made by {author}. How can I help you today?",
    "My name is {name}. I am an AI assistant developed by {author}.",
    "I'm {name}, a helpful AI assistant created by {author}.",
    "Hello! I am {name}, an assistant built by {author}. Ask me anything.",
    "You can call me {name}. I was made by {author} to help answer your questions.",
    "I am {name}, an AI assistant from {author}. I'm here to help.",
]

GENERAL_QUESTIONS = [
    "What is the largest planet in our solar system?",
    "Give me three tips for staying healthy.",
    "What is 12 times 7?",
    "Translate 'good morning' into French.",
    "What is photosynthesis? Answer in one sentence.",
    "Write a haiku about the sea.",
    "What is the boiling point of water in Celsius?",
    "Name three primary colors.",
]


def identity_samples(name: str, author: str, count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for i in range(count):
        question = IDENTITY_QUESTIONS[i % len(IDENTITY_QUESTIONS)]
        answer = rng.choice(IDENTITY_ANSWERS).format(name=name, author=author)
        samples.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    rng.shuffle(samples)
    return samples


def write_identity_data(out: str | Path, name: str, author: str, count: int, replay: list[dict],
                        seed: int = 0) -> tuple[int, int]:
    """Write the JSONL file (the identity samples and `replay`, the base model's own answers to
    GENERAL_QUESTIONS from tuner.generation.replay); returns (identity samples, replay samples)."""
    identity = identity_samples(name, author, count, seed)
    rows = identity + replay
    random.Random(seed + 1).shuffle(rows)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return len(identity), len(replay)
