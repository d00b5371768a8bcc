"""KTO (Ethayarajh et al. 2024): single answers marked desirable or not, each compared with the
policy's KL divergence from the reference (data/kto.py makes the batches), as TRL 1.16 computes it:

    r   = log p(answer) - log p_ref(answer)                  (the answer's tokens after its prompt)
    z   = max(0, mean over the micro-batch's KL rows of (log p - log p_ref)), no gradient
    loss = w_d (1 - s(beta (r - z)))   for a desirable answer
           w_u (1 - s(beta (z - r)))   for an undesirable one

Summed over the micro-batch's examples; the loop divides by the step's examples. The reference is
the base with the LoRA adapter off, or a frozen copy (the KL rows change with each batch, so there is
no table to precompute). With several processes each estimates z on its own micro-batch and they
take the mean of the estimates (as TRL does); each example's KL row takes the answer of the example
before it in the step's micro-batch of all processes together (engine/batches.py), so under DDP the
loss equals one process's with the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuner.engine.preference import PreferenceLoss

KL_KEYS = ("input_ids", "labels", "position_ids", "sample_ids")


@dataclass
class KtoLoss(PreferenceLoss):
    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: examples."""
        return len(batch["desirable"])

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.settings
        main = {k: batch[k] for k in KL_KEYS}
        kl = {k: batch["kl_" + k] for k in KL_KEYS}
        logps, ref = self.answer_logps(model, main)[0], self.reference_logps(model, main)
        with torch.no_grad():
            kl_logps, kl_ref = self.answer_logps(model, kl)[0], self.reference_logps(model, kl)
        z = (kl_logps - kl_ref).mean().detach()
        if self.dist is not None and self.dist.enabled:  # the mean of the processes' estimates, as TRL takes it
            z = self.dist.mean(z)
        z = z.clamp(min=0)
        ratio = logps - ref
        good = batch["desirable"].to(ratio.device)
        losses = torch.where(good, s.desirable_weight * (1 - F.sigmoid(s.beta * (ratio - z))),
                             s.undesirable_weight * (1 - F.sigmoid(s.beta * (z - ratio))))
        rewards, logps = s.beta * ratio.detach(), logps.detach()
        # Means over the desirable / undesirable answers (as TRL logs them), weighted by the micro-batch's
        # examples so the loop's average over the step is a mean of these.
        chosen, rejected = _mean(rewards, good), _mean(rewards, ~good)
        values = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                  "kl": z, "logps/chosen": _mean(logps, good), "logps/rejected": _mean(logps, ~good)}
        self.metrics = {name: value.double() * len(good) for name, value in values.items()}
        return losses.sum()


def _mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The mean of `values` where `where` holds (0 when it holds nowhere)."""
    return values[where].mean() if where.any() else values.new_zeros(())
