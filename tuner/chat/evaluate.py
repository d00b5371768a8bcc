"""`tuner eval`: lm-evaluation-harness benchmarks on a model (and its base, side by side).

    tuner eval MODEL [--adapter DIR] [--tasks T1,T2] [--include-path DIR] [--limit N] [--batch-size B]
                     [--compare BASE] [--output DIR [--log-samples]] [--bits 4|8] [--dtype ...]
                     [--apply-chat-template]

The model is loaded as `tuner chat` loads it and handed to lm-eval's `hf` backend in this process
(generation/benchmark.py). Prints lm-eval's table (and with --compare the base's, the model's and the
difference), and writes the results JSON to --output (with --log-samples every example too).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from tuner.generation import benchmark


def _name(path: str, adapter: str | None) -> str:
    return Path(adapter).name if adapter else Path(path.rstrip("/")).name or path


def _results_file(folder: Path, name: str, suffix: str = "") -> Path:
    return folder / f"results_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}{suffix}.json"


def _evaluate(model_path: str, adapter: str | None, args, manager, tasks: list[str]) -> dict:
    import gc

    from tuner.generation.load import load_chat_model

    model, tokenizer, _ = load_chat_model(model_path, adapter, args.dtype, args.bits,
                                          warn=lambda line: print(line, file=sys.stderr),
                                          trust_remote_code=args.trust_remote_code)
    try:
        return benchmark.run_tasks(model, tokenizer, tasks, manager, args.limit, args.batch_size,
                                   True if args.apply_chat_template else None)
    finally:
        del model
        gc.collect()


def run_eval(args) -> int:
    benchmark.require_lm_eval()  # (one line saying how to install it, before anything else)
    if getattr(args, "log_samples", False) and not args.output:
        from tuner.errors import TunerError
        raise TunerError("--log-samples writes the examples into the --output folder", hint="add --output DIR")
    from lm_eval.utils import make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with tempfile.TemporaryDirectory(prefix="tuner-tasks-") as folder:
        manager = benchmark.task_manager(args.include_path, Path(folder), tasks)
        benchmark.check_tasks(manager, tasks)  # (before a model is loaded)
        tuned = _evaluate(args.model, args.adapter, args, manager, tasks)
        base = _evaluate(args.compare, None, args, manager, tasks) if args.compare else None
    print(make_table(tuned))
    name = _name(args.model, args.adapter)
    if base is not None:
        print(benchmark.comparison_table(base, tuned, _name(args.compare, None), name))
    if args.output:
        out = Path(args.output)
        benchmark.write_results(tuned, _results_file(out, name))
        if base is not None:
            benchmark.write_results(base, _results_file(out, _name(args.compare, None), "_base"))
        if getattr(args, "log_samples", False):
            benchmark.write_samples(tuned, out)
            if base is not None:
                benchmark.write_samples(base, out, "_base")
        print(f"Results written to {out}")
    return 0
