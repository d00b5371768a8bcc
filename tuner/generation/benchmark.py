"""Benchmarks with lm-evaluation-harness on a model tuner loaded (`tuner eval`, and `evaluate.tasks` at the end
of training): its `hf` backend handed the model object itself, so whatever tuner loads (an adapter on its
base, the embedded model, InternLM2 as Llama, 4/8-bit weights, a model still in training) is what is
measured. lm-eval is an optional extra (`pip install "tuner[eval]"`).

Besides lm-eval's own tasks (their data comes from the hub on a user's machine), two small tasks ship with
tuner and run offline:
    tuner_general_knowledge   40 four-way multiple-choice questions (capitals, arithmetic, science), acc
    tuner_identity_ava        8 ways of asking "who are you?"; does the answer name Ava (the demo's
                              assistant: examples/personal_assistant.sh)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tuner.errors import TunerError

DATA = Path(__file__).resolve().parent.parent / "eval_tasks"
LOCAL_TASKS = {
    "tuner_general_knowledge": """\
task: tuner_general_knowledge
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/general_knowledge.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "tuner_identity_ava": """\
task: tuner_identity_ava
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/identity.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "Ava"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
filter_list:
  - name: names_ava
    filter:
      - function: regex
        regex_pattern: "\\\\b(Ava)\\\\b"
        fallback: "[not named]"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}
CHAT_TASKS = {"tuner_identity_ava"}  # asked through the model's chat template


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise TunerError("evaluating on benchmarks needs lm-evaluation-harness, which is not installed",
                         hint='pip install "tuner[eval]"   (that is lm-eval[api])') from None
    return lm_eval


def task_manager(include_path: str | None, folder: Path, tasks: list[str] | None = None):
    """lm-eval's task index: tuner's tasks (written into `folder` with their data's path), the user's
    --include-path, and lm-eval's own unless every one of `tasks` is found without them (indexing lm-eval's
    thousands of task files takes seconds)."""
    from lm_eval.tasks import TaskManager

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in LOCAL_TASKS.items():
        (folder / f"{name}.yaml").write_text(text.format(data=DATA), encoding="utf-8")
    paths = [str(folder)] + ([include_path] if include_path else [])
    if tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(local.match_tasks(tasks)) >= set(tasks):
            return local
    return TaskManager(include_path=paths)


def check_tasks(manager, tasks: list[str]) -> None:
    """lm-eval's own message for a task it does not know (before any model is loaded)."""
    found = manager.match_tasks(tasks)
    missing = [t for t in tasks if t not in found]
    if missing:
        raise TunerError(f"Tasks not found: {', '.join(missing)}",
                         hint="lm-eval ls tasks lists lm-eval's; tuner's own: " + ", ".join(LOCAL_TASKS) +
                              "; a task of your own: --include-path DIR (its YAML files)")


def run_tasks(model, tokenizer, tasks: list[str], manager, limit: int | None = None, batch_size: int = 1,
              chat: bool | None = None) -> dict:
    """lm-eval's results dict for `tasks` on the loaded model. `chat`: ask through the chat template (None:
    only tuner's chat tasks do)."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    groups = {True: [t for t in tasks if t in CHAT_TASKS], False: [t for t in tasks if t not in CHAT_TASKS]} \
        if chat is None else {chat: tasks}
    was_training = model.training
    model.eval()
    merged: dict = {}
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        for use_chat, names in groups.items():
            if not names:
                continue
            results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                              apply_chat_template=use_chat and tokenizer.chat_template is not None)
            for key, value in results.items():  # (tuner's chat tasks and the others: one results dict)
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key].update(value)
                else:
                    merged.setdefault(key, value)
    finally:
        model.train(was_training)
    return merged


def scores(results: dict) -> dict[tuple[str, str], float]:
    """{(task, metric): value} of every task's metrics (standard errors left out)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                out[(task, key)] = float(value)
    return out


def comparison_table(base: dict, tuned: dict, base_name: str, tuned_name: str) -> str:
    """Each task and metric: the base model's value, the fine-tuned one's and the difference."""
    before, after = scores(base), scores(tuned)
    rows = [("task", "metric", base_name, tuned_name, "difference")]
    for key in sorted(after.keys() | before.keys()):
        b, a = before.get(key, math.nan), after.get(key, math.nan)
        rows.append((key[0], key[1], f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_samples(results: dict, folder: Path, suffix: str = "") -> list[Path]:
    """Every example lm-eval ran, one JSON line each (its prompt, the model's answers and their scores), as
    lm-eval's own --log_samples writes them: samples_TASK[suffix].jsonl; each written whole or not at all."""
    from lm_eval.utils import handle_non_serializable

    written = []
    for task, samples in (results.get("samples") or {}).items():
        path = folder / f"samples_{task}{suffix}.jsonl"
        _write_whole(path, "".join(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n"
                                   for s in samples))
        written.append(path)
    return written


def write_results(results: dict, path: Path) -> None:
    """lm-eval's results as JSON (its own encoder for what is not plain), written whole or not at all."""
    from lm_eval.utils import handle_non_serializable

    _write_whole(path, json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=1,
                                  default=handle_non_serializable))


def _write_whole(path: Path, text: str) -> None:
    """A temporary name, then renamed: a reader never finds half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
