"""`tuner score MODEL [--adapter DIR] --data PAIRS`: how often a model prefers the chosen answer.
`tuner score RM_DIR --data FILE` with a reward model: each answer's reward, and with pairs how often
the chosen one scores higher (the reward model's accuracy).

For every pair of the file (any preference form, tuner list-dataset-format), the summed log-prob of
each answer after the prompt. A model prefers the chosen answer when its log-prob is the higher one.
With an adapter (a DPO run's output), also the DPO reward: the log-ratio against the base with the
adapter switched off, beta * ((chosen - base chosen) - (rejected - base rejected)); its accuracy is
what `rewards/accuracies` in the training log measures, here on pairs the run did not see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuner.config import DataConfig
from tuner.data.pairs import build_pair_sequences, pad_rows
from tuner.data.tokenized import load_token_store
from tuner.model.logps import answer_logps, takes_logits_to_keep
from tuner.model.rewards import sample_rewards


@dataclass
class PairScores:
    chosen: torch.Tensor
    rejected: torch.Tensor
    """summed log-probs of each pair's answers under the model"""
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    """the same under the base (adapter off), when there is an adapter"""

    def report(self, beta: float) -> str:
        n = len(self.chosen)
        prefers = int((self.chosen > self.rejected).sum())
        lines = [f"pairs: {n}", f"prefers the chosen answer (log-prob): {prefers}/{n} = {prefers / n:.1%}"]
        if self.ref_chosen is not None:
            base = int((self.ref_chosen > self.ref_rejected).sum())
            margins = beta * ((self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected))
            right = int((margins > 0).sum())
            lines += [f"the base (adapter off) prefers it: {base}/{n} = {base / n:.1%}",
                      f"reward accuracy against the base: {right}/{n} = {right / n:.1%}, mean margin "
                      f"{float(margins.mean()):.3f} (beta {beta:g})"]
        return "\n".join(lines)


def score_pairs(model, tokenizer, data: str, template: str | None, max_length: int, batch_size: int = 8,
                compute_dtype: torch.dtype = torch.float32, say=lambda _: None) -> PairScores:
    """Every pair of `data` scored by `model` (and by its base when `model` carries a LoRA adapter)."""
    cfg = DataConfig(path=data, template=template, max_length=max_length, pack=False, shuffle=False, cache=False)
    sequences, _ = build_pair_sequences(cfg, tokenizer, say=say)
    device = next(model.parameters()).device
    attention = model.config._attn_implementation
    takes_keep = takes_logits_to_keep(model)
    table = torch.zeros(sequences.store.stats.pairs, 4)
    has_base = hasattr(model, "disable_adapter")
    for start in range(0, len(sequences), batch_size):
        batch = sequences.collate([sequences[k] for k in range(start, min(start + batch_size, len(sequences)))],
                                  tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            logps = answer_logps(model, batch, device, compute_dtype, attention, takes_keep)[0].view(-1, 2).cpu()
            table[batch["pair_index"].cpu(), :2] = logps.float()
            if has_base:
                with model.disable_adapter():
                    base = answer_logps(model, batch, device, compute_dtype, attention, takes_keep)[0]
                table[batch["pair_index"].cpu(), 2:] = base.view(-1, 2).cpu().float()
    if not has_base:
        return PairScores(table[:, 0], table[:, 1])
    return PairScores(table[:, 0], table[:, 1], table[:, 2], table[:, 3])


@dataclass
class RewardScores:
    rewards: torch.Tensor
    """one per sample of the data: conversations in order, or chosen, rejected, chosen, ... for pairs"""
    pairs: bool

    def report(self) -> str:
        if not self.pairs:
            lines = [f"{i}\t{r:.4f}" for i, r in enumerate(self.rewards.tolist())]
            return "\n".join(["row\treward", *lines, f"conversations: {len(self.rewards)}, mean reward "
                                                    f"{float(self.rewards.mean()):.4f}"])
        chosen, rejected = self.rewards[0::2], self.rewards[1::2]
        n, right = len(chosen), int((chosen > rejected).sum())
        return "\n".join([f"pairs: {n}", f"the reward model ranks the chosen answer higher: {right}/{n} = "
                                           f"{right / n:.1%}",
                          f"mean reward chosen {float(chosen.mean()):.4f}, rejected {float(rejected.mean()):.4f}, "
                          f"margin {float((chosen - rejected).mean()):.4f}"])


def score_with_reward_model(model, tokenizer, data: str, template: str | None, max_length: int, batch_size: int = 8,
                            compute_dtype: torch.dtype = torch.float32, say=lambda _: None,
                            num_proc: int = 0) -> RewardScores:
    """Every sample of `data` (conversations, or both answers of each pair) scored by a reward model, one
    sample per row, the reward read at its last token as in training."""
    cfg = DataConfig(path=data, template=template, max_length=max_length, pack=False, shuffle=False, cache=False,
                     num_proc=num_proc)
    store, _ = load_token_store(cfg, tokenizer, say)
    device = next(model.parameters()).device
    attention = model.config._attn_implementation
    rewards = torch.zeros(len(store))
    for start in range(0, len(store), batch_size):
        rows = [store.sample(k)[0].tolist() for k in range(start, min(start + batch_size, len(store)))]
        padded = pad_rows([(r, r) for r in rows], tokenizer.pad_token_id)  # (labels unused)
        batch = {k: torch.tensor(padded[k]) for k in ("input_ids", "position_ids", "sample_ids")}
        with torch.no_grad():
            found = sample_rewards(model, {k: v.to(device) for k, v in batch.items()}, device, compute_dtype, attention)
        rewards[start:start + len(rows)] = found.cpu()
    return RewardScores(rewards, bool(store.stats.pairs))


def score_conversations(model, tokenizer, conversations: list[list[dict]], max_length: int = 4096,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each conversation's reward under a reward model, read exactly as `tuner score` and training read it
    (the rows go through the data engine with the folder's own chat template, which pth_to_hf writes)."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="tuner-rm-") as folder:
        path = Path(folder) / "conversations.jsonl"
        path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations),
                        encoding="utf-8")
        return score_with_reward_model(model, tokenizer, str(path), None, max_length, compute_dtype=compute_dtype,
                                       num_proc=1).rewards
