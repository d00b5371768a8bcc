"""Tool-call training data for a calculator agent, in the `openai` dataset format.

    python examples/make_calculator_data.py data/calculator.jsonl [--count 300]

Each row asks an arithmetic question; the assistant calls the `calculate` tool (the exact
spec `tuner chat --with-plugins calculate` puts in the prompt), the tool answers, and the
assistant replies with the result:

    {"tools": [<calculate spec>], "messages": [
      {"role": "user", "content": "What is 37 times 12?"},
      {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
        "function": {"name": "calculate", "arguments": {"expression": "37 * 12"}}}]},
      {"role": "tool", "content": "444"},
      {"role": "assistant", "content": "37 times 12 is 444."}]}

One row in six is small talk answered without a tool, so the model also learns when not to call it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tuner.chat.tools import TOOL_SPECS, calculate

OPERATIONS = [("times", "*"), ("plus", "+"), ("minus", "-"), ("multiplied by", "*"), ("divided by", "/")]
QUESTIONS = ["What is {a} {word} {b}?", "Calculate {a} {word} {b}.", "How much is {a} {word} {b}?",
             "Can you work out {a} {word} {b}?", "{a} {word} {b} = ?"]
SMALL_TALK = [("Hi!", "Hello! How can I help you today?"),
              ("Thank you.", "You're welcome!"),
              ("What can you do?", "I can answer questions and do exact arithmetic with my calculator tool."),
              ("Who are you?", "I am a helpful assistant with a calculator tool.")]


def rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 1 / 6:
            question, answer = rng.choice(SMALL_TALK)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        else:
            word, symbol = rng.choice(OPERATIONS)
            a, b = rng.randint(2, 999), rng.randint(2, 99)
            if symbol == "/":
                a = b * rng.randint(2, 99)  # whole results read better
            expression = f"{a} {symbol} {b}"
            result = calculate(expression)
            messages = [
                {"role": "user", "content": rng.choice(QUESTIONS).format(a=a, word=word, b=b)},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "calculate", "arguments": {"expression": expression}}}]},
                {"role": "tool", "content": result},
                {"role": "assistant", "content": f"{a} {word} {b} is {result}."}]
        out.append({"tools": [TOOL_SPECS["calculate"]], "messages": messages})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rows(args.count, args.seed)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    print(f"Wrote {len(data)} rows to {path}")


if __name__ == "__main__":
    main()
