"""One generation core for chat, the evaluate-chat hook and later the server.

It renders the conversation with the same template code as training, generates with
transformers' `generate`, streams text pieces to a callback, and stops at the
template's stop words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tuner.data.templates import get_template
from tuner.engine.device import autocast


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy decoding"""
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    seed: int | None = None


class _CallbackStreamer:
    """Receives token ids from `generate` and passes on only new, complete text."""

    def __init__(self, tokenizer, prompt_length: int, on_text: Callable[[str], None], stop_words: tuple[str, ...]):
        self.tokenizer, self.on_text, self.stop_words = tokenizer, on_text, stop_words
        self.prompt_length, self.ids, self.sent = prompt_length, [], 0
        self.skipped_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.skipped_prompt:  # generate first hands over the prompt itself
            self.skipped_prompt = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.visible_text()
        # Hold back a piece that may be the start of a stop word or half of a multi-byte character.
        safe = len(text) - max((len(w) for w in self.stop_words), default=0)
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe > self.sent:
            self.on_text(text[self.sent:safe])
            self.sent = safe

    def end(self) -> None:
        text = self.visible_text()
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)

    def visible_text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        return cut_at_stop_words(text, self.stop_words)


def cut_at_stop_words(text: str, stop_words) -> str:
    cut = min((text.find(w) for w in stop_words if w and w in text), default=-1)
    return text if cut < 0 else text[:cut]


class Generator:
    def __init__(self, model, tokenizer, template_name: str | None = None, stop_words: list[str] | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        self.model, self.tokenizer = model, tokenizer
        self.template = get_template(template_name, tokenizer)
        words = list(self.template.stop_words) + list(stop_words or [])
        if tokenizer.eos_token and tokenizer.eos_token not in words:
            words.append(tokenizer.eos_token)
        self.stop_words = tuple(dict.fromkeys(w for w in words if w))
        self.compute_dtype = compute_dtype
        # Stop words that are one token stop generation by id; others by string matching.
        self.stop_ids = []
        self.stop_strings = []
        for word in self.stop_words:
            ids = tokenizer.encode(word, add_special_tokens=False)
            (self.stop_ids.append(ids[0]) if len(ids) == 1 else self.stop_strings.append(word))

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True).text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def reply(self, messages: list[dict], settings: GenerationSettings | None = None,
              on_text: Callable[[str], None] | None = None) -> str:
        settings = settings or GenerationSettings()
        ids = self.prompt_ids(messages)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        streamer = _CallbackStreamer(self.tokenizer, len(ids), on_text or (lambda _: None), self.stop_words)
        sample = settings.temperature > 0
        kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sample, use_cache=True,
                      eos_token_id=self.stop_ids or None, pad_token_id=self.tokenizer.pad_token_id,
                      repetition_penalty=settings.repetition_penalty, streamer=streamer)
        if sample:
            kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        else:  # silence the warnings about sampling settings from generation_config.json
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if self.stop_strings:
            kwargs.update(stop_strings=self.stop_strings, tokenizer=self.tokenizer)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(device, self.compute_dtype):
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        finally:
            self.model.train(was_training)
        return streamer.visible_text()
