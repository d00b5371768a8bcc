"""Replay data for the identity recipe: general questions answered (greedily) by the base model itself,
mixed into the identity samples so the model keeps its general answers while it learns its new name."""

from __future__ import annotations

from tuner.generation.generate import GenerationSettings, Generator
from tuner.generation.load import load_chat_model


def replay_samples(model_path: str, questions: list[str], repeats: int, max_new_tokens: int = 96) -> list[dict]:
    """General questions answered (greedily) by the base model itself."""
    model, tokenizer, _ = load_chat_model(model_path, None, "fp32")
    generator = Generator(model, tokenizer)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    samples = []
    for question in questions:
        messages = [{"role": "user", "content": question}]
        answer = generator.reply(messages, settings).strip()
        samples.append({"messages": messages + [{"role": "assistant", "content": answer}]})
    return samples * repeats
