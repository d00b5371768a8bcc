"""`tuner mmbench`: accuracy of a LLaVA model on an MMBench-style multiple-choice file.

The file is MMBench's TSV: one row per question with columns `index`, `question`,
`A`..`D` (`E`.. optional, empty cells skipped), `answer` (a letter), `image` (base64),
and optionally `hint` and `category`. The prompt is LLaVA's:

    <image>
    {hint}
    {question}
    A. {A}
    B. {B}
    Answer with the option's letter from the given choices directly.

A reply counts as the option whose letter it starts with ("B", "B.", "(B)"), or else
whose text it contains (exactly one option's).
"""

from __future__ import annotations

import base64
import csv
import io
import re
import sys
from collections import defaultdict
from pathlib import Path

from tuner.errors import TunerError
from tuner.generation.generate import GenerationSettings, Generator

LETTERS = "ABCDEFGH"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def read_questions(path: str | Path) -> list[dict]:
    from PIL import Image

    csv.field_size_limit(sys.maxsize)  # images are long base64 cells
    questions = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f, delimiter="\t"), start=2):
            missing = [c for c in ("question", "answer", "image", "A", "B") if not row.get(c)]
            if missing:
                raise TunerError(f"{path}:{line}: column {missing[0]!r} is missing or empty")
            try:
                image = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
            except (ValueError, OSError) as e:
                raise TunerError(f"{path}:{line}: column 'image' is not a base64 image: {e}") from None
            options = {letter: row[letter] for letter in LETTERS if row.get(letter)}
            if row["answer"] not in options:
                raise TunerError(f"{path}:{line}: answer {row['answer']!r} is not one of the options "
                                 f"{', '.join(options)}")
            questions.append({"index": row.get("index", str(line)), "question": row["question"],
                              "hint": row.get("hint") or "", "options": options, "answer": row["answer"],
                              "category": row.get("category") or "all", "image": image})
    if not questions:
        raise TunerError(f"{path}: no questions")
    return questions


def prompt(question: dict) -> str:
    lines = [question["hint"]] if question["hint"] else []
    lines.append(question["question"])
    lines += [f"{letter}. {text}" for letter, text in question["options"].items()]
    return "\n".join(lines + [INSTRUCTION])


def choice_of(reply: str, options: dict[str, str]) -> str | None:
    match = re.match(r"\s*\(?([A-H])\b", reply)
    if match and match.group(1) in options:
        return match.group(1)
    found = [letter for letter, text in options.items() if text.lower() in reply.lower()]
    return found[0] if len(found) == 1 else None


def evaluate(generator: Generator, questions: list[dict], system: str | None = None) -> dict:
    """{'accuracy', 'by_category': {name: (right, total)}, 'replies': [...]}; greedy decoding."""
    settings = GenerationSettings(max_new_tokens=16, temperature=0.0)
    by_category: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    replies = []
    for q in questions:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": "<image>\n" + prompt(q), "images": [q["image"]]})
        reply = generator.reply(messages, settings)
        right = choice_of(reply, q["options"]) == q["answer"]
        by_category[q["category"]][0] += right
        by_category[q["category"]][1] += 1
        replies.append((q["index"], reply, right))
    right = sum(r for r, _ in by_category.values())
    return {"accuracy": right / len(questions), "by_category": dict(by_category), "replies": replies}


def run_mmbench(args) -> int:
    from tuner.generation.load import ModelOptions, generator_for

    generator = generator_for(ModelOptions.from_args(args), with_images=True)
    result = evaluate(generator, read_questions(args.data), args.system)
    for name, (right, total) in sorted(result["by_category"].items()):
        print(f"{name:<30} {right:>5} / {total:<5} {right / total:.1%}")
    total = len(result["replies"])
    print(f"{'accuracy':<30} {round(result['accuracy'] * total):>5} / {total:<5} {result['accuracy']:.1%}")
    return 0
