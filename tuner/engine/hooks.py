"""Side work that hangs off the loop's named points: logging, checkpoints, evaluate-chat.

A hook is any object with some of `before_train(trainer)`, `after_iter(trainer, step, metrics)`
and `after_train(trainer)`; a plain function in `custom_hooks` is called after every step.
"""

from __future__ import annotations

import json
import logging
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from tuner.engine.checkpoint import LAST, save_checkpoint
from tuner.errors import TunerError
from tuner.generation.generate import GenerationSettings, Generator

console = Console(stderr=True)


class Hook:
    def before_train(self, trainer) -> None: ...
    def after_iter(self, trainer, step: int, metrics: dict) -> None: ...
    def after_train(self, trainer) -> None: ...
    def after_crash(self, trainer) -> None: ...  # (the training raised: an error, not a signal)


class FunctionHook(Hook):
    def __init__(self, fn):
        self.fn = fn

    def after_iter(self, trainer, step, metrics):
        self.fn(trainer, step, metrics)


class LoggerHook(Hook):
    """Progress bar on the terminal, lines in the log file, one JSON line per step in scalars.json."""

    def __init__(self, interval: int):
        self.interval = interval
        self.progress = None

    def before_train(self, trainer):
        self.scalars = open(trainer.run_dir / "vis_data" / "scalars.json", "a", encoding="utf-8")
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.task = self.progress.add_task("train", total=trainer.total_steps, completed=trainer.start_step, status="")
        self.progress.start()

    def after_iter(self, trainer, step, metrics):
        self.scalars.write(json.dumps({"step": step, **metrics}) + "\n")
        self.scalars.flush()
        status = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:.0f} tok/s"
        self.progress.update(self.task, completed=step, status=status)
        if step % self.interval == 0 or step == trainer.total_steps:
            line = (f"Iter(train) [{step}/{trainer.total_steps}]  lr: {metrics['lr']:.4e}  loss: {metrics['loss']:.4f}  "
                    f"grad_norm: {metrics['grad_norm']:.4f}  tokens/s: {metrics['tokens_per_s']:.1f}  "
                    f"mfu: {metrics['mfu']:.1%} of {trainer.peak_flops / 1e9:,.0f} GFLOP/s  "
                    f"time: {metrics['step_time']:.3f}s")
            if "rewards/chosen" in metrics:  # preference training
                line += (f"  rewards chosen / rejected: {metrics['rewards/chosen']:.4f} / "
                         f"{metrics['rewards/rejected']:.4f}  margin: {metrics['rewards/margins']:.4f}")
                if "rewards/accuracies" in metrics:
                    line += f"  accuracy: {metrics['rewards/accuracies']:.1%}"
                if "kl" in metrics:  # KTO's estimate
                    line += f"  kl: {metrics['kl']:.4f}"
            if "reward" in metrics:  # online RL: the rollout's rewards and lengths, and where the time went
                line += (f"  reward: {metrics['reward']:.4f} (std {metrics['reward_std']:.4f})  completion length: "
                         f"{metrics['completions/mean_length']:.1f}")
                if "kl" in metrics:
                    line += f"  kl: {metrics['kl']:.4f}"
                if "time/rollout" in metrics:
                    line += (f"  rollout {metrics['time/rollout']:.2f}s reward {metrics['time/reward']:.2f}s "
                             f"train {metrics['step_time'] - metrics['time/rollout'] - metrics['time/reward']:.2f}s")
            trainer.logger.info(line)
            if not console.is_terminal:  # the bar is not drawn into pipes and files: print the line
                console.print(line, highlight=False, soft_wrap=True)

    def after_train(self, trainer):
        if self.progress:
            self.progress.stop()
            self.scalars.close()


class CheckpointHook(Hook):
    def __init__(self, save_steps: int, keep: int):
        self.save_steps, self.keep = save_steps, keep

    def after_iter(self, trainer, step, metrics):
        if step % self.save_steps == 0 or step == trainer.total_steps:
            save_checkpoint_or_explain(trainer, step, self.keep)


def save_checkpoint_or_explain(trainer, step: int, keep: int | None = None):
    """Save iter_N.pth; a failed save (disk full, say) stops training with the last good checkpoint named."""
    keep = trainer.cfg.checkpoint.save_total_limit if keep is None else keep
    state = trainer.state_dict(step)  # every process: gathers RNG states
    if not trainer.dist.is_main:
        trainer.dist.barrier()
        return None
    try:
        path = save_checkpoint(trainer.work_dir, step, state, keep)
    except OSError as e:
        last = trainer.work_dir / LAST
        previous = last.read_text().strip() if last.exists() else "none"
        raise TunerError(f"could not write the checkpoint of step {step} in {trainer.work_dir}: "
                         f"{e.strerror or e}; the last good checkpoint ({previous}) is intact") from None
    trainer.logger.info(f"Saved checkpoint {path}")
    trainer.dist.barrier()
    return path


