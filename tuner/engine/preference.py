"""Preference objectives: DPO (sigmoid, IPO, hinge; label smoothing), SimPO and ORPO.

Each micro-batch holds whole pairs (data/pairs.py): `sample_ids` says which pair and answer each
token belongs to. One forward gives every answer's summed log-probability of its tokens; the loss
of each pair follows the paper (and TRL 1.16's code, which tests/test_preference.py compares with):

    DPO      d = (chosen - ref chosen) - (rejected - ref rejected)
             sigmoid  -(1 - e) log s(beta d) - e log s(-beta d)      (e: label smoothing)
             + sft_weight * the chosen answers' per-token NLL (RPO), with any of the three
             hinge    relu(1 - beta d)
             ipo      (d' - 1 / (2 beta))^2, d' with each log-ratio divided by its answer's length
    SimPO    -log s(beta (mean chosen - mean rejected) - gamma)     (mean: per-token log-prob)
    ORPO     NLL of the chosen answer (per token) - beta log s(log odds chosen - log odds rejected)

The loop divides the summed loss by the step's pairs (all micro-batches, all processes), as it
divides SFT's by the trained tokens. The reference log-probs of DPO come from the base with the
LoRA adapter disabled (no second model), a frozen copy of the starting model, or a table computed
once before training (saved in the work dir, so a resumed run uses the same one).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tuner.config import PreferenceConfig
from tuner.model.logps import answer_logps, count_pairs

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def peft_model_of(model):
    """The PeftModel inside a DDP / FSDP / DeepSpeed wrapper, or None."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    return model if hasattr(model, "disable_adapter") else None


