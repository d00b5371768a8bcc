"""What the loop minimises: the objective it calls on each micro-batch, chosen from the config.

Next-token cross-entropy serves SFT and continued pretraining (the labels say which tokens are
trained). Preference objectives (DPO and friends) plug in here with the same call: a batch in, a
summed loss out, so the loop, the strategies and the token weighting stay as they are.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tuner.config import Config
from tuner.data.dataset import IGNORE
from tuner.engine.fused_loss import chunked_linear_cross_entropy
from tuner.model import packed_attention
from tuner.model.device import autocast

TOKEN_KEYS = ("input_ids", "position_ids", "labels", "shift_labels")  # the batch entries the loss itself handles


@dataclass
class NextTokenLoss:
    """Summed cross-entropy of the trained tokens (output n predicts token n+1).

    Logits are computed only at positions whose next token is trained: over a 49k vocabulary the
    full logits tensor costs more memory and time than the LoRA step. Every batch entry besides the
    tokens, their positions and the labels (LLaVA's pixel_values) goes to the model as it is."""
    device: torch.device
    compute_dtype: torch.dtype
    attention: str
    takes_logits_to_keep: bool
    fused_head: tuple | None = None
    """(model, head) when the head runs inside the loss, in chunks (one process or DDP, a Linear head)"""

    metrics = {}  # per micro-batch figures besides the loss (preference objectives have some)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: the trained tokens."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def prepare(self, trainer) -> None:
        """Called once the model is built and before a checkpoint is resumed (nothing to do here)."""

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Sequence parallel pieces come with their labels shifted already (a piece's last token predicts the
        # next piece's first): then output n predicts shift_labels[n], with no shift here.
        shifted = "shift_labels" in batch
        targets = batch["shift_labels"] if shifted else batch["labels"][:, 1:]
        keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
        kwargs = {k: v for k, v in batch.items() if k not in TOKEN_KEYS}
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        if self.attention in (packed_attention.NAME, "flash_attention_2"):  # sample starts, once for all layers
            kwargs.update(packed_attention.varlen_kwargs(batch["position_ids"]))
        if self.fused_head is not None:  # the model returns hidden states; the head runs in the loss, in chunks
            base, head = self.fused_head
            base.lm_head = torch.nn.Identity()
            try:
                with autocast(self.device, self.compute_dtype):
                    hidden = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                   use_cache=False, **kwargs).logits
            finally:
                base.lm_head = head
            return chunked_linear_cross_entropy(hidden, head.weight, targets[:, keep], compute_dtype=self.compute_dtype)
        with autocast(self.device, self.compute_dtype):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           **kwargs).logits
        if "logits_to_keep" in kwargs:
            targets = targets[:, keep]
        elif not shifted:
            logits = logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def objective_for(cfg: Config):
    """The objective a config trains with: next-token cross-entropy, a preference objective
    (engine/preference.py; engine/reward.py for a reward model) when the config has a `preference` section,
    or online RL (engine/grpo.py) with an `rl` section."""
    if cfg.rl is not None:
        from tuner.engine.grpo import GrpoLoss
        return functools.partial(GrpoLoss, settings=cfg.rl)
    if cfg.preference is None:
        return NextTokenLoss
    if cfg.preference.method == "reward":
        from tuner.engine.reward import RewardLoss
        return functools.partial(RewardLoss, settings=cfg.preference)
    if cfg.preference.method == "kto":
        from tuner.engine.kto import KtoLoss
        return functools.partial(KtoLoss, settings=cfg.preference)
    from tuner.engine.preference import PreferenceLoss
    return functools.partial(PreferenceLoss, settings=cfg.preference)
