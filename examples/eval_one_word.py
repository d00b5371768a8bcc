"""Greedy answers of the embedded model (optionally with an adapter) to the held-out one-word questions:
how many are one word, and how many are the reference answer. Prints one line per question and the counts.

    python examples/eval_one_word.py data/one_word_test.jsonl [--adapter ./adapter]
"""

from __future__ import annotations

import argparse
import json
import re


def one_word_rate(test_file: str, adapter: str | None = None, show: bool = True) -> tuple[int, int, int]:
    """(one-word answers, correct answers, questions)."""
    from tuner.generation.generate import GenerationSettings, Generator
    from tuner.generation.load import load_chat_model

    model, tokenizer, _ = load_chat_model("smollm2-135m-instruct", adapter=adapter, torch_dtype="fp32")
    generator = Generator(model, tokenizer)
    rows = [json.loads(line) for line in open(test_file, encoding="utf-8")]
    prompts = [generator.prompt_ids(row["prompt"]) for row in rows]
    replies = generator.generate(prompts, GenerationSettings(max_new_tokens=16))
    one = correct = 0
    for row, reply in zip(rows, replies):
        words = re.findall(r"\w+", reply.text.lower())
        one += len(words) == 1
        correct += words[:1] == [row["answer"].lower()]
        if show:
            print(f"{row['prompt'][-1]['content']!r} -> {reply.text!r}")
    return one, correct, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("test_file")
    parser.add_argument("--adapter")
    args = parser.parse_args()
    one, correct, total = one_word_rate(args.test_file, args.adapter)
    print(f"one-word answers: {one} of {total}; the reference answer: {correct} of {total}")


if __name__ == "__main__":
    main()
