"""One generation core for the chat CLI, the web page, the server and the evaluate-chat hook.

Prompts are rendered with the same template code as training. A reply the model wrote
earlier is kept as the token ids it generated and spliced back into later prompts, so the
model sees exactly its own tokens, never a re-tokenized decode of them:

    [system][user 1][<ids of reply 1>][user 2]<generation prompt>
     ^ rendered text, tokenized    ^ spliced ids       ^ rendered text, tokenized

Several prompts can be generated in one batch (left-padded); every row has its own
streaming callback, stop words, token limit and cancel flag.

Log-probabilities (the server's `logprobs`): of a prompt's tokens, one forward over it
(`prompt_logprobs`); of generated tokens, the model's own distribution at each step (its raw
logits, before temperature, top-p or repetition penalty), taken from the output layer as
`generate` runs, with the `top` most likely tokens of that step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from tuner.data.templates import get_template
from tuner.errors import TunerError
from tuner.model.device import autocast

# Private-use characters mark where a stored reply's ids go; no tokenizer merges across them.
_SLOT = "\ue000{}\ue001"
_SLOT_PATTERN = re.compile("\ue000(\\d+)\ue001")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy decoding"""
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """extra stop strings for this request, on top of the template's"""

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one `generate` call (max_new_tokens is per row)."""
        return (self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)


@dataclass
class Reply:
    text: str
    """what the model wrote, cut before the first stop word"""
    ids: list[int]
    """the generated token ids of `text` (the stop word excluded)"""
    finish_reason: str
    """'stop' (a stop word or EOS), 'length' (max_new_tokens), or 'cancelled'"""
    prompt_tokens: int
    completion_tokens: int
    streamed: int = 0
    """characters of `text` handed to on_text (a cancelled row keeps back what may be half a stop word)"""
    logprobs: list | None = None
    """when asked for: (log-prob, [(token id, log-prob) of the most likely]) of each of `ids`"""


@dataclass
class TokenLogprob:
    """A token's log-probability under the model given the tokens before it, with the most likely ones there."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


class PromptTooLong(TunerError):
    def __init__(self, tokens: int, budget: int):
        super().__init__(f"the prompt is {tokens} tokens, but only {budget} fit (context length minus "
                         "max_new_tokens)", hint="shorten the message or lower max_new_tokens")
        self.tokens, self.budget = tokens, budget


def cut_at_stop_words(text: str, stop_words) -> str:
    cut = min((text.find(w) for w in stop_words if w and w in text), default=-1)
    return text if cut < 0 else text[:cut]


def partial_suffix(text: str, words) -> int:
    """Length of the longest end of `text` that a stop word starts with ('...<|im' -> 4)."""
    for size in range(min(len(text), max((len(w) for w in words), default=1) - 1), 0, -1):
        tail = text[-size:]
        if any(w.startswith(tail) for w in words):
            return size
    return 0


