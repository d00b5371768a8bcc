"""The training loop: one loop for full fine-tuning, LoRA and QLoRA.

Read `Trainer.train` top to bottom: fetch the step's micro-batches, forward, token-weighted
loss, backward, clip, step, schedule, hooks. Everything else is setup.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import shutil
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from tuner.config import Config
from tuner.data.dataset import IGNORE, build_sequences, collate
from tuner.engine import checkpoint as ckpt
from tuner.engine.device import autocast, default_device, resolve_compute_dtype
from tuner.engine.optim import build_optimizer, lr_lambda
from tuner.engine.hooks import (CheckpointHook, EvaluateChatHook, FunctionHook, LoggerHook, console, file_logger,
                                save_checkpoint_or_explain)
from tuner.errors import Interrupted, TunerError
from tuner.model.adapt import (apply_lora, count_parameters, load_trainable_state_dict, prepare_full,
                               trainable_state_dict)
from tuner.model.load import load_model, load_tokenizer


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM during training set a flag that the loop checks after each step;
    a second Ctrl-C stops at once."""
    stop: dict = {}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signal_number, frame):
        stop["signal"] = signal_number
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C is immediate

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StepSchedule:
    """Which sequences each optimizer step uses: a pure function of (seed, epoch, step).

    Resuming at step k therefore continues with exactly the batches an uninterrupted run
    would have used, without replaying any.
    """

    def __init__(self, n_sequences: int, batch_size: int, accumulative_counts: int, seed: int, shuffle: bool):
        self.n, self.batch_size, self.accum, self.seed, self.shuffle = (
            n_sequences, batch_size, accumulative_counts, seed, shuffle)
        self.steps_per_epoch = math.ceil(n_sequences / (batch_size * accumulative_counts))

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        per_step = self.batch_size * self.accum
        chosen = self.order(epoch)[index * per_step:(index + 1) * per_step]
        return [chosen[i:i + self.batch_size] for i in range(0, len(chosen), self.batch_size)]


