"""The reward model objective: a scalar head on the LLM trained so each pair's chosen answer scores
above its rejected one (Bradley-Terry, as InstructGPT and TRL's RewardTrainer train it):

    loss = -log s(r_chosen - r_rejected) + c (r_chosen + r_rejected)^2     (c: center_rewards)

r is the head's output at the answer's last token (model/rewards.py). Summed over the micro-batch's
pairs; the loop divides by the step's pairs, as for DPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tuner.config import PreferenceConfig
from tuner.model.logps import count_pairs
from tuner.model.rewards import sample_rewards

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@dataclass
class RewardLoss:
    device: torch.device
    compute_dtype: torch.dtype
    attention: str
    takes_logits_to_keep: bool
    fused_head: tuple | None = None  # (a reward model has no output head over the vocabulary)
    settings: PreferenceConfig = field(default_factory=PreferenceConfig)
    metrics: dict = field(default_factory=dict)
    """the last micro-batch's metric sums over its pairs (the loop weights and adds them up)"""

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        return count_pairs(batch)

    def prepare(self, trainer) -> None:
        """Nothing to fix before training: a reward model has no reference."""

    def rewards(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sample_rewards(model, batch, self.device, self.compute_dtype, self.attention)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rewards = self.rewards(model, batch)
        chosen, rejected = rewards[0::2], rewards[1::2]
        losses = -F.logsigmoid(chosen - rejected)
        if self.settings.center_rewards:
            losses = losses + self.settings.center_rewards * (chosen + rejected) ** 2
        chosen, rejected = chosen.detach(), rejected.detach()
        values = (chosen, rejected, chosen - rejected, (chosen > rejected).float())
        self.metrics = {name: value.double().sum() for name, value in zip(METRICS, values)}
        return losses.sum()