class _Row:
    """One prompt of a batch: collects its generated ids and streams new, complete text."""

    def __init__(self, tokenizer, stop_words: tuple[str, ...], stop_ids: set[int], max_new_tokens: int,
                 on_text: Callable[[str], None] | None, cancelled: Callable[[], bool] | None,
                 prefix: list[int] | None = None, sent: int = 0, prompt_tokens: int = 0,
                 on_done: Callable[[Reply], None] | None = None, logprobs: list | None = None, top: int = 0):
        self.tokenizer, self.stop_words, self.stop_ids = tokenizer, stop_words, stop_ids
        self.max_new_tokens, self.on_text, self.cancelled = max_new_tokens, on_text, cancelled
        self.ids: list[int] = list(prefix or [])  # a continued reply: what it generated before, already streamed
        self.sent = sent
        self.finish_reason: str | None = None
        self.prompt_tokens, self.on_done, self.done = prompt_tokens, on_done, False
        self.logprobs = logprobs  # None: not asked for; else one TokenLogprob per id (a continued row's too)
        self.top = top  # how many of the most likely tokens each of them lists

    def add(self, token: int, logprob: TokenLogprob | None = None) -> None:
        if self.finish_reason:
            return  # the batch goes on for other rows; this one is done
        self.ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        raw = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        text = cut_at_stop_words(raw, self.stop_words)
        if token in self.stop_ids or len(text) < len(raw):
            self.finish_reason = "stop"
        elif len(self.ids) >= self.max_new_tokens:  # before the pause check: a row paused on its
            self.finish_reason = "length"  # last token would go on for one more
        elif self.cancelled is not None and self.cancelled():
            self.finish_reason = "cancelled"
        # Hold back what may be the start of a stop word or half of a multi-byte character.
        safe = len(text) if self.finish_reason else len(text) - partial_suffix(text, self.stop_words)
        if not self.finish_reason and text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if self.on_text is not None and safe > self.sent:
            self.on_text(text[self.sent:safe])
            self.sent = safe
        if self.finish_reason:
            self.finish()

    def finish(self) -> Reply:
        """The row's reply, handed to on_done once, as soon as the row ends (not when the batch does)."""
        reply = self.reply(self.prompt_tokens)
        if self.on_done is not None and not self.done:
            self.done = True
            self.on_done(reply)
        return reply

    def _has_stop_word(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return any(w in text for w in self.stop_words)

    def reply(self, prompt_tokens: int) -> Reply:
        text = cut_at_stop_words(self.tokenizer.decode(self.ids, skip_special_tokens=False), self.stop_words)
        if self.on_text is not None and len(text) > self.sent and self.finish_reason != "cancelled":
            self.on_text(text[self.sent:])  # (a cancelled row may go on later from where it streamed to)
            self.sent = len(text)
        ids = list(self.ids)
        # Drop the tokens of the stop word: the template writes its own end-of-turn after the reply.
        while ids and (ids[-1] in self.stop_ids or self._has_stop_word(ids)):
            ids.pop()
        logprobs = self.logprobs[:len(ids)] if self.logprobs is not None else None
        return Reply(text, ids, self.finish_reason or "length", prompt_tokens, len(self.ids), self.sent, logprobs)


class _Streamer:
    """What `generate` calls with each step's tokens (shape: batch)."""

    def __init__(self, rows: list[_Row], logits: list | None = None):
        self.rows, self.prompt_seen = rows, False
        self.logits = logits  # [the last step's raw logits (batch, vocab)] when a row wants log-probs

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompts themselves
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        steps = torch.log_softmax(self.logits[0].float(), dim=-1) if self.logits else None
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            row.add(token, _token_logprob(steps[i], token, row.top) if row.logprobs is not None else None)

    def end(self) -> None:
        pass


class _RowsDone:
    """A stopping criterion, one bool per row: stop words, token limits and cancellations."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([row.finish_reason is not None for row in self.rows], device=input_ids.device)


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry of one position's log-softmax, and the `top` largest (the same floats: a greedy token's
    log-prob equals the first of its top list)."""
    best = torch.topk(logprobs, top) if top else None
    return TokenLogprob(token, float(logprobs[token]),
                        list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else [])


def reply_stop_words(template, tokenizer, extra=()) -> tuple[str, ...]:
    """What ends a reply: the template's end-of-turn words, `extra`, and the tokenizer's EOS."""
    words = list(template.stop_words) + list(extra)
    if tokenizer.eos_token and tokenizer.eos_token not in words:
        words.append(tokenizer.eos_token)
    return tuple(dict.fromkeys(w for w in words if w))


def single_token_ids(tokenizer, words) -> set[int]:
    """The ids of the words that are one token (they stop a row by id as well as by text)."""
    ids = set()
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
    return ids


class Generator:
    def __init__(self, model, tokenizer, template_name: str | None = None, stop_words: list[str] | None = None,
                 compute_dtype: torch.dtype = torch.float32, context_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.template = get_template(template_name, tokenizer)
        self.stop_words = reply_stop_words(self.template, tokenizer, stop_words or ())
        self.compute_dtype = compute_dtype
        config = getattr(model, "config", None)
        config = getattr(config, "text_config", None) or config  # LLaVA: the LLM's
        self.context_length = context_length or getattr(config, "max_position_embeddings", None) or 2048
        self.vision = None
        """VisionInfo of a LLaVA model: '<image>' in a prompt becomes one token per patch"""

    def _input_device(self) -> torch.device:
        """Where the prompt goes: with accelerate's device map, where the embeddings are."""
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map:
            where = next(iter(device_map.values()))
            return torch.device("cpu" if where in ("cpu", "disk") else where if isinstance(where, str) else
                                f"cuda:{where}")
        return next(self.model.parameters()).device

    def _stop_ids(self, words) -> set[int]:
        return single_token_ids(self.tokenizer, words)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, messages: list[dict], tools: list | None = None, generation_prompt: bool = True) -> list[int]:
        """Render and tokenize; assistant messages with "ids" contribute those ids unchanged."""
        stored, rendered_messages = {}, []
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and message.get("ids") is not None:
                stored[i] = message["ids"]
                message = {"role": "assistant", "content": _SLOT.format(i)}  # its ids hold any tool calls too
            rendered_messages.append(message)
        text = self.template.render(rendered_messages, add_generation_prompt=generation_prompt, tools=tools).text
        ids, position = [], 0
        for slot in _SLOT_PATTERN.finditer(text):
            ids += self._encode(text[position:slot.start()]) + list(stored[int(slot.group(1))])
            position = slot.end()
        ids += self._encode(text[position:])
        if self.vision is not None:
            from tuner.data.llava import expand_image_tokens
            ids, _ = expand_image_tokens(ids, ids, self.vision)
        return ids

    def pixel_values(self, messages: list[dict]):
        """The images of the messages ("images": PIL images), in order; None when there are none."""
        images = [image for m in messages for image in m.get("images") or []]
        if not images:
            return None
        if self.vision is None:
            raise TunerError("this model takes text only; load a LLaVA model to chat about images")
        return self.vision.pixel_values(images)

    def fit(self, messages: list[dict], max_new_tokens: int, tools: list | None = None):
        """(messages kept, their prompt ids, rounds dropped): the oldest rounds (a user message and
        what followed it) go first, the system prompt and the last round always stay."""
        budget = self.context_length - max_new_tokens
        head = 1 if messages and messages[0]["role"] == "system" else 0
        starts = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"] or [head]
        for dropped, start in enumerate(starts):
            kept = messages[:head] + messages[start:]
            ids = self.prompt_ids(kept, tools)
            if len(ids) <= budget:
                return kept, ids, dropped
        raise PromptTooLong(len(ids), budget)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], settings: GenerationSettings,
                 on_text: list[Callable[[str], None] | None] | None = None,
                 cancelled: list[Callable[[], bool] | None] | None = None,
                 max_new_tokens: list[int] | None = None, stop: list[tuple[str, ...]] | None = None,
                 pixel_values: torch.Tensor | None = None,
                 continued: list[tuple | None] | None = None,
                 on_done: list[Callable[[Reply], None] | None] | None = None,
                 logprobs: list[int | None] | None = None) -> list[Reply]:
        """Generate for a batch of prompts that share sampling settings; limits and extra stop
        strings may differ per row (by default they come from `settings`). `continued[i]`: (ids, sent,
        log-probs or None) of a reply row i began in an earlier call (the server paused it): it goes on from
        there, with its limit, stop words and stream counting what it already wrote. `on_done[i]` gets row
        i's reply the moment the row ends, while the batch's other rows go on. `logprobs[i]`: None, or how
        many of the most likely tokens row i's reply lists beside each token's own log-prob."""
        count = len(prompts)
        limits = max_new_tokens or [settings.max_new_tokens] * count
        continued = continued or [None] * count
        tops = logprobs or [None] * count
        rows = []
        for i in range(count):
            words = tuple(dict.fromkeys((*self.stop_words, *(stop[i] if stop else settings.stop))))
            before, sent, earlier = (*continued[i], None)[:3] if continued[i] else ([], 0, None)
            wanted = None if tops[i] is None else list(earlier or [])
            rows.append(_Row(self.tokenizer, words, self._stop_ids(words), limits[i],
                             (on_text or [None] * count)[i], (cancelled or [None] * count)[i], before, sent,
                             len(prompts[i]), (on_done or [None] * count)[i], wanted, tops[i] or 0))
        prompts = [list(p) + row.ids for p, row in zip(prompts, rows)]  # a continued row's ids are read again
        # Only stop ids every row shares may end a row inside `generate`; the rest end in _RowsDone.
        shared_stop_ids = set.intersection(*(row.stop_ids for row in rows))
        device = self._input_device()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sample = settings.temperature > 0
        new_tokens = max(limit - len(row.ids) for limit, row in zip(limits, rows))
        last_logits = [] if any(top is not None for top in tops) else None  # (filled by the hook below)
        kwargs = dict(max_new_tokens=max(new_tokens, 1), do_sample=sample, use_cache=True, pad_token_id=pad,
                      eos_token_id=sorted(shared_stop_ids) or None, repetition_penalty=settings.repetition_penalty,
                      streamer=_Streamer(rows, last_logits), stopping_criteria=[_RowsDone(rows)])
        if sample:
            kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        else:  # silence the warnings about sampling settings from generation_config.json
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if pixel_values is not None:  # LLaVA: every image of the batch, in the order of its tokens
            kwargs["pixel_values"] = pixel_values.to(device)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        was_training = self.model.training
        self.model.eval()
        hook = None
        if last_logits is not None:  # each step's raw logits at the last position, before any processing
            def keep(module, args, output):
                last_logits[:] = [output[:, -1, :]]
            hook = self.model.get_output_embeddings().register_forward_hook(keep)
        try:
            with autocast(device, self.compute_dtype):
                self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.model.train(was_training)
            if hook is not None:
                hook.remove()
        return [row.finish() for row in rows]

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each token's log-prob given the ones before it (the first has none: None), with the `top` most
        likely tokens at its place; one forward over the whole prompt."""
        device = self._input_device()
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(device, self.compute_dtype):
                logits = self.model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
        finally:
            self.model.train(was_training)
        out: list[TokenLogprob | None] = [None]
        for start in range(0, len(ids) - 1, 512):  # (log-softmax over the vocabulary, a slice of positions at a time)
            block = torch.log_softmax(logits[start:start + 512].float(), dim=-1)
            for j, row in enumerate(block[:len(ids) - 1 - start]):
                out.append(_token_logprob(row, ids[start + j + 1], top))
        return out

    def reply(self, messages: list[dict], settings: GenerationSettings | None = None,
              on_text: Callable[[str], None] | None = None, tools: list | None = None) -> str:
        """One answer to a conversation (the oldest rounds dropped if it does not fit)."""
        settings = settings or GenerationSettings()
        kept, ids, _ = self.fit(messages, settings.max_new_tokens, tools)
        return self.generate([ids], settings, [on_text], pixel_values=self.pixel_values(kept))[0].text

