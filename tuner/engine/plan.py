"""`tuner check-config CFG`: a config loaded and type-checked, and what training it would do, without
loading a model's weights, tokenizing data or downloading anything:

    model      smollm2-135m-instruct (lora, dpo), dtype float32
    data       data/signoff_train.jsonl: preference, 32 rows
    template   the tokenizer's own chat template; max_length 512, packed
    steps      at most 32 per epoch x 2 epochs on one process (32 pairs, 1 x 1 per step; packing makes fewer)
    memory     1.04 GiB: weights 0.52, grads 0.02, optimizer 0.04, activations 0.47 (one process, ...)

Rows are counted in local .jsonl files; the memory line comes from the model's structure built on the
meta device, when its config is on this machine. A part that cannot be resolved (a data file that is not
there, a bad first row, a model folder that does not load) does not hide the others: `check_plan` gives
the lines it could write and every problem it found.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from tuner.config import EMBEDDED_MODEL, Config
from tuner.data.modelscope import modelscope_id
from tuner.data.sources import data_files, is_hub_dataset
from tuner.data.tokenized import TokenStats, resolve_map_fns
from tuner.rewards import reward_name


def _remote(path: str) -> bool:
    """A Hugging Face hub or ModelScope dataset: not looked at (nothing is downloaded to check a config)."""
    return is_hub_dataset(path) or modelscope_id(path) is not None


def _count_rows(path: Path) -> int | None:
    """Rows of a local .jsonl file (lines that are not blank); None for other kinds (not read whole)."""
    if path.suffix != ".jsonl":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _check_prompts(sources, stats: TokenStats) -> None:
    """Each local file's first row must give a prompt (data/prompts.py); a bad one names the file and line."""
    from tuner.data.formats import RowError
    from tuner.data.prompts import prompt_of
    from tuner.data.sources import iter_rows
    from tuner.errors import TunerError

    for source in sources:
        for place, line, row in iter_rows(source.path, source.split, source.revision, source.subset):
            try:
                prompt_of(row, source.map_fn)
            except (RowError, KeyError, TypeError, ValueError) as e:
                raise TunerError(f"{place}:{line}: {e}") from None
            for file in data_files(source.path):
                stats.formats[str(file)] = "prompts"
            break


def describe_plan(cfg: Config) -> str:
    """The plan, or the first problem raised (for callers that need a plan that holds whole)."""
    from tuner.errors import TunerError

    lines, problems = check_plan(cfg)
    if problems:
        raise TunerError(problems[0])
    return "\n".join(lines)


