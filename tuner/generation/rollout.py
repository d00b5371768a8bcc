"""Rollouts for online RL: sampled completions of a batch of prompts, from the model as it is now.

One batched loop with a KV cache: the prompts left-padded, one forward per new token for all rows,
sampling with temperature / top-k / top-p, each row from its own `torch.Generator` the caller seeds (so a
step's rollouts are a function of the run's seed, the step, the prompt and the weights, whatever the
batch or the number of processes: a resumed run, or one on more processes, samples the same ones). A row
stops at an end token (kept in its completion, as TRL keeps it) or at the limit.

`RolloutEngine` is the seam: `TunerRollouts` runs the training model itself (LoRA: with its adapter on,
no copy); another engine (vLLM on a GPU) implements the same call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from tuner.model.device import autocast


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


class RolloutEngine(Protocol):
    def __call__(self, prompts: list[list[int]], sampling: Sampling,
                 generators: list[torch.Generator]) -> list[list[int]]:
        """One completion (token ids) per prompt, row i sampled with generators[i]."""


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top k, and outside the smallest set whose probability reaches top_p, set to -inf
    (as transformers' TopK and TopP warpers do: the token that crosses top_p stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # the mass before a token already reaches top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(model, prompts: list[list[int]], sampling: Sampling, generators: list[torch.Generator], stop_ids: set[int],
           pad_id: int, device: torch.device, compute_dtype: torch.dtype, all_done=None) -> list[list[int]]:
    """Completions of `prompts` (token ids each), sampled in one batch with a KV cache. `all_done(bool)`: whether
    every process's rows are done (weights sharded over processes: each forward needs all of them, so they
    stop together)."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(stop_ids), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    columns, cache = [], DynamicCache()
    was_training = model.training
    model.eval()
    try:
        for _ in range(sampling.max_new_tokens):
            with autocast(device, compute_dtype):
                logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1].float()
            logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
            # Each row from its own generator, on the CPU (where the generators live): the same draws in any batch,
            # on any device. (A finished row draws too, and is ignored: its generator stays in step either way.)
            # Inverse-CDF: one uniform per row, searched in the cumulative probabilities (a multinomial draw per row
            # cost 0.8 ms over a 49k vocabulary, 7% of a rollout).
            cumulative = logits.softmax(-1).cumsum(-1).cpu()
            uniform = torch.cat([torch.rand(1, generator=g) for g in generators]).unsqueeze(1) * cumulative[:, -1:]
            token = torch.searchsorted(cumulative, uniform).squeeze(1).clamp(max=cumulative.shape[1] - 1).to(device)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            columns.append(token)
            done |= torch.isin(token, stops)
            finished = bool(done.all())
            if all_done(finished) if all_done is not None else finished:
                break
            input_ids = token[:, None]
            mask = torch.cat([mask, torch.ones_like(input_ids)], dim=1)
            positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)
    if not columns:
        return [[] for _ in prompts]
    tokens = torch.stack(columns, dim=1).tolist()
    out = []
    for row in tokens:
        ids = []
        for token in row:
            ids.append(token)
            if token in stop_ids:
                break
        out.append(ids)
    return out


class TunerRollouts:
    """Rollouts from the training model itself, in chunks of `batch_size` rows."""

    def __init__(self, model, stop_ids: set[int], pad_id: int, device: torch.device, compute_dtype: torch.dtype,
                 batch_size: int = 64, all_done=None):
        self.model, self.stop_ids, self.pad_id, self.device = model, stop_ids, pad_id, device
        self.compute_dtype, self.batch_size, self.all_done = compute_dtype, batch_size, all_done

    def __call__(self, prompts: list[list[int]], sampling: Sampling,
                 generators: list[torch.Generator]) -> list[list[int]]:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            out += sample(self.model, prompts[start:end], sampling, generators[start:end], self.stop_ids,
                          self.pad_id, self.device, self.compute_dtype, self.all_done)
        return out