class Trainer:
    def __init__(self, cfg: Config, work_dir: str | Path | None = None, resume: str | None = None,
                 seed: int | None = None):
        self.cfg = cfg
        if seed is not None:
            cfg.train.seed = seed
        self.work_dir = Path(work_dir or Path("work_dirs") / cfg.name)
        self.resume = resume
        self.device = default_device()
        self.compute_dtype = resolve_compute_dtype(cfg.train.dtype, self.device)

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.cfg
        self.work_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        self.run_dir = self.work_dir / stamp
        (self.run_dir / "vis_data").mkdir(parents=True, exist_ok=True)
        self.logger = file_logger(self.run_dir / f"{stamp}.log")
        config_copy = self.work_dir / f"{cfg.name}.py"
        if cfg.path.resolve() != config_copy.resolve():
            shutil.copyfile(cfg.path, config_copy)
        (self.work_dir / "resolved_config.py").write_text(cfg.resolved_text(), encoding="utf-8")
        self._seed_everything(cfg.train.seed)

        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        started = time.perf_counter()
        self.sequences, report = build_sequences(cfg.data, self.tokenizer, cfg.train.seed, say=self.info)
        self.info(f"Data: {report.summary()} ({time.perf_counter() - started:.1f}s)")
        for line in report.details().splitlines():
            self.info(f"Data: {line}")

        model = load_model(cfg.model, self.device)
        if cfg.train.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) without hooks
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            model = apply_lora(model, cfg.lora, quantized=cfg.model.quantization is not None)
        else:
            model = prepare_full(model, cfg.model.freeze)
        self.model = model.to(self.device) if cfg.model.quantization is None else model
        self.model.train()
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.model_takes_logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        trainable, total = count_parameters(self.model)
        self.info(f"Model: {cfg.model.path} ({cfg.method}), {trainable:,} of {total:,} parameters trainable "
                  f"({100 * trainable / total:.2f}%), compute dtype {str(self.compute_dtype).replace('torch.', '')}, "
                  f"device {self.device}")

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg.optim, self.device)
        t = cfg.train
        self.schedule = StepSchedule(len(self.sequences), t.batch_size, t.accumulative_counts, t.seed, cfg.data.shuffle)
        self.total_steps = self.schedule.steps_per_epoch * t.max_epochs
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        warmup = math.ceil(t.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.total_steps, warmup, t.scheduler))
        self.start_step = 0
        if self.resume:
            self._resume()

        self.hooks = [LoggerHook(t.log_interval),
                      CheckpointHook(cfg.checkpoint.save_steps, cfg.checkpoint.save_total_limit),
                      EvaluateChatHook(cfg.evaluate.inputs, cfg.evaluate.freq, cfg.evaluate.system,
                                       cfg.evaluate.max_new_tokens)]
        self.hooks += [h if hasattr(h, "after_iter") else FunctionHook(h) for h in cfg.custom_hooks]

    def info(self, message: str) -> None:
        self.logger.info(message)
        console.print(f"[tuner] {message}", markup=False, highlight=False, soft_wrap=True)

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def state_dict(self, step: int) -> dict:
        return {"step": step, "method": self.cfg.method, "config": self.cfg.name,
                "model": trainable_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state()}

    def _resume(self) -> None:
        path = ckpt.find_resume(self.resume, self.work_dir)
        if path is None:
            self.info(f"--resume auto: no checkpoint in {self.work_dir}, starting from scratch")
            return
        state = ckpt.load_checkpoint(path)
        if state.get("method") != self.cfg.method:
            raise TunerError(f"{path} is a {state.get('method')} checkpoint but the config trains {self.cfg.method}")
        load_trainable_state_dict(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.start_step = state["step"]
        self.info(f"Resumed from {path} at step {self.start_step}")

    # ---------------------------------------------------------------- the loop
    def train(self) -> list[float]:
        """Run to `total_steps`; returns the loss of each step run."""
        self.setup()
        with stop_on_signals() as stop:
            return self._train(stop)

    def _train(self, stop: dict) -> list[float]:
        losses = []
        for hook in self.hooks:
            hook.before_train(self)
        for step in range(self.start_step, self.total_steps):
            started = time.perf_counter()
            micro_batches = self.schedule.micro_batches(step)
            batches = [collate([self.sequences[i] for i in idx], self.tokenizer.pad_token_id) for idx in micro_batches]
            # Token-weighted loss: every trained token of the whole step counts the same,
            # however the tokens fall into micro-batches.
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            loss_sum = 0.0
            for batch in batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss = self.loss_sum(batch) / max(n_tokens, 1)
                loss.backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                self._bad_loss(step + 1, loss_sum)  # raises, or skips this update
                losses.append(loss_sum)
                continue
            grad_norm = self.clip_gradients()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            elapsed = time.perf_counter() - started
            # Real tokens only: padding is not throughput.
            real_tokens = sum(self.sequences.num_tokens(i) for idx in micro_batches for i in idx)
            metrics = {"loss": loss_sum, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens": real_tokens, "tokens_per_s": real_tokens / elapsed, "step_time": elapsed}
            losses.append(loss_sum)
            for hook in self.hooks:
                hook.after_iter(self, step + 1, metrics)
            if stop and step + 1 < self.total_steps:
                self._stop(step + 1, stop["signal"])
        for hook in self.hooks:
            hook.after_train(self)
        return losses

    def _bad_loss(self, step: int, loss: float) -> None:
        if self.cfg.train.nan_policy == "stop":
            raise TunerError(f"the loss is {loss} at step {step}; training stopped",
                             hint="lower optim.lr or check the data (tuner log-dataset CFG); "
                                  "resume from the last good checkpoint with --resume auto, or set "
                                  "train.nan_policy=skip to skip such steps")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule stays aligned with the data
        self.info(f"step {step}: the loss is {loss}; this update was skipped (train.nan_policy=skip)")

    def _stop(self, step: int, signal_number: int) -> None:
        """A signal arrived: keep the work done so far, then exit saying how to go on."""
        path = self.work_dir / f"iter_{step}.pth"
        if not path.exists():
            path = save_checkpoint_or_explain(self, step)
        for hook in self.hooks:
            hook.after_train(self)
        name = signal.Signals(signal_number).name
        raise Interrupted(f"stopped by {name} after step {step} of {self.total_steps}; checkpoint {path}\n"
                          f"  resume with: tuner train {self.cfg.path} --work-dir {self.work_dir} --resume auto",
                          signal_number)

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed cross-entropy of the trained tokens (output n predicts token n+1).

        Logits are computed only at positions whose next token is trained: over a 49k
        vocabulary the full logits tensor costs more memory and time than the LoRA step.
        """
        targets = batch["labels"][:, 1:]
        keep = (targets != IGNORE).any(0).nonzero().squeeze(-1)
        kwargs = {"logits_to_keep": keep} if self.model_takes_logits_to_keep else {}
        with autocast(self.device, self.compute_dtype):
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                                **kwargs).logits
        if kwargs:
            targets = targets[:, keep]
        else:
            logits = logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    def clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.max_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm)
