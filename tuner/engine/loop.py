"""The training loop: one loop for full fine-tuning, LoRA and QLoRA.

Read `Trainer.train` top to bottom: fetch the step's micro-batches, forward, token-weighted
loss, backward, clip, step, schedule, hooks. Everything else is setup.
"""

from __future__ import annotations

import contextlib
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

from tuner.config import Config
from tuner.engine import allocator, build
from tuner.engine import checkpoint as ckpt
from tuner.engine import strategy as strategies
from tuner.engine.batches import StepBatches, StepSchedule, step_batches
from tuner.engine.budget import (
    available_memory,
    estimate_memory,
    flops_per_token,
    matmul_peak,
)
from tuner.engine.dist import Distributed
from tuner.engine.hooks import (
    CheckpointHook,
    BenchmarkHook,
    EvaluateChatHook,
    FunctionHook,
    LoggerHook,
    ReportHook,
    console,
    file_logger,
    save_checkpoint_or_explain,
)
from tuner.engine.objective import objective_for
from tuner.engine.optim import build_optimizer, lr_lambda
from tuner.engine.runstate import RunState, describe_method
from tuner.errors import Interrupted, TunerError
from tuner.model import fast_lora
from tuner.model.adapt import count_parameters
from tuner.model.device import default_device, resolve_compute_dtype
from tuner.model.load import own_memory
from tuner.model.logps import takes_logits_to_keep


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