@dataclass
class PreferenceLoss:
    device: torch.device
    compute_dtype: torch.dtype
    attention: str
    takes_logits_to_keep: bool
    fused_head: tuple | None = None  # (per-token log-probs need the logits: the chunked head is not used)
    settings: PreferenceConfig = field(default_factory=PreferenceConfig)
    reference: str = "none"
    """adapter | copy | table | none (SimPO, ORPO)"""
    reference_model: torch.nn.Module | None = None
    peft_model: torch.nn.Module | None = None
    """reference 'adapter': the PeftModel whose adapter is switched off (the loop may call a module inside it)"""
    table: torch.Tensor | None = None
    """precomputed reference log-probs, (pairs, 2) float64"""
    dist: object | None = None
    """the run's processes (KTO averages its KL estimate over them)"""
    seqpar: object | None = None
    """sequence parallelism (engine/seqpar.py): each process of a group holds a piece of every row"""
    metrics: dict = field(default_factory=dict)
    """the last micro-batch's metric sums over its pairs (the loop weights and adds them up)"""

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over: pairs."""
        return count_pairs(batch)

    def answer_logps(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logps, lengths = answer_logps(model, batch, self.device, self.compute_dtype, self.attention,
                                      self.takes_logits_to_keep)
        if self.seqpar is not None:  # each process summed its piece of the rows: the group adds them up
            from torch.distributed.nn.functional import all_reduce
            logps = all_reduce(logps, group=self.seqpar.group)  # (backward: the group's gradients added up)
            lengths = all_reduce(lengths.detach(), group=self.seqpar.group)
        return logps, lengths

    @property
    def share(self) -> int:
        """Processes that compute the same pairs' loss (a sequence-parallel group), each returning its share."""
        return self.seqpar.size if self.seqpar is not None else 1

    def reference_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference == "table":
            return self.table[batch["pair_index"].to(self.table.device)].flatten().to(torch.float32)
        with torch.no_grad():
            if self.reference == "adapter":  # (FSDP calls the model inside PEFT's wrapper: switch it off there)
                with (self.peft_model or peft_model_of(model)).disable_adapter():
                    return self.answer_logps(model, batch)[0]
            return self.answer_logps(self.reference_model, batch)[0]

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of the micro-batch's pairs."""
        s = self.settings
        logps, lengths = self.answer_logps(model, batch)
        chosen, rejected = logps[0::2], logps[1::2]
        if s.method == "dpo":
            ref = self.reference_logps(model, batch)
            chosen_ratio, rejected_ratio = chosen - ref[0::2], rejected - ref[1::2]
            delta = chosen_ratio - rejected_ratio
            if s.loss == "sigmoid":
                losses = (-(1 - s.label_smoothing) * F.logsigmoid(s.beta * delta)
                          - s.label_smoothing * F.logsigmoid(-s.beta * delta))
            elif s.loss == "hinge":
                losses = torch.relu(1 - s.beta * delta)
            else:  # ipo
                per_token = chosen_ratio / lengths[0::2].clamp(min=1) - rejected_ratio / lengths[1::2].clamp(min=1)
                losses = (per_token - 1 / (2 * s.beta)) ** 2
            if s.sft_weight:  # the chosen tokens' mean NLL over the micro-batch, once per pair (as TRL adds it)
                losses = losses - s.sft_weight * chosen.sum() / lengths[0::2].sum().clamp(min=1)
            chosen_reward, rejected_reward = s.beta * chosen_ratio.detach(), s.beta * rejected_ratio.detach()
        else:
            chosen_mean, rejected_mean = chosen / lengths[0::2], rejected / lengths[1::2]
            if s.method == "simpo":
                losses = -F.logsigmoid(s.beta * (chosen_mean - rejected_mean) - s.simpo_gamma)
            else:  # orpo
                log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
                losses = -chosen_mean - s.beta * F.logsigmoid(log_odds)
            chosen_reward, rejected_reward = s.beta * chosen_mean.detach(), s.beta * rejected_mean.detach()
        self._add_metrics(chosen_reward, rejected_reward, chosen.detach(), rejected.detach())
        # With sequence parallelism every process of the group has the whole pairs' loss: each returns 1/N of it
        # (the all-reduce's backward adds the N processes' gradients up again).
        return losses.sum() / self.share

    def _add_metrics(self, chosen_reward, rejected_reward, chosen_logps, rejected_logps) -> None:
        values = (chosen_reward, rejected_reward, chosen_reward - rejected_reward,
                  (chosen_reward > rejected_reward).float(), chosen_logps, rejected_logps)
        self.metrics = {name: value.double().sum() / self.share for name, value in zip(METRICS, values)}

    def prepare(self, trainer) -> None:
        """The reference DPO compares with, fixed before training starts (and before a resumed
        checkpoint is loaded, so a table or a copy is of the starting model)."""
        from tuner.errors import TunerError

        s = self.settings
        self.dist, self.seqpar = trainer.dist, trainer.seqpar
        if s.method not in ("dpo", "kto"):
            return
        full_default = "precompute" if s.method == "dpo" else "copy"  # (KTO's KL rows change with each batch)
        mode = s.reference if s.reference != "auto" else "adapter" if trainer.cfg.lora is not None else full_default
        if mode == "adapter":
            self.peft_model = peft_model_of(trainer.raw_model)
            if self.peft_model is None:
                raise TunerError("preference.reference='adapter' needs a LoRA config (the reference is the base "
                                 "with the adapter disabled)", hint="set preference.reference='precompute' or 'copy'")
            self.reference = "adapter"
        elif mode == "copy":
            if trainer.strategy.sharded(trainer.model):
                hint = ("set preference.reference='precompute'" if s.method == "dpo" else
                        "KTO's reference log-probs cannot be precomputed (its KL rows pair each prompt with another "
                        "answer of the step): train KTO with LoRA (reference='adapter'), or fully under DDP or "
                        "--deepspeed deepspeed_zero2, where every process holds the copy")
                raise TunerError("preference.reference='copy' keeps a whole second model, which FSDP and ZeRO-3 "
                                 "do not shard", hint=hint)
            import copy
            self.reference_model = copy.deepcopy(trainer.raw_model).eval().requires_grad_(False)
            self.reference = "copy"
        else:
            self.table = reference_table(self, trainer.model, trainer.sequences, trainer.sequences.collate,
                                         trainer.tokenizer.pad_token_id, trainer.cfg.train.batch_size, trainer.dist,
                                         trainer.work_dir / "reference_logps.npy", trainer.info,
                                         table_key(trainer.cfg, self, trainer.sequences),
                                         (trainer.data_rank, trainer.data_world), trainer.piece_of)
            self.reference = "table"


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def table_key(cfg, objective: PreferenceLoss, sequences) -> dict:
    """Everything the reference table's numbers depend on: the model (its folder and files), how it
    computes (dtypes, attention, quantization), the tokens (the token store's content, which the data,
    tokenizer, template and max_length make) and which pairs the epoch samples. A table saved with
    another key is stale."""
    from tuner.model.load import model_identity

    pairs = sorted({p for group in sequences.plan for p in group})
    return {**model_identity(cfg.model.path), "model_dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
            "compute_dtype": str(objective.compute_dtype), "attention": objective.attention,
            "tokens": _store_fingerprint(sequences.store), "template": cfg.data.template, "max_length": cfg.data.max_length,
            "pairs": hashlib.sha256(np.asarray(pairs, dtype=np.int64).tobytes()).hexdigest()[:16]}


