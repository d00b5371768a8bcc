"""The training loop: one loop for full fine-tuning, LoRA and QLoRA.

Read `Trainer.train` top to bottom: fetch the step's micro-batches, forward, token-weighted
loss, backward, clip, step, schedule, hooks. Everything else is setup.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
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
from tuner.engine import allocator, zero
from tuner.engine import checkpoint as ckpt
from tuner.engine import strategy as strategies
from tuner.engine.budget import (
    available_memory,
    estimate_memory,
    flops_per_token,
    matmul_peak_flops,
)
from tuner.engine.dist import Distributed
from tuner.engine.fused_loss import chunked_linear_cross_entropy
from tuner.engine.hooks import (
    CheckpointHook,
    EvaluateChatHook,
    FunctionHook,
    LoggerHook,
    ReportHook,
    console,
    file_logger,
    save_checkpoint_or_explain,
)
from tuner.engine.optim import build_optimizer, lr_lambda
from tuner.errors import Interrupted, TunerError
from tuner.model import fast_lora, packed_attention
from tuner.model.adapt import apply_lora, count_parameters, prepare_full
from tuner.model.device import autocast, default_device, resolve_compute_dtype
from tuner.model.load import describe_conversion, load_model, load_tokenizer


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

    def __init__(self, n_sequences: int, batch_size: int, accumulative_counts: int, seed: int, shuffle: bool,
                 world_size: int = 1):
        self.n, self.batch_size, self.accum, self.seed, self.shuffle = (
            n_sequences, batch_size, accumulative_counts, seed, shuffle)
        self.world_size = world_size
        self.per_step = batch_size * accumulative_counts * world_size  # sequences per optimizer step, all ranks
        self.steps_per_epoch = math.ceil(n_sequences / self.per_step)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(self.n, generator=generator).tolist()

    def micro_batches(self, step: int, rank: int = 0) -> list[list[int]]:
        """This rank's micro-batches of a step. Every rank gets the same number of them (an empty
        one carries no loss), so processes stay in step; together they hold the step's sequences."""
        epoch, index = divmod(step, self.steps_per_epoch)
        chosen = self.order(epoch)[index * self.per_step:(index + 1) * self.per_step]
        count = math.ceil(math.ceil(len(chosen) / self.world_size) / self.batch_size)
        mine = chosen[rank::self.world_size]
        return [mine[i * self.batch_size:(i + 1) * self.batch_size] for i in range(count)]