class Trainer:
    def __init__(self, cfg: Config, work_dir: str | Path | None = None, resume: str | None = None,
                 seed: int | None = None, fsdp: bool = False, deepspeed: str | None = None):
        self.cfg = cfg
        if seed is not None:
            cfg.train.seed = seed
        self.work_dir = Path(work_dir or Path("work_dirs") / cfg.name)
        self.resume = resume
        self.dist = Distributed()
        # How the model is spread over processes: wrapping, syncing, the step and checkpoint state
        self.strategy = strategies.choose(self.dist.enabled, fsdp, deepspeed)
        self.built_sharded = False  # the model was built already sharded (see Strategy.load_model)
        self.seqpar = None  # sequence parallelism: groups of processes sharing each row (engine/seqpar.py)
        self.device = self.dist.device() if self.dist.enabled else default_device()
        self.compute_dtype = resolve_compute_dtype(cfg.train.dtype, self.device)

    # ---------------------------------------------------------------- setup
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
            self.run_state = RunState(self.run_dir, config=cfg.name, config_path=str(cfg.path), model=cfg.model.path,
                                      method=describe_method(cfg), total_steps=None, start_step=0)
            self.run_state.write()
            config_copy = self.work_dir / f"{cfg.name}.py"
            if cfg.path.resolve() != config_copy.resolve():
                shutil.copyfile(cfg.path, config_copy)
            (self.work_dir / "resolved_config.py").write_text(cfg.resolved_text(), encoding="utf-8")
        else:
            self.logger = logging.getLogger("tuner.quiet")
            self.logger.addHandler(logging.NullHandler())
            self.logger.propagate = False
        self._seed_everything(cfg.train.seed)

        if cfg.train.sequence_parallel_size > 1:
            from tuner.engine.seqpar import SequenceParallel
            self.seqpar = SequenceParallel(cfg.train.sequence_parallel_size, self.dist)
        self.strategy.configure(cfg, self.compute_dtype, self.info)  # (LLaVA runs build no text model)
        run = build.build_run(cfg, self.strategy, self.device, self.dist, self.work_dir, self.info)
        self.tokenizer, self.sequences, self.collate = run.tokenizer, run.sequences, run.collate
        self.attention, self.built_sharded, model = run.attention, run.built_sharded, run.model
        if self.seqpar is not None:  # the attention exchanges heads for tokens around itself (Ulysses)
            from tuner.model import ulysses
            ulysses.check_model(model, self.seqpar.size)
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.set_attn_implementation(ulysses.register(inner=self.attention))
            self.attention = ulysses.NAME
        self.fused_lora = (fast_lora.enable(model, self.compute_dtype)  # (LoRA layers, SwiGLU MLPs)
                           if cfg.train.fused_lora and self.strategy.plain_modules else (0, 0))
        placed = cfg.model.quantization is not None or self.built_sharded  # (sharding places the weights)
        self.raw_model = model if placed else model.to(self.device)
        if self.device.type == "cpu":  # (on a GPU the weights were copied to it: the file is unmapped)
            own_memory(self.raw_model)
        self.raw_model.train()
        # The loop calls self.model (wrapped for several processes); everything else uses raw_model.
        self.model = self.strategy.wrap(self.raw_model, self.device, self.built_sharded)
        base = self.raw_model.get_base_model() if hasattr(self.raw_model, "get_base_model") else self.raw_model
        self.model_takes_logits_to_keep = takes_logits_to_keep(base)
        self.fused_head = self._fused_head(base)
        self.objective = objective_for(cfg)(self.device, self.compute_dtype, self.attention,
                                            self.model_takes_logits_to_keep, self.fused_head)
        trainable, total = count_parameters(self.raw_model)
        self.info(f"Model: {cfg.model.path} ({cfg.method}), {trainable:,} of {total:,} parameters trainable "
                  f"({100 * trainable / total:.2f}%), compute dtype {str(self.compute_dtype).replace('torch.', '')}, "
                  f"attention {self.attention}, {allocator.describe()}, "
                  + ("{} LoRA layers and {} MLPs fused, ".format(*self.fused_lora) if any(self.fused_lora) else "") +
                  f"device {self.device}" + (f", {self.dist.world_size} processes ({self.strategy.name.upper()})" if self.dist.enabled else ""))

        self._budget()
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, cfg.optim, self.device)
        self.scaler = self.strategy.grad_scaler(self.device, self.compute_dtype)
        self.model = self.strategy.with_optimizer(self.raw_model, self.optimizer, self.model)
        t = cfg.train
        if cfg.rl is not None:  # online RL: a step's prompts, whose completions fill its micro-batches
            from tuner.engine.grpo import PromptSchedule
            per_step = t.batch_size * t.accumulative_counts * self.dist.world_size // cfg.rl.num_generations
            self.schedule = PromptSchedule(len(self.sequences), per_step, cfg.rl.num_iterations, t.seed,
                                           cfg.data.shuffle, self.dist.world_size)
        else:  # (with sequence parallelism, a group of processes shares each micro-batch)
            self.schedule = StepSchedule(len(self.sequences), t.batch_size, t.accumulative_counts, t.seed,
                                         cfg.data.shuffle, self.data_world)
        self.total_steps = self.schedule.steps_per_epoch * t.max_epochs
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        warmup = math.ceil(t.warmup_ratio * self.total_steps)
        workers = t.dataloader_num_workers
        self.dataloader_workers = workers if workers is not None else 2 if self.device.type == "cuda" else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.total_steps, warmup, t.scheduler))
        self.objective.prepare(self)  # (DPO: its reference, of the model as it starts)
        self.start_step = 0
        if self.resume:
            self._resume()

        # Every process takes part in saving (RNG states are gathered); the rest is the main process's.
        # Generating from a sharded model needs every process, so under FSDP / ZeRO-3 all of them evaluate.
        sharded = self.strategy.sharded(self.model)
        if cfg.head == "reward" and cfg.evaluate.inputs:
            self.info("Evaluate-chat: off, a reward model scores answers and does not write them")
        inputs = cfg.evaluate.inputs if cfg.head == "lm" else []
        evaluate = EvaluateChatHook(inputs, cfg.evaluate.freq, cfg.evaluate.system, cfg.evaluate.max_new_tokens,
                                    cfg.evaluate.image)
        self.hooks = [CheckpointHook(cfg.checkpoint.save_steps, cfg.checkpoint.save_total_limit)]
        if cfg.evaluate.tasks and self.strategy.sharded(self.model):
            raise TunerError("evaluate.tasks runs lm-eval on one process, which holds only its shard of the model "
                             "under --fsdp or ZeRO-3", hint="leave evaluate.tasks empty and run tuner eval on the "
                                                            "model after tuner convert pth_to_hf")
        if self.dist.is_main:
            self.hooks = [LoggerHook(t.log_interval), *self.hooks, evaluate]
            if cfg.evaluate.tasks and cfg.head == "lm" and cfg.llava is None:
                self.hooks.append(BenchmarkHook(cfg.evaluate.tasks, cfg.evaluate.tasks_limit,
                                                self.work_dir / "eval_tasks"))
            if t.report_to:
                self.hooks.append(ReportHook(t.report_to))
            self.hooks += [h if hasattr(h, "after_iter") else FunctionHook(h) for h in cfg.custom_hooks]
        elif sharded:
            self.hooks.append(evaluate)

    def _fused_head(self, base):
        """(model, head) when the chunked loss can stand in for the output head: one process or
        DDP (FSDP and ZeRO-3 shard the head's weight), a plain Linear head."""
        head = getattr(base, "lm_head", None)
        if (not self.cfg.train.chunked_loss or not self.strategy.plain_modules
                or not self.model_takes_logits_to_keep or type(head) is not torch.nn.Linear):
            return None
        return base, head

    def _budget(self) -> None:
        """Memory estimate before training (a warning when it will not fit), and the FLOPs
        per token and machine peak that tokens/s are turned into MFU with."""
        cfg, t = self.cfg, self.cfg.train
        tokens = t.batch_size * cfg.row_tokens()
        eight_bit = cfg.optim.name.endswith("8bit")
        estimate = estimate_memory(self.raw_model, tokens, t.gradient_checkpointing,
                                   self.compute_dtype.itemsize, 2 if eight_bit else 8)
        available = available_memory(self.device)
        self.info(f"Model: {estimate.describe()}; {available / 2**30:.1f} GiB available on {self.device}")
        if estimate.total > available:
            self.info("WARNING: the estimate exceeds the available memory: lower train.batch_size or "
                      "data.max_length, or set train.gradient_checkpointing=True")
        self.flops_per_token = flops_per_token(self.raw_model, cfg.lora is not None)
        self.peak_flops, self.peak_raised = 0.0, False
        if self.dist.is_main:
            peak = matmul_peak(self.device, self.compute_dtype)
            self.peak_flops = peak.flops
            self.info(f"MFU: against a matmul peak of {peak.describe()}")

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
        model, optimizer = self.strategy.checkpoint_state(self.raw_model, self.model, self.optimizer, self.work_dir,
                                                          step, lora=self.cfg.lora is not None)
        return {"step": step, "method": self.cfg.method, "config": self.cfg.name, "model": model,
                "optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng, "world_size": self.dist.world_size, "sequences_per_step": self.schedule.per_step,
                "objective": self.objective.state_dict() if hasattr(self.objective, "state_dict") else {}}

    def _resume(self) -> None:
        path = ckpt.find_resume(self.resume, self.work_dir)
        if path is None:
            self.info(f"--resume auto: no checkpoint in {self.work_dir}, starting from scratch")
            return
        state = ckpt.load_checkpoint(path)
        if state.get("method") != self.cfg.method:
            raise TunerError(f"{path} is a {state.get('method')} checkpoint but the config trains {self.cfg.method}")
        self.strategy.load_checkpoint_state(self.raw_model, self.model, self.optimizer, state, path)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rng) != self.dist.world_size:
            self._check_world_size(path, len(rng), state.get("sequences_per_step"))
        else:
            ckpt.set_rng_state(rng[self.dist.rank])
        if hasattr(self.objective, "load_state_dict"):  # (RL: the rollout its next steps still train on)
            self.objective.load_state_dict(state.get("objective") or {})
        self.start_step = state["step"]
        self.info(f"Resumed from {path} at step {self.start_step}")

    def _check_world_size(self, path: Path, saved_world: int, saved_per_step: int | None) -> None:
        """Another number of processes than the checkpoint's: the steps go on as they were only when a step
        still holds as many sequences (processes x batch x accumulation); else refused, as the step count and
        which sequences each step trains on would change under the resumed run."""
        t = self.cfg.train
        if saved_per_step is None:  # (written before tuner saved it: the config's batch and accumulation)
            saved_per_step = saved_world * t.batch_size * t.accumulative_counts
        if saved_per_step != self.schedule.per_step:
            raise TunerError(
                f"{path} was written by {saved_world} processes with {saved_per_step} sequences per step; this run has "
                f"{self.dist.world_size} x batch {t.batch_size} x accumulation {t.accumulative_counts} = "
                f"{self.schedule.per_step}: the steps would hold other sequences and the step count would change",
                hint=f"resume with NPROC_PER_NODE={saved_world}, or set train.batch_size and "
                     f"train.accumulative_counts so that processes x batch x accumulation = {saved_per_step}")
        self.info(f"the checkpoint was written by {saved_world} processes and this run has {self.dist.world_size}, "
                  f"with the same {saved_per_step} sequences per step: the data order and step count are kept; "
                  "random states (dropout) start anew")

    # ---------------------------------------------------------------- the loop
    def train(self) -> list[float]:
        """Run to `total_steps`; returns the loss of each step run (set up first, unless `setup` ran). run.json
        in the run folder says how it ended (tuner/engine/runstate.py)."""
        try:
            if not getattr(self, "hooks", None):
                self.setup()
            self._run_state(total_steps=self.total_steps, start_step=self.start_step)
            with stop_on_signals() as stop:
                losses = self._train(stop)
        except Interrupted as e:
            step = getattr(e, "step", None)
            self._run_state("stopped", checkpoint=str(self.work_dir / f"iter_{step}.pth") if step is not None else None,
                            error=str(e))
            self._plot()
            raise
        except BaseException as e:
            self._run_state("crashed", error=f"{type(e).__name__}: {e}"[:2000])
            for hook in getattr(self, "hooks", []):
                if hasattr(hook, "after_crash"):  # (custom hooks may have only after_iter)
                    hook.after_crash(self)
            raise
        self._run_state("finished")
        self._plot()
        return losses

    def _plot(self) -> None:
        """loss.png (metrics.png) in the work dir, named in the log's last line; never fails the run."""
        if not self.dist.is_main:
            return
        try:
            from tuner.engine.plot import plot_run

            figures = plot_run(self.work_dir, f"{self.cfg.name} ({describe_method(self.cfg)})")
        except Exception as e:  # noqa: BLE001 - a figure is not worth a failed run
            self.info(f"no loss.png: {type(e).__name__}: {e}")
            return
        if figures:
            self.info("Curves: " + ", ".join(str(f) for f in figures))

    def _run_state(self, state: str | None = None, **changes) -> None:
        run_state = getattr(self, "run_state", None)  # (the main process's, once setup made the run folder)
        if run_state is not None:
            run_state.write(state, **changes)

    def _train(self, stop: dict) -> list[float]:
        losses = []
        for hook in self.hooks:
            hook.before_train(self)
        rollouts = hasattr(self.objective, "step_data")  # online RL: the objective samples each step's data
        steps = None if rollouts else step_batches(
            StepBatches(self.schedule, self.sequences, self.collate, self.tokenizer.pad_token_id, self.data_rank,
                        self.objective.units), self.start_step, self.total_steps, self.dataloader_workers,
            pin=self.device.type == "cuda")
        group_size = self.seqpar.size if self.seqpar is not None else 1  # (processes that count the same tokens)
        for step in range(self.start_step, self.total_steps):
            started = time.perf_counter()
            data = self.objective.step_data(self, step) if rollouts else next(steps)
            # Token-weighted loss: every trained token of the whole step (all micro-batches, all
            # processes) counts the same. DDP averages gradients over processes, hence * world_size.
            # With it, whether a signal asks to stop: decided together, so every process stops after the same step.
            n_tokens, stopping = self.dist.sum(data.trained_tokens, 1.0 if stop else 0.0)
            if stopping and step > self.start_step:
                self._stop(step, stop.get("signal", signal.SIGTERM))
            n_tokens = max(n_tokens / group_size, 1)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on the device: no sync
            figures = {}  # the objective's own, per unit (preference: rewards, margins, accuracy)
            for j, (weight, batch) in enumerate(zip(data.weights, data.batches)):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                with self.strategy.micro_batch(self.model, last=j == len(data.batches) - 1), \
                        self.piece_of(batch) as batch:  # (sequence parallel: backward too, which may recompute)
                    loss = self.loss_sum(batch) * (weight * self.dist.world_size / n_tokens)
                    self.strategy.backward(self.model, loss, self.scaler)
                loss_sum += loss.detach().double() / self.dist.world_size
                for name, value in self.objective.metrics.items():
                    figures[name] = figures.get(name, 0.0) + weight * value
            # One all-reduce for what the step's end needs from every process: the loss and the real tokens
            # (padding is not throughput).
            loss_sum, real_tokens, *totals = self.dist.sum(loss_sum, data.real_tokens, *figures.values())
            figures = {name: total / n_tokens for name, total in zip(figures, totals)}
            if hasattr(self.objective, "step_figures"):  # (RL: rewards, lengths, KL, clipping: its own averages)
                figures.update(self.objective.step_figures(self.dist))
            real_tokens = int(real_tokens / group_size)
            if not math.isfinite(loss_sum):
                self._bad_step(step + 1, f"the loss is {loss_sum}")  # raises, or skips this update
                losses.append(loss_sum)
                continue
            grad_norm = self.strategy.gradient_norm(self.model, self.raw_model, self.optimizer, self.scaler,
                                                    self.cfg.optim.max_norm)  # clipped, of the true gradient
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
            self.strategy.update(self.optimizer, self.scaler)
            self.scheduler.step()

            elapsed = time.perf_counter() - started
            tokens_per_s = real_tokens / elapsed
            mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size or 1)
            if mfu > 1 and self.dist.is_main and not self.peak_raised:  # (a peak measured while the machine was busy)
                self.peak_raised = True
                peak = matmul_peak(self.device, self.compute_dtype,
                                   at_least=tokens_per_s * self.flops_per_token / self.dist.world_size)
                self.peak_flops = peak.flops
                self.info(f"MFU: step {step + 1} ran faster than the cached matmul peak; peak now {peak.describe()}")
                mfu = tokens_per_s * self.flops_per_token / (self.peak_flops * self.dist.world_size)
            metrics = {"loss": loss_sum, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens": real_tokens, "tokens_per_s": tokens_per_s, "mfu": mfu, "step_time": elapsed,
                       **figures}
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
        stopped = Interrupted(f"stopped by {name} after step {step} of {self.total_steps}; checkpoint {path}\n"
                              f"  resume with: tuner train {self.cfg.path} --work-dir {self.work_dir} --resume auto",
                              signal_number)
        stopped.step = step
        raise stopped

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's summed loss of one micro-batch (tuner/engine/objective.py)."""
        return self.objective(self.model, batch)

    @contextlib.contextmanager
    def piece_of(self, batch: dict[str, torch.Tensor]):
        """The micro-batch as this process trains it: whole, or with sequence parallelism its piece of every row,
        the attention sharded over the group while inside (the backward too: gradient checkpointing runs the
        forward again there)."""
        if self.seqpar is None:
            yield batch
            return
        from tuner.model import ulysses
        piece, positions = self.seqpar.shard(batch, self.tokenizer.pad_token_id)
        with ulysses.active(self.seqpar.group, self.seqpar.size, positions):
            yield piece

    @property
    def data_rank(self) -> int:
        """This process's place among the data-parallel processes (a sequence-parallel group is one)."""
        return self.seqpar.data_rank if self.seqpar is not None else self.dist.rank

    @property
    def data_world(self) -> int:
        return self.seqpar.data_world if self.seqpar is not None else self.dist.world_size