def _store_fingerprint(store) -> str:
    """The token store's content (ids, trained flags, sample offsets): the same tokens from another file
    name or cache folder keep the table (about 1 s per GB of tokens)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("offsets.npy", "ids.bin", "trained.bin"):
        with open(store.folder / name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _stale(saved: Path, key: dict) -> str | None:
    """Why the table beside `saved` cannot be used with `key` (None: it can)."""
    if not saved.exists():
        return "it has no key (written by an older tuner)"
    try:
        old = json.loads(saved.read_text())
    except ValueError:
        return f"{saved.name} is unreadable"
    changed = [name for name in key if old.get(name) != key[name]]
    return f"changed since it was computed: {', '.join(changed)}" if changed else None


def reference_table(objective: PreferenceLoss, model, sequences, collate, pad_id: int, batch_size: int, dist,
                    path: Path, say, key: dict, share: tuple[int, int], piece_of) -> torch.Tensor:
    """Every pair's reference log-probs (chosen, rejected) under the starting model, computed once: read
    from `path` when an earlier start of this run wrote it with the same `key` (model, dtypes, tokens,
    sampled pairs; kept beside it as JSON), else computed again. Each process (each sequence-parallel
    group: `share` is (its place, how many), `piece_of` gives a process its piece of a batch) computes its
    share of the sequences; every process then holds the whole table."""
    n_pairs = sequences.store.stats.pairs
    key_path = path.with_suffix(".json")
    if path.exists():
        table = torch.from_numpy(np.load(path))
        why = "its shape differs" if table.shape != (n_pairs, 2) else _stale(key_path, key)
        if why is None:
            say(f"DPO: reference log-probs of {n_pairs} pairs read from {path}")
            return table
        say(f"DPO: the reference log-probs in {path} are not this run's ({why}): computing them again")
    place, places = share
    mine = list(range(place, len(sequences), places))
    rounds = math.ceil(len(sequences) / (places * batch_size))  # the same on every process (FSDP)
    found: dict[int, tuple[float, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for r in range(rounds):
            chunk = mine[r * batch_size:(r + 1) * batch_size] or [0]  # a process with none left repeats one
            batch = {k: v.to(objective.device) for k, v in collate([sequences[k] for k in chunk], pad_id).items()}
            with torch.no_grad(), piece_of(batch) as piece:
                logps = objective.answer_logps(model, piece)[0].double().view(-1, 2).cpu()
            for pair, row in zip(batch["pair_index"].tolist(), logps.tolist()):
                found[pair] = tuple(row)
    finally:
        model.train(was_training)
    table = torch.zeros(n_pairs, 2, dtype=torch.float64)
    for part in dist.gather(found):
        for pair, row in part.items():
            table[pair] = torch.tensor(row, dtype=torch.float64)
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        key_path.unlink(missing_ok=True)  # (a table never stands beside another table's key)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, table.numpy())
        tmp.replace(path)
        tmp_key = key_path.with_name(key_path.stem + ".tmp.json")
        tmp_key.write_text(json.dumps(key, indent=1))
        tmp_key.replace(key_path)
    say(f"DPO: reference log-probs of {n_pairs} pairs computed once before training ({path.name})")
    return table