class EvaluateChatHook(Hook):
    """Answers the config's evaluation inputs (greedy) before training and every `freq` steps."""

    def __init__(self, inputs: list[str], freq: int, system: str | None, max_new_tokens: int,
                 image: str | None = None):
        self.inputs, self.freq, self.system, self.image = inputs, freq, system, image
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)

    def _run(self, trainer, step: int) -> None:
        if not self.inputs:
            return
        started = time.perf_counter()
        generator = Generator(trainer.raw_model, trainer.tokenizer, trainer.cfg.data.template,
                              compute_dtype=trainer.compute_dtype)
        generator.vision = getattr(trainer.sequences, "vision", None)  # LLaVA
        image = self._image() if generator.vision is not None and self.image else None
        blocks = []
        for question in self.inputs:
            messages = ([{"role": "system", "content": self.system}] if self.system else [])
            messages.append({"role": "user", "content": question})
            if image is not None:
                messages[-1] = {"role": "user", "content": "<image>\n" + question, "images": [image]}
            answer = generator.reply(messages, self.settings)
            blocks.append(f"### Q: {question}\n### A: {answer.strip()}\n")
        if not trainer.dist.is_main:
            return
        text = f"Evaluate-chat at iter {step}\n\n" + "\n".join(blocks)
        (trainer.work_dir / f"eval_outputs_iter_{step}.txt").write_text(text, encoding="utf-8")
        trainer.logger.info(text.rstrip() + f"\n(evaluate-chat took {time.perf_counter() - started:.1f}s)")

    def _image(self):
        from PIL import Image
        try:
            return Image.open(self.image).convert("RGB")
        except OSError as e:
            raise TunerError(f"evaluate.image {self.image}: {e}") from None

    def before_train(self, trainer):
        if trainer.start_step == 0:
            self._run(trainer, 0)

    def after_iter(self, trainer, step, metrics):
        if step % self.freq == 0 or step == trainer.total_steps:
            self._run(trainer, step)


class BenchmarkHook(Hook):
    """lm-evaluation-harness tasks (evaluate.tasks) on the trained model once training has reached its last
    step: the table in the log and eval_tasks.txt, lm-eval's results in eval_tasks.json."""

    def __init__(self, tasks: list[str], limit: int | None, folder):
        from tuner.generation import benchmark

        self.tasks, self.limit, self.finished = tasks, limit, False
        self.manager = benchmark.task_manager(None, folder, tasks)  # (also: lm-eval is installed, the names known)
        benchmark.check_tasks(self.manager, tasks)

    def after_iter(self, trainer, step, metrics):
        self.finished = step == trainer.total_steps

    def after_train(self, trainer):
        if not self.finished:  # (stopped by a signal: the checkpoint is what counts, quickly)
            return
        from lm_eval.utils import make_table

        from tuner.generation import benchmark

        started = time.perf_counter()
        results = benchmark.run_tasks(trainer.raw_model, trainer.tokenizer, self.tasks, self.manager, self.limit)
        table = make_table(results)
        benchmark.write_results(results, trainer.work_dir / "eval_tasks.json")
        (trainer.work_dir / "eval_tasks.txt").write_text(table + "\n", encoding="utf-8")
        trainer.info(f"lm-eval on the trained model ({time.perf_counter() - started:.0f}s; "
                            f"eval_tasks.json):\n{table}")


class ReportHook(Hook):
    """Per-step scalars to the trackers in train.report_to (engine/trackers.py)."""

    def __init__(self, targets: list[str]):
        self.targets = targets
        self.trackers = []

    def before_train(self, trainer):
        from tuner.engine.trackers import open_tracker

        self.trackers = [open_tracker(name, trainer.cfg, trainer.run_dir, trainer.info) for name in self.targets]

    def after_iter(self, trainer, step, metrics):
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def after_train(self, trainer):
        for tracker in self.trackers:
            tracker.close(failed=False)
        self.trackers = []

    def after_crash(self, trainer):
        for tracker in self.trackers:
            try:
                tracker.close(failed=True)
            except Exception:  # noqa: BLE001 - the training's own error is the one to report
                pass
        self.trackers = []


def file_logger(path) -> logging.Logger:
    logger = logging.getLogger(f"tuner.run.{path}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s - %(message)s", "%Y/%m/%d %H:%M:%S"))
    logger.addHandler(handler)
    return logger