def check_plan(cfg: Config) -> tuple[list[str], list[str]]:
    """(the plan's lines, the problems found): every part is tried, a problem in one does not stop the next."""
    from tuner.errors import TunerError

    problems: list[str] = []

    def attempt(part, *args):
        try:
            return part(*args)
        except TunerError as e:
            problems.append(str(e))  # (its hint included: "...\n  hint: ...", as the CLI prints it)
        except OSError as e:
            problems.append(f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": "))
        return None

    lines = [f"config     {cfg.path}"]
    model = cfg.model
    what = cfg.method + ("" if cfg.preference is None else f", {cfg.preference.method}") + (
        "" if cfg.rl is None else f", {cfg.rl.method} ({cfg.rl.loss})")
    lines.append(f"model      {model.path} ({what}), dtype {model.dtype}"
                 + (f", {model.quantization} quantized" if model.quantization else "")
                 + (", runs the model folder's own code" if model.trust_remote_code else ""))
    stats = TokenStats()
    local = [s for s in cfg.data.source_list() if not _remote(s.path)]
    present = [s for s in local if attempt(data_files, s.path) is not None]  # (a missing file: one problem)
    if present and cfg.rl is not None:  # prompts: the first row of each local file read as one
        attempt(_check_prompts, present, stats)
    elif present:  # the formats of local files (their first rows read); hub datasets are not looked at
        attempt(resolve_map_fns, dataclasses.replace(cfg.data, path="", sources=present), stats,
                cfg.llava is not None)
    rows, counted = 0, len(present) == len(local)
    for source in cfg.data.source_list():
        if _remote(source.path):
            where = f"[{source.split}] from the Hugging Face hub" if is_hub_dataset(source.path) else "from ModelScope"
            lines.append(f"data       {source.path} {where}, format {source.format}")
            counted = False
            continue
        if source not in present:
            lines.append(f"data       {source.path}: not found (see below)")
            continue
        for f in data_files(source.path):
            n = _count_rows(f)
            counted = counted and n is not None
            rows += round((n or 0) * source.repeats)
            lines.append(f"data       {f}: {stats.formats.get(str(f), source.format)}"
                         + (f", {n} rows" if n is not None else "") + (f", x{source.repeats:g}" if source.repeats != 1 else ""))
    template = cfg.data.template or "the tokenizer's own chat template"
    t = cfg.train
    per_step = t.batch_size * t.accumulative_counts
    if cfg.rl is not None:
        rl = cfg.rl
        names = [reward_name(r) for r in rl.rewards]
        prompts = per_step // rl.num_generations
        lines.append(f"template   {template}; prompts up to {rl.max_prompt_length} tokens (cut from the left), "
                     f"completions up to {rl.max_completion_length}")
        lines.append(f"rl         {rl.num_generations} completions per prompt (temperature {rl.temperature:g}), "
                     f"rewards {', '.join(names)}; beta {rl.beta:g}, {rl.num_iterations} step(s) per rollout")
        if counted and rows:
            lines.append(f"steps      {rows // prompts * rl.num_iterations} per epoch x {t.max_epochs} epochs on one "
                         f"process ({rows} prompts, {prompts} per step: {t.batch_size} x {t.accumulative_counts} "
                         f"completions)" + (f"; stops at step {t.max_steps} (train.max_steps)" if t.max_steps else ""))
    else:
        lines.append(f"template   {template}; max_length {cfg.data.max_length}, "
                     + ("packed" if cfg.data.pack else "not packed"))
    if counted and rows and cfg.rl is None:
        unit = "pairs" if cfg.preference is not None and cfg.preference.method != "kto" else "rows"
        lines.append(f"steps      at most {math.ceil(rows / per_step)} per epoch x {t.max_epochs} epochs on one process "
                     f"({rows} {unit}, {t.batch_size} x {t.accumulative_counts} per step; packing makes fewer)"
                     + (f"; stops at step {t.max_steps} (train.max_steps)" if t.max_steps else ""))
    if t.sequence_parallel_size > 1:
        lines.append(f"parallel   each row split over {t.sequence_parallel_size} processes (Ulysses): run on a "
                     f"multiple of {t.sequence_parallel_size}; a step holds batch x accumulation x processes / "
                     f"{t.sequence_parallel_size} rows")
    lines.append(f"train      batch {t.batch_size} x accumulation {t.accumulative_counts}, lr {cfg.optim.lr:g}, "
                 f"dtype {t.dtype}, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}; "
                 "one process (torchrun / NPROC_PER_NODE, --fsdp or --deepspeed as for tuner train)")
    memory = attempt(_memory_line, cfg)
    if memory:
        lines.append(memory)
    return lines, problems


def _memory_line(cfg: Config) -> str | None:
    """The memory estimate from the model's structure, when its config is on this machine."""
    from tuner.engine.budget import estimate_memory
    from tuner.model import internlm2
    from tuner.model.adapt import apply_lora
    from tuner.model.load import DTYPES, load_causal_lm

    local = Path(cfg.model.path).expanduser()
    if cfg.llava is not None or not (cfg.model.path == EMBEDDED_MODEL or local.is_dir()):
        return None  # (a hub id is not looked up: nothing is downloaded to check a config)
    if local.is_dir() and internlm2.is_internlm2(local):
        return "memory     estimated at the first tuner train (this InternLM2 folder is converted to Llama first)"
    model = load_causal_lm(cfg.model.path, cfg.model.trust_remote_code, meta=True, announce=False, head=cfg.head,
                           dtype=DTYPES[cfg.model.dtype])
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, task="SEQ_CLS" if cfg.head == "reward" else "CAUSAL_LM")
    compute_bytes = 4 if cfg.train.dtype in ("fp32", "float32") else 2
    estimate = estimate_memory(model, cfg.train.batch_size * cfg.row_tokens(), cfg.train.gradient_checkpointing,
                               compute_bytes, 2 if cfg.optim.name.endswith("8bit") else 8)
    return f"memory     {estimate.describe().removeprefix('memory estimate ')} (one process, before sharding)"