class Trainer:
    def __init__(self, cfg: Config, work_dir: str | Path | None = None, resume: str | None = None,
                 seed: int | None = None, fsdp: bool = False, deepspeed: str | None = None):
        self.cfg = cfg
        if seed is not None:
            cfg.train.seed = seed
        self.work_dir = Path(work_dir or Path("work_dirs") / cfg.name)
        self.resume = resume
        self.dist = Distributed()
        self.strategy = ("fsdp" if fsdp else "ddp") if self.dist.enabled else "single"
        self.deepspeed = deepspeed
        self.built_sharded = False  # the model was built already sharded (see _load_model)
        if deepspeed:
            self.strategy = "deepspeed"
        self.device = self.dist.device() if self.dist.enabled else default_device()
        self.compute_dtype = resolve_compute_dtype(cfg.train.dtype, self.device)

    # ---------------------------------------------------------------- setup
    def _check_template(self, rows: int = 8) -> None:
        """A named template against the tokenizer's own chat template, on the first rows."""
        data = self.cfg.data
        if data.template is None or data.template_check == "off" or not getattr(self.tokenizer, "chat_template", None):
            return
        from tuner.data.inspection import conversations, template_report_text
        from tuner.data.template_check import compare_templates
        from tuner.data.templates import get_template

        first = conversations(data, limit=rows, skip_bad=True)  # the data build reports bad rows
        if not first:  # pretraining text: no template is applied
            return
        report = compare_templates(get_template(data.template, self.tokenizer), self.tokenizer, first)
        if report.ok:
            self.info(f"Data: template {data.template!r} equals the tokenizer's own chat template: {report.summary()}")
            return
        text = f"template {data.template!r} differs from the tokenizer's own chat template: " + template_report_text(report)
        if data.template_check == "error":
            raise TunerError(text, hint="set data.template=None to train with the tokenizer's own template, "
                                        "or data.template_check='warn'")
        self.info(f"Warning: {text}")

    def _save_chat_template(self) -> None:
        """The exact template trained with, as Jinja, in the work dir (pth_to_hf writes it into outputs)."""
        from tuner.data.template_jinja import trained_chat_template

        template = trained_chat_template(self.cfg.data.template, self.tokenizer)
        if self.dist.is_main and template:
            (self.work_dir / "chat_template.jinja").write_text(template, encoding="utf-8")

    def setup(self) -> None:
        cfg = self.cfg
        stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
        self.run_dir = self.work_dir / stamp
        if self.dist.is_main:  # one process writes the logs and the work dir
            try:
                (self.run_dir / "vis_data").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TunerError(f"cannot write the work dir {self.work_dir}: {e.strerror or e}",
                                 hint="choose another --work-dir, or make this one writable") from None
            self.logger = file_logger(self.run_dir / f"{stamp}.log")
            config_copy = self.work_dir / f"{cfg.name}.py"
            if cfg.path.resolve() != config_copy.resolve():
                shutil.copyfile(cfg.path, config_copy)
            (self.work_dir / "resolved_config.py").write_text(cfg.resolved_text(), encoding="utf-8")
        else:
            self.logger = logging.getLogger("tuner.quiet")
            self.logger.addHandler(logging.NullHandler())
            self.logger.propagate = False
        self._seed_everything(cfg.train.seed)

        if cfg.llava is not None:
            model = self._setup_llava()
        else:
            self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
            self._check_template()
            self._save_chat_template()
            started = time.perf_counter()
            self.sequences, report = build_sequences(cfg.data, self.tokenizer, cfg.train.seed, say=self.info)
            self.info(f"Data: {report.summary()} ({time.perf_counter() - started:.1f}s)")
            for line in report.details().splitlines():
                self.info(f"Data: {line}")
            model = self._load_model()
        self.collate = getattr(self.sequences, "collate", collate)
        self.attention = packed_attention.use_for_training(model, cfg.model.attn_implementation, self.device)
        if cfg.data.pack and cfg.llava is None:
            packed_attention.check_packing(model, self.attention)
        converted = describe_conversion(cfg.model.path)
        if converted:
            self.info(f"Model: {converted}")
        if cfg.train.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) without hooks
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.llava is not None:
            model = self._llava_trainable(model)
        elif cfg.lora is not None:
            model = apply_lora(model, cfg.lora, quantized=cfg.model.quantization is not None)
        else:
            model = prepare_full(model, cfg.model.freeze)
        # FSDP and DeepSpeed gather and free weights around forward and backward: they keep peft's path.
        self.fused_lora = (fast_lora.enable(model, self.compute_dtype)  # (LoRA layers, SwiGLU MLPs)
                           if cfg.train.fused_lora and self.strategy in ("single", "ddp") else (0, 0))
        placed = cfg.model.quantization is not None or self.built_sharded  # (sharding places the weights)
        self.raw_model = model if placed else model.to(self.device)
        self.raw_model.train()
        # The loop calls self.model (wrapped for several processes); everything else uses raw_model.
        if self.strategy != "deepspeed":  # DeepSpeed wraps the model with its optimizer, below
            self.model = strategies.wrap(self.raw_model, self.strategy, self.device, from_rank0=self.built_sharded)
        base = self.raw_model.get_base_model() if hasattr(self.raw_model, "get_base_model") else self.raw_model
        self.model_takes_logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.fused_head = self._fused_head(base)
        trainable, total = count_parameters(self.raw_model)
        self.info(f"Model: {cfg.model.path} ({cfg.method}), {trainable:,} of {total:,} parameters trainable "
                  f"({100 * trainable / total:.2f}%), compute dtype {str(self.compute_dtype).replace('torch.', '')}, "
                  f"attention {self.attention}, {allocator.describe()}, "
                  + ("{} LoRA layers and {} MLPs fused, ".format(*self.fused_lora) if any(self.fused_lora) else "") +
                  f"device {self.device}" + (f", {self.dist.world_size} processes ({self.strategy.upper()})" if self.dist.enabled else ""))

        self._budget()
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg.optim, self.device)
        self.scaler = strategies.grad_scaler(self.device, self.compute_dtype, self.strategy)
        if self.strategy == "deepspeed":
            self.model = zero.initialize(self.raw_model, self.optimizer, self.ds_config)
        t = cfg.train
        self.schedule = StepSchedule(len(self.sequences), t.batch_size, t.accumulative_counts, t.seed, cfg.data.shuffle,
                                     self.dist.world_size)
        self.total_steps = self.schedule.steps_per_epoch * t.max_epochs
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        warmup = math.ceil(t.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.total_steps, warmup, t.scheduler))
        self.start_step = 0
        if self.resume:
            self._resume()

        # Every process takes part in saving (RNG states are gathered); the rest is the main process's.
        # Generating from a sharded model needs every process, so under FSDP / ZeRO-3 all of them evaluate.
        sharded = self.strategy == "fsdp" or (self.strategy == "deepspeed" and zero.is_stage3(self.model))
        evaluate = EvaluateChatHook(cfg.evaluate.inputs, cfg.evaluate.freq, cfg.evaluate.system,
                                    cfg.evaluate.max_new_tokens, cfg.evaluate.image)
        self.hooks = [CheckpointHook(cfg.checkpoint.save_steps, cfg.checkpoint.save_total_limit)]
        if self.dist.is_main:
            self.hooks = [LoggerHook(t.log_interval), *self.hooks, evaluate]
            if t.report_to:
                self.hooks.append(ReportHook(t.report_to))
            self.hooks += [h if hasattr(h, "after_iter") else FunctionHook(h) for h in cfg.custom_hooks]
        elif sharded:
            self.hooks.append(evaluate)

    def _setup_llava(self):
        """Tokenizer with <image>, the image data, and the LLaVA model (vision encoder + projector + LLM)."""
        from tuner.data.llava import build_image_sequences
        from tuner.model.llava import (
            build_llava,
            tokenizer_with_image_token,
            vision_info,
        )

        cfg = self.cfg
        self.tokenizer = tokenizer_with_image_token(cfg.model.path, cfg.model.trust_remote_code)
        vision = vision_info(cfg.llava, self.tokenizer)
        started = time.perf_counter()
        self.sequences = build_image_sequences(cfg.data, cfg.llava, self.tokenizer, vision, say=self.info,
                                               seed=cfg.train.seed)
        self.info(f"Data: ready in {time.perf_counter() - started:.1f}s")
        return build_llava(cfg.model, cfg.llava, self.tokenizer)

    def _llava_trainable(self, model):
        from tuner.model.llava import apply_llava_lora, load_projector, set_trainable

        cfg = self.cfg
        if cfg.llava.pretrained_pth:
            count = load_projector(model, cfg.llava.pretrained_pth)
            self.info(f"Model: projector ({count} tensors) loaded from {cfg.llava.pretrained_pth}")
        if cfg.lora is not None or cfg.llava.visual_encoder_lora is not None:
            model = apply_llava_lora(model, cfg)
        set_trainable(model, cfg.llava, cfg.lora is not None, cfg.llava.visual_encoder_lora is not None)
        model.save_trainable_only = True  # checkpoints hold the projector and adapters, not the frozen towers
        return model

    def _fused_head(self, base):
        """(model, head) when the chunked loss can stand in for the output head: one process or
        DDP (FSDP and ZeRO-3 shard the head's weight), a plain Linear head."""
        head = getattr(base, "lm_head", None)
        if (not self.cfg.train.chunked_loss or self.strategy not in ("single", "ddp")
                or not self.model_takes_logits_to_keep or type(head) is not torch.nn.Linear):
            return None
        return base, head

    def _load_model(self):
        """The base model, built so that a sharded run never holds the whole model on every device or in
        every process. FSDP: rank 0 reads the weights on CPU, the other ranks build the structure on the
        meta device, and strategies.wrap shards and hands rank 0's weights out. ZeRO-3: transformers builds
        the model partitioned (deepspeed.zero.Init) and loads each weight straight into its partitions;
        a full fine-tune loads in float32 there, as the master weights must be (a cast would miss them)."""
        cfg = self.cfg.model
        self.built_sharded = False
        if self.strategy == "deepspeed":
            self.ds_config = zero.ds_config(self.deepspeed, self.cfg, self.compute_dtype, self.info)
            if cfg.quantization is None and zero.stage(self.ds_config) == 3:
                with zero.partitioned_construction(self.ds_config):
                    model = load_model(cfg, "cpu", dtype=torch.float32 if self.cfg.lora is None else None)
                self.built_sharded = True
                self.info(f"Model: built partitioned over {self.dist.world_size} processes (ZeRO-3)")
                return model
        if self.strategy == "fsdp" and cfg.quantization is None:
            self.built_sharded = True
            model = load_model(cfg, "cpu", meta=not self.dist.is_main)
            self.info(f"Model: weights read by rank 0 only, the other {self.dist.world_size - 1} build it on the "
                      "meta device; FSDP hands out the shards")
            return model
        return load_model(cfg, self.device)

    def _budget(self) -> None:
        """Memory estimate before training (a warning when it will not fit), and the FLOPs
        per token and machine peak that tokens/s are turned into MFU with."""
        cfg, t = self.cfg, self.cfg.train
        tokens = t.batch_size * cfg.data.max_length
        eight_bit = cfg.optim.name.endswith("8bit")
        estimate = estimate_memory(self.raw_model, tokens, t.gradient_checkpointing,
                                   self.compute_dtype.itemsize, 2 if eight_bit else 8)
        available = available_memory(self.device)
        self.info(f"Model: {estimate.describe()}; {available / 2**30:.1f} GiB available on {self.device}")
        if estimate.total > available:
            self.info("WARNING: the estimate exceeds the available memory: lower train.batch_size or "
                      "data.max_length, or set train.gradient_checkpointing=True")
        self.flops_per_token = flops_per_token(self.raw_model, cfg.lora is not None)
        self.peak_flops = matmul_peak_flops(self.device, self.compute_dtype) if self.dist.is_main else 0.0

    def info(self, message: str) -> None:
        if self.dist.is_main:
            self.logger.info(message)
            console.print(f"[tuner] {message}", markup=False, highlight=False, soft_wrap=True)

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def state_dict(self, step: int) -> dict:
        """What a checkpoint holds. Called on every process: each one's RNG state is gathered."""
        rng = self.dist.gather(ckpt.rng_state())
        if self.strategy == "deepspeed":  # ZeRO-partitioned optimizer states: DeepSpeed saves them
            self.model.save_checkpoint(str(self.work_dir / f"iter_{step}_deepspeed"), tag="state")
            weights = zero.full_parameters(self.raw_model, trainable_only=self.cfg.lora is not None)
            model, optimizer = strategies.model_state_from(self.raw_model, weights), None
        else:
            model = strategies.model_state(self.raw_model, sharded=self.strategy == "fsdp")
            optimizer = strategies.optimizer_state(self.raw_model, self.optimizer)
        return {"step": step, "method": self.cfg.method, "config": self.cfg.name, "model": model,
                "optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng, "world_size": self.dist.world_size}

    def _resume(self) -> None:
        path = ckpt.find_resume(self.resume, self.work_dir)
        if path is None:
            self.info(f"--resume auto: no checkpoint in {self.work_dir}, starting from scratch")
            return
        state = ckpt.load_checkpoint(path)
        if state.get("method") != self.cfg.method:
            raise TunerError(f"{path} is a {state.get('method')} checkpoint but the config trains {self.cfg.method}")
        if self.strategy == "deepspeed":
            folder = path.with_name(path.stem + "_deepspeed")
            if not folder.is_dir():
                raise TunerError(f"{folder} is missing: a DeepSpeed run resumes from a DeepSpeed checkpoint")
            self.model.load_checkpoint(str(folder), tag="state", load_module_strict=False,
                                       load_lr_scheduler_states=False)
        elif state["optimizer"] is None:
            raise TunerError(f"{path} was written by DeepSpeed: resume it with --deepspeed")
        else:
            strategies.load_model_state(self.raw_model, state["model"], sharded=self.strategy == "fsdp")
            strategies.load_optimizer_state(self.raw_model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) != self.dist.world_size:
            self.info(f"the checkpoint was written by {len(rng)} processes and this run has "
                      f"{self.dist.world_size}: the data order is kept, random states (dropout) start anew")
        else:
            ckpt.set_rng_state(rng[self.dist.rank])
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
            micro_batches = self.schedule.micro_batches(step, self.dist.rank)
            # An empty micro-batch (the last step's remainder on some ranks) runs sequence 0 with weight 0.
            weights = [1.0 if idx else 0.0 for idx in micro_batches]
            batches = [self.collate([self.sequences[i] for i in idx or [0]], self.tokenizer.pad_token_id)
                       for idx in micro_batches]
            # Token-weighted loss: every trained token of the whole step (all micro-batches, all
            # processes) counts the same. DDP averages gradients over processes, hence * world_size.
            local_tokens = sum(w * int((b["labels"][:, 1:] != IGNORE).sum()) for w, b in zip(weights, batches))
            # With it, whether a signal asks to stop: decided together, so every process stops after the same step.
            n_tokens, stopping = self.dist.sum(local_tokens, 1.0 if stop else 0.0)
            if stopping and step > self.start_step:
                self._stop(step, stop.get("signal", signal.SIGTERM))
            n_tokens = max(n_tokens, 1)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: no sync
            for j, (weight, batch) in enumerate(zip(weights, batches)):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                if self.strategy == "deepspeed":  # DeepSpeed syncs, clips and steps at the last micro-batch
                    # A step may hold fewer micro-batches than gradient_accumulation_steps (the end of an
                    # epoch): say where the step ends instead of letting DeepSpeed count.
                    self.model.set_gradient_accumulation_boundary(j == len(batches) - 1)
                    loss = self.loss_sum(batch) * (weight * self.dist.world_size / n_tokens)
                    self.model.backward(loss, scale_wrt_gas=False)
                    self.model.step()
                else:
                    with strategies.no_sync(self.model, self.strategy, last=j == len(batches) - 1):
                        loss = self.loss_sum(batch) * (weight * self.dist.world_size / n_tokens)
                        self.scaler.scale(loss).backward()  # fp16: scaled so small gradients do not underflow
                loss_sum += loss.detach().double() / self.dist.world_size
            # One all-reduce for what the step's end needs from every process: the loss and the real tokens
            # (padding is not throughput).
            real_tokens = sum(self.sequences.num_tokens(i) for idx in micro_batches for i in idx)
            loss_sum, real_tokens = self.dist.sum(loss_sum, real_tokens)
            real_tokens = int(real_tokens)
            if not math.isfinite(loss_sum):
                self._bad_step(step + 1, f"the loss is {loss_sum}")  # raises, or skips this update
                losses.append(loss_sum)
                continue
            if self.strategy == "deepspeed":  # ZeRO has stepped already, skipping a non-finite gradient itself
                grad_norm = float(self.model.get_global_grad_norm() or 0.0)
            else:
                self.scaler.unscale_(self.optimizer)  # fp16: clip and report the true gradient
                grad_norm = self.clip_gradients()
            if not math.isfinite(grad_norm):
                if self.scaler.is_enabled():  # an fp16 overflow: the scaler skips the update and lowers its scale
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    self.info(f"step {step + 1}: fp16 gradients overflowed; update skipped, loss scale now "
                              f"{self.scaler.get_scale():g}")
                else:
                    self._bad_step(step + 1, f"the gradient norm is {grad_norm} (the loss, {loss_sum:.4g}, is finite)")
                losses.append(loss_sum)
                continue
            if self.strategy != "deepspeed":
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()

            elapsed = time.perf_counter() - started
            tokens_per_s = real_tokens / elapsed
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size or 1)
            metrics = {"loss": loss_sum, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens": real_tokens, "tokens_per_s": tokens_per_s, "mfu": mfu, "step_time": elapsed}
            losses.append(loss_sum)
            for hook in self.hooks:
                hook.after_iter(self, step + 1, metrics)
        for hook in self.hooks:
            hook.after_train(self)
        return losses

    def _bad_step(self, step: int, what: str) -> None:
        if self.cfg.train.nan_policy == "stop":
            raise TunerError(f"{what} at step {step}; training stopped",
                             hint="lower optim.lr or check the data (tuner log-dataset CFG); "
                                  "resume from the last good checkpoint with --resume auto, or set "
                                  "train.nan_policy=skip to skip such steps")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule stays aligned with the data
        self.info(f"step {step}: {what}; this update was skipped (train.nan_policy=skip)")

    def _stop(self, step: int, signal_number: int) -> None:
        """A signal arrived: keep the work done so far, then exit saying how to go on."""
        path = self.work_dir / f"iter_{step}.pth"
        if not path.exists():
            save_checkpoint_or_explain(self, step)
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
        if "pixel_values" in batch:  # LLaVA: the images of the batch, in the order of their tokens
            kwargs["pixel_values"] = batch["pixel_values"]
        if self.attention in (packed_attention.NAME, "flash_attention_2"):  # sample starts, once for all layers
            kwargs.update(packed_attention.varlen_kwargs(batch["position_ids"]))
        if self.fused_head is not None:  # the model returns hidden states; the head runs in the loss, in chunks
            base, head = self.fused_head
            base.lm_head = torch.nn.Identity()
            try:
                with autocast(self.device, self.compute_dtype):
                    hidden = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                        use_cache=False, **kwargs).logits
            finally:
                base.lm_head = head
            return chunked_linear_cross_entropy(hidden, head.weight, targets[:, keep], compute_dtype=self.compute_dtype)
        with autocast(self.device, self.compute_dtype):
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                                **kwargs).logits
        if "logits_to_keep" in kwargs:
            targets = targets[:, keep]
        else:
            logits = logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    def clip_gradients(self) -> float:
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        max_norm = self.cfg.optim.max_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded DTensor
