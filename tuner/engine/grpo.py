"""Online RL with verifiable rewards: GRPO and its variants (TRL 1.16's loss types), as an objective of the loop.

Each rollout (every `num_iterations` steps) takes the step's prompts (this process's share), samples
`num_generations` completions of each from the model as it is (generation/rollout.py), scores them with
the reward functions, and turns the rewards into advantages within each prompt's group:

    advantage = (reward - mean of the group) / (std of the group, or of the step's rewards, + 1e-4)

The step's micro-batches are those completions (train.batch_size each), and the loss of each token is
TRL's clipped surrogate (plus beta x the k3 KL estimate to the reference when beta > 0):

    ratio = exp(logp - old logp)   per token, or per completion: the mean of its tokens' log-ratios (GSPO)
    loss  = -min(ratio x A, clip(ratio, 1 - epsilon, 1 + epsilon_high) x A) + beta x ratio x KL

averaged as the loss type says: over the step's completion tokens (dapo), per completion then over
completions (grpo), over each micro-batch's tokens (bnpo), over completions x max_completion_length
(dr_grpo). The loop divides the summed loss by the step's units (tokens for dapo, completions otherwise)
over all micro-batches and processes, which gives exactly these averages (tests/test_grpo.py compares
loss and gradients with TRL's GRPOTrainer). With num_iterations = 1 the old log-probs are the current
ones, detached (ratio 1), as in TRL; with more, they are computed once at the rollout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from tuner.config import RLConfig
from tuner.engine.batches import StepData
from tuner.errors import TunerError
from tuner.generation.rollout import Sampling, TunerRollouts
from tuner.model import packed_attention
from tuner.model.device import autocast
from tuner.rewards import reward_name, resolve_rewards



@dataclass
class Rollout:
    """One rollout on this process: completions of its prompts, `num_generations` in a row for each."""
    index: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    advantages: torch.Tensor
    old_logps: list[torch.Tensor] | None = None
    ref_logps: list[torch.Tensor] | None = None
    figures: dict = field(default_factory=dict)


class PromptSchedule:
    """Which prompts each rollout uses: `per_step` of the epoch's shuffled order (as SFT's StepSchedule
    shuffles), each process taking every world_size-th. A remainder too small for a rollout is left out."""

    def __init__(self, n_prompts: int, per_step: int, num_iterations: int, seed: int, shuffle: bool, world_size: int):
        from tuner.engine.batches import StepSchedule

        self.per_step, self.world_size, self.num_iterations = per_step, world_size, num_iterations
        self.rollouts_per_epoch = n_prompts // per_step
        if self.rollouts_per_epoch == 0:
            raise TunerError(f"the data has {n_prompts} prompts, fewer than one step takes ({per_step}: processes x "
                             "train.batch_size x accumulative_counts / rl.num_generations)",
                             hint="add prompts, or lower train.batch_size or accumulative_counts")
        self.steps_per_epoch = self.rollouts_per_epoch * num_iterations
        self._order = StepSchedule(n_prompts, 1, 1, seed, shuffle).order

    def prompts(self, rollout: int, rank: int) -> list[int]:
        epoch, index = divmod(rollout, self.rollouts_per_epoch)
        chosen = self._order(epoch)[index * self.per_step:(index + 1) * self.per_step]
        return chosen[rank::self.world_size]


@dataclass
class GrpoLoss:
    device: torch.device
    compute_dtype: torch.dtype
    attention: str
    takes_logits_to_keep: bool
    fused_head: tuple | None = None  # (per-token log-probs and entropies need the logits)
    settings: RLConfig = field(default_factory=RLConfig)
    metrics: dict = field(default_factory=dict)
    """the loop adds these up over the step's micro-batches (none: the figures come from step_figures)"""

    def __post_init__(self):
        self.sums: dict[str, float] = {}  # token sums of the step's figures (entropy, KL, clipping)
        self.current: Rollout | None = None  # the rollout the steps train on
        self.rollout_figures: dict = {}  # its rewards and lengths, logged with its first step
        self.errors = 0  # reward functions that raised, scored 0 (rl.reward_errors='zero')
        self.reference_model = None
        self.peft_model = None

    # ------------------------------------------------------------------ setup
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        mask = batch["completion_mask"]
        return int(mask.sum()) if self.settings.loss == "dapo" else int(mask.shape[0])

    def prepare(self, trainer) -> None:
        from tuner.engine.preference import peft_model_of

        s, cfg = self.settings, trainer.cfg
        self.functions = resolve_rewards(s.rewards, cfg.path.parent, s.max_completion_length)
        self.names = [reward_name(f) for f in self.functions]
        self.functions = [RewardModelReward(f[3:]) if isinstance(f, str) else f for f in self.functions]
        self.weights = torch.tensor(s.reward_weights or [1.0] * len(self.functions), dtype=torch.float32)
        sharded = trainer.strategy.sharded(trainer.model)
        if sharded and s.beta > 0 and cfg.lora is None:
            raise TunerError("rl with beta > 0 and full fine-tuning keeps a frozen copy of the model, which FSDP and "
                             "ZeRO-3 do not shard", hint="train with LoRA (the reference is the adapter switched "
                                                         "off), set rl.beta=0, or use DDP / --deepspeed deepspeed_zero2")
        dist = trainer.dist
        # Sharded weights: every forward needs every process, so the processes stop sampling together.
        all_done = (lambda mine: dist.sum(0.0 if mine else 1.0)[0] == 0) if sharded else None
        from tuner.data.templates import get_template
        from tuner.generation.generate import reply_stop_words, single_token_ids

        tokenizer = trainer.tokenizer  # (a completion ends where a chat reply would: end of turn or EOS)
        self.stop_ids = single_token_ids(
            tokenizer, reply_stop_words(get_template(cfg.data.template, tokenizer), tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rollouts = TunerRollouts(trainer.raw_model, self.stop_ids, self.pad_id, self.device, self.compute_dtype,
                                      all_done=all_done)
        if s.beta > 0:
            mode = s.reference if s.reference != "auto" else "adapter" if cfg.lora is not None else "copy"
            if mode == "adapter":
                self.peft_model = peft_model_of(trainer.raw_model)
                if self.peft_model is None:
                    raise TunerError("rl.reference='adapter' needs a LoRA config", hint="set rl.reference='copy'")
            else:
                import copy
                self.reference_model = copy.deepcopy(trainer.raw_model).eval().requires_grad_(False)

    # ------------------------------------------------------------------ the step's data
    def step_data(self, trainer, step: int) -> StepData:
        """This process's micro-batches of `step`: the completions of its rollout (sampled at the first
        step of each num_iterations)."""
        index = step // self.settings.num_iterations
        if self.current is None or self.current.index != index:
            self.current = self.rollout(trainer, index)
        t = trainer.cfg.train
        batches = []
        for j in range(t.accumulative_counts):
            rows = list(range(j * t.batch_size, (j + 1) * t.batch_size))
            batches.append(self.collate(self.current, rows))
        units = sum(self.units(b) for b in batches)
        real = sum(len(self.current.prompt_ids[i]) + len(self.current.completion_ids[i])
                   for i in range(len(self.current.completion_ids)))
        self.rollout_figures = dict(self.current.figures) if step % self.settings.num_iterations == 0 else {}
        return StepData(batches, [1.0] * len(batches), units, real)

    def rollout(self, trainer, index: int) -> Rollout:
        s, dist = self.settings, trainer.dist
        prompts = trainer.sequences
        chosen = trainer.schedule.prompts(index, dist.rank)
        rows = [i for i in chosen for _ in range(s.num_generations)]  # (each prompt's completions in a row)
        prompt_ids = [prompts.ids[i] for i in rows]
        # One generator per completion, seeded by the run's seed, the rollout, the prompt and the completion's
        # number: a resumed run, or a run on another number of processes, samples the same completions.
        base = (trainer.cfg.train.seed * 1_000_003 + index) * 1_000_033
        generators = [torch.Generator().manual_seed((base + i) * 1024 + g) for i in chosen for g in range(s.num_generations)]
        sampling = Sampling(s.max_completion_length, s.temperature, s.top_p, s.top_k)
        started = time.perf_counter()
        completion_ids = self.rollouts(prompt_ids, sampling, generators)
        sampled = time.perf_counter()
        texts = trainer.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rewards = self.score(trainer, rows, completion_ids, texts)  # (N, functions)
        scored = time.perf_counter()
        advantages, figures = self.advantages(rewards, dist)
        lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
        hit_limit = sum(1 for c in completion_ids if len(c) >= s.max_completion_length and c[-1] not in self.stop_ids)
        length_sum, count, clipped = dist.sum(float(lengths.sum()), float(len(lengths)), float(hit_limit))
        extremes = dist.gather((float(lengths.min()), float(lengths.max())))
        figures.update({"completions/mean_length": length_sum / count, "completions/clipped_ratio": clipped / count,
                        "completions/min_length": min(e[0] for e in extremes),
                        "completions/max_length": max(e[1] for e in extremes)})
        rollout = Rollout(index, prompt_ids, completion_ids, advantages, figures=figures)
        if s.num_iterations > 1:  # the log-probs the completions were sampled with, for the later steps' ratios
            rollout.old_logps = self.logps_of(trainer.raw_model, rollout)
        if s.beta > 0:
            rollout.ref_logps = self.logps_of(self.reference_model, rollout) if self.reference_model is not None else \
                self._with_adapter_off(lambda: self.logps_of(trainer.raw_model, rollout))
        self._log_samples(trainer, index, rows, texts, rewards, advantages)
        rollout.figures.update({"time/rollout": sampled - started, "time/reward": scored - sampled,
                                "time/logps": time.perf_counter() - scored})  # (old and reference log-probs)
        return rollout

    def _with_adapter_off(self, fn):
        with self.peft_model.disable_adapter():
            return fn()

    def score(self, trainer, rows: list[int], completion_ids: list[list[int]], texts: list[str]) -> torch.Tensor:
        """(completions, reward functions) of rewards, NaN where a function returned None."""
        prompts = trainer.sequences
        given = [prompts.prompts[i] for i in rows]
        completions = [t if isinstance(g, str) else [{"role": "assistant", "content": t}] for g, t in zip(given, texts)]
        keys = sorted({k for i in set(rows) for k in prompts.columns[i]})
        columns = {k: [prompts.columns[i].get(k) for i in rows] for k in keys}
        out = torch.full((len(rows), len(self.functions)), float("nan"))
        self.errors = 0
        for f, (fn, name) in enumerate(zip(self.functions, self.names)):
            try:
                values = fn(prompts=given, completions=completions, completion_ids=completion_ids, **columns)
            except Exception as e:  # noqa: BLE001 - whatever the user's function raises is reported with its row
                if self.settings.reward_errors == "zero":
                    out[:, f] = 0.0
                    self.errors += len(rows)
                    continue
                raise TunerError(f"reward function {name!r} raised {type(e).__name__}: {e} (scoring the completions of "
                                 f"data rows {sorted(set(rows))[:8]})",
                                 hint="fix the function, or set rl.reward_errors='zero' to score such a batch 0") from e
            values = list(values)
            if len(values) != len(rows):
                raise TunerError(f"reward function {name!r} returned {len(values)} rewards for {len(rows)} completions")
            out[:, f] = torch.tensor([float("nan") if v is None else float(v) for v in values])
        return out

    def advantages(self, rewards: torch.Tensor, dist) -> tuple[torch.Tensor, dict]:
        """Group-relative advantages (TRL's sum_then_normalize) and the step's reward figures."""
        s, g = self.settings, self.settings.num_generations
        unscorable = torch.isnan(rewards).all(dim=1)
        total = (rewards * self.weights).nansum(dim=1)
        total[unscorable] = float("nan")
        groups = total.view(-1, g)
        mean = torch.nanmean(groups, dim=1).repeat_interleave(g)
        if s.scale_rewards == "batch":
            values = [v for part in dist.gather(total.tolist()) for v in part]
            std = _nanstd(torch.tensor(values)).expand_as(total)
        else:
            std = _nanstd(groups, dim=1).repeat_interleave(g)
        advantages = total - mean
        if s.scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        # Figures over all processes: sums and counts, one all-reduce.
        finite = ~torch.isnan(total)
        per_function = [(torch.nan_to_num(rewards[:, f]).sum(), (~torch.isnan(rewards[:, f])).sum())
                        for f in range(rewards.shape[1])]
        zero_std = (torch.nan_to_num(_nanstd(groups, dim=1), nan=0.0) < 1e-6).float().sum()
        sums = dist.sum(float(torch.nan_to_num(total).sum()), float((torch.nan_to_num(total) ** 2).sum()),
                        float(finite.sum()), float(unscorable.sum()), float(zero_std), float(groups.shape[0]),
                        *[float(v) for pair in per_function for v in pair])
        reward_sum, square_sum, count, unscored, zero_groups, n_groups = sums[:6]
        if count == 0:
            raise TunerError("every reward function returned None (or NaN) for every completion of this step: "
                             "nothing to learn from", hint="check the reward functions against the data's columns")
        mean_all = reward_sum / count
        figures = {"reward": mean_all, "reward_std": math.sqrt(max(square_sum / count - mean_all ** 2, 0.0)),
                   "frac_reward_zero_std": zero_groups / n_groups}
        for f, name in enumerate(self.names):
            total_f, count_f = sums[6 + 2 * f], sums[7 + 2 * f]
            figures[f"rewards/{name}"] = total_f / count_f if count_f else float("nan")
        if unscored:
            figures["unscored"] = unscored
        if self.errors:
            figures["reward_errors"] = float(self.errors)
        return advantages, figures

    def _log_samples(self, trainer, index, rows, texts, rewards, advantages) -> None:
        s, freq = self.settings, trainer.cfg.evaluate.freq
        if not trainer.dist.is_main or s.log_completions <= 0 or (index * s.num_iterations) % max(freq, 1):
            return
        for k in range(0, min(len(rows), s.log_completions * s.num_generations), s.num_generations):
            prompt = trainer.sequences.prompts[rows[k]]
            prompt = prompt if isinstance(prompt, str) else prompt[-1].get("content", "")
            trainer.info(f"rollout {index}: prompt {rows[k]}: {prompt[:200]!r}")
            for j in range(k, k + s.num_generations):
                scores = ", ".join(f"{n}={v:.3g}" for n, v in zip(self.names, rewards[j].tolist()))
                trainer.info(f"  [{scores}; advantage {float(advantages[j]):+.3f}] {texts[j][:300]!r}")

    # ------------------------------------------------------------------ tensors
    def collate(self, rollout: Rollout, rows: list[int]) -> dict[str, torch.Tensor]:
        """The rows' prompt + completion sequences packed into one row (position ids restart at each, so no
        sequence sees another and there is no padding), with where each completion token's logits are:
        `completion_index` (completions, longest completion) into the packed row, `completion_mask` 1 on real
        tokens. (Padded rows made every pad a sample of its own for tuner's packed attention: 7x the calls.)"""
        width = max(max(len(rollout.completion_ids[i]) for i in rows), 1)
        ids, positions = [], []
        index = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for k, i in enumerate(rows):
            prompt, completion = rollout.prompt_ids[i], rollout.completion_ids[i]
            start = len(ids) + len(prompt) - 1  # the logits at the prompt's last token predict the first completion token
            index[k, :len(completion)] = torch.arange(start, start + len(completion))
            mask[k, :len(completion)] = 1
            ids += list(prompt) + list(completion)
            positions += range(len(prompt) + len(completion))
        batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                 "completion_index": index, "completion_mask": mask, "advantages": rollout.advantages[rows].float()}
        for name in ("old_logps", "ref_logps"):
            values = getattr(rollout, name)
            if values is not None:
                batch[name] = torch.stack([torch.nn.functional.pad(values[i], (0, width - len(values[i]))) for i in rows])
        return batch

    def token_logps(self, model, batch: dict[str, torch.Tensor], entropy: bool = False):
        """Each completion token's log-prob at the sampling temperature (completions, longest completion), and
        the entropy of each of those distributions when asked. Logits only where a completion token is predicted."""
        index, mask = batch["completion_index"], batch["completion_mask"].bool()
        keep = index[mask].unique()  # (sorted)
        kwargs = {}
        if self.attention in (packed_attention.NAME, "flash_attention_2"):
            kwargs.update(packed_attention.varlen_kwargs(batch["position_ids"]))
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        with autocast(self.device, self.compute_dtype):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           **kwargs).logits[0]
        if not self.takes_logits_to_keep:
            logits = logits[keep]
        # Row k of `logits` is position keep[k]; each completion token's row, and the token it predicts:
        where = torch.zeros(batch["input_ids"].shape[1], dtype=torch.long, device=keep.device)
        where[keep] = torch.arange(len(keep), device=keep.device)
        log_probs = (logits.float() / self.settings.temperature).log_softmax(-1)  # (kept positions, vocab)
        targets = batch["input_ids"][0][keep + 1]
        logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[where[index]] * mask  # (B, C)
        if not entropy:
            return logps
        with torch.no_grad():  # (a figure, not part of the loss)
            entropies = -(log_probs.exp() * log_probs).sum(-1)[where[index]] * mask
        return logps, entropies

    @torch.no_grad()
    def logps_of(self, model, rollout: Rollout, batch_size: int = 8) -> list[torch.Tensor]:
        """Per-completion token log-probs under `model` (eval mode), for old and reference log-probs."""
        was_training = model.training
        model.eval()
        out = []
        try:
            for start in range(0, len(rollout.completion_ids), batch_size):
                rows = list(range(start, min(start + batch_size, len(rollout.completion_ids))))
                batch = {k: v.to(self.device) for k, v in self.collate(rollout, rows).items()
                         if k not in ("old_logps", "ref_logps")}
                logps = self.token_logps(model, batch).cpu()
                out += [logps[k, :len(rollout.completion_ids[i])] for k, i in enumerate(rows)]
        finally:
            model.train(was_training)
        return out

    # ------------------------------------------------------------------ the loss
    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.settings
        logps, entropies = self.token_logps(model, batch, entropy=True)
        mask = batch["completion_mask"].to(logps.dtype)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        advantages = batch["advantages"].to(logps.dtype).unsqueeze(1)
        log_ratio = logps - old
        if s.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(log_ratio)
        high = s.epsilon_high if s.epsilon_high is not None else s.epsilon
        clipped = torch.clamp(ratio, 1 - s.epsilon, 1 + high)
        capped = ratio if s.delta is None else torch.clamp(ratio, max=s.delta)
        per_token = -torch.min(capped * advantages, clipped * advantages)
        if s.beta > 0:
            ref = batch["ref_logps"]
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            if s.kl_bias_correction:
                kl = kl * ratio
            per_token = per_token + s.beta * kl
        per_token = per_token.expand_as(mask)
        tokens = (per_token * mask).sum(-1)
        if s.loss == "dapo":
            loss = tokens.sum()
        elif s.loss == "grpo":
            loss = (tokens / mask.sum(-1).clamp(min=1.0)).sum()
        elif s.loss == "bnpo":
            loss = tokens.sum() / mask.sum().clamp(min=1.0) * mask.shape[0]
        else:  # dr_grpo
            loss = tokens.sum() / s.max_completion_length
        self._add_sums(mask, entropies, ratio, advantages, high, kl if s.beta > 0 else None)
        return loss

    def _add_sums(self, mask, entropies, ratio, advantages, high, kl) -> None:
        """Token sums of the step's figures (entropy, clipping, KL), turned into means in step_figures."""
        with torch.no_grad():
            low_clip = ((ratio < 1 - self.settings.epsilon) & (advantages < 0)).expand_as(mask).float()
            high_clip = ((ratio > 1 + high) & (advantages > 0)).expand_as(mask).float()
            values = {"entropy": entropies, "clip_ratio/low_mean": low_clip, "clip_ratio/high_mean": high_clip,
                      "clip_ratio/region_mean": low_clip + high_clip}
            if kl is not None:
                values["kl"] = kl
            for name, value in values.items():
                self.sums[name] = self.sums.get(name, 0.0) + float((value * mask).double().sum())
            self.sums["tokens"] = self.sums.get("tokens", 0.0) + float(mask.sum())

    def step_figures(self, dist) -> dict:
        """The step's figures over all processes: rewards and lengths of its rollout, then token means."""
        names = sorted(self.sums)
        totals = dict(zip(names, dist.sum(*[self.sums[n] for n in names]))) if names else {}
        self.sums = {}
        tokens = max(totals.pop("tokens", 0.0), 1.0)
        figures = {name: value / tokens for name, value in totals.items()}
        figures.update(self.rollout_figures)
        return figures

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The rollout the next steps still use (num_iterations > 1), so a resumed run trains on it."""
        if self.current is None or self.settings.num_iterations == 1:
            return {}
        r = self.current
        return {"index": r.index, "prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids,
                "advantages": r.advantages, "old_logps": r.old_logps, "ref_logps": r.ref_logps, "figures": r.figures}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.current = Rollout(**state)


class RewardModelReward:
    """A reward model folder (tuner's method='reward' output, or any sequence-classification model with one
    label) as a reward function: prompt + completion scored as one conversation, with its own chat template."""

    def __init__(self, path: str):
        from tuner.generation.load import load_reward_model

        loaded = load_reward_model(path, "fp32")
        if loaded is None:
            raise TunerError(f"rl.rewards 'rm:{path}': {path} is not a reward model (no sequence-classification head)",
                             hint="train one with a preference section method='reward', then tuner convert pth_to_hf")
        self.model, self.tokenizer, self.compute_dtype = loaded
        self.__name__ = f"rm:{path}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        from tuner.generation.score import score_conversations
        from tuner.rewards import completion_text

        conversations = [([{"role": "user", "content": p}] if isinstance(p, str) else list(p))
                         + [{"role": "assistant", "content": completion_text(c)}] for p, c in zip(prompts, completions)]
        return score_conversations(self.model, self.tokenizer, conversations,
                                   compute_dtype=self.compute_dtype).tolist()


def _nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than 2 values), as TRL's nanstd."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = variance * torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)
