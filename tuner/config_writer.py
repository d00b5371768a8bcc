"""Writing configs as Python: the one writer of config text, for the resolved config of a run
(`work_dir/resolved_config.py`, which loads back as the same config), the converter of XTuner configs
(convert/xtuner_config.py) and the built-in config library (tools/config_library.py).

    xtuner_text(header, sections)         typed sections as an XTuner-shaped config: PART 1's settings as
                                          variables, PART 2-5 the sections built from them (the converter
                                          and the config library both write with it)
    resolved_text(config)                 every section after --cfg-options, as Python that loads back
    banner / imports / wrapped            the pieces: section banners, `from ... import` lines, wrapping
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

# XTuner's section banners as its configs (and tuner's) write them: not quite centred.
BANNER_INDENT = {"PART 1  Settings": 26, "PART 2  Model & Tokenizer": 22, "PART 3  Dataset & Dataloader": 22,
                 "PART 4  Scheduler & Optimizer": 20, "PART 5  Runtime": 27}


def banner(title: str) -> str:
    rule, left = "#" * 71, BANNER_INDENT[title]
    return f"{rule}\n#{' ' * left}{title.ljust(69 - left)}#\n{rule}"


def wrapped(head: str, items: list[str]) -> str:
    """head + items joined, wrapped at 110 columns under the opening parenthesis."""
    lines, current = [], head
    for i, item in enumerate(items):
        piece = item + (", " if i < len(items) - 1 else ")")
        if len(current) + len(item) + 2 > 110 and current.strip() != head.strip():  # room for ", " or ")"
            lines.append(current.rstrip())
            current = " " * len(head)
        current += piece
    return "\n".join(lines + [current])


def imports(module: str, names: list[str]) -> str:
    """`from module import (a, b, ...)` wrapped at 110 columns like the built-in configs."""
    one = f"from {module} import {', '.join(names)}"
    return one if len(one) <= 110 else wrapped(f"from {module} import (", names)


def resolved_text(config) -> str:
    """The config after overrides, as Python that builds the same sections when loaded, in XTuner's shape
    (xtuner_text) with every field written out. Functions come from where they live: an importable module
    by import, one written in the config file itself from that file (`runpy`, as `tuner train` ran it)."""
    from tuner.config import SECTIONS

    header = [f"# Resolved config of {config.path} (written by tuner train): the sections after --cfg-options.",
              "# It loads back as the same config: tuner train resolved_config.py"]
    return xtuner_text(header, {name: getattr(config, name) for name in SECTIONS}, every_field=True,
                       config_path=config.path, hooks=config.custom_hooks)


def python_repr(value: Any, functions: dict | None = None) -> str:
    """Python source that builds `value`: sections as constructor calls, functions by name (collected in
    `functions`, name -> function, so the caller can import them)."""
    if dataclasses.is_dataclass(value):
        args = ", ".join(f"{f.name}={python_repr(getattr(value, f.name), functions)}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({args})"
    if isinstance(value, (list, tuple)) and any(dataclasses.is_dataclass(v) or callable(v) for v in value):
        items = ", ".join(python_repr(v, functions) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items},)"
    if callable(value):
        name = getattr(value, "__name__", None) or type(value).__name__
        if functions is not None:
            functions[name] = value
        return name
    return repr(value)


def _dataclasses(values) -> list:
    found = []
    for value in values:
        if dataclasses.is_dataclass(value):
            found.append(value)
            found += _dataclasses(getattr(value, f.name) for f in dataclasses.fields(value))
        elif isinstance(value, (list, tuple)):
            found += _dataclasses(value)
    return found


def _defined_in(fn, config_path) -> bool:
    """Whether `fn` was written in the config file (its module is the config's, or has no file of its own)."""
    module = getattr(fn, "__module__", "") or ""
    if module.startswith("tuner_config_") or module == "__main__":
        return True
    try:
        return config_path is not None and inspect.getsourcefile(fn) == str(config_path)
    except TypeError:
        return False


# ---------------------------------------------------------------------------------------------- XTuner-shaped

def float_text(value: float) -> str:
    """2e-4 as XTuner's configs write it ('2e-4', not '0.0002'); other floats as Python writes them."""
    text = repr(float(value))
    if 0 < abs(value) < 0.01:
        mantissa, exponent = f"{value:.15e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        short = f"{mantissa}e{int(exponent)}"
        if float(short) == value and len(short) <= len(text):
            return short
    return text


def literal(value: Any, functions: dict | None = None) -> str:
    """Python source for a setting: floats as float_text, sections and functions as python_repr."""
    if isinstance(value, float):
        return float_text(value)
    if isinstance(value, tuple):
        return f"({', '.join(literal(v, functions) for v in value)}{',' if len(value) == 1 else ''})"
    if isinstance(value, list) and any(isinstance(v, float) for v in value):
        return f"[{', '.join(literal(v, functions) for v in value)}]"
    return python_repr(value, functions)


class _Part1:
    """PART 1's settings: `name = value  # comment` lines under group titles; a section field written
    through one is referred to by its name in PART 2-5."""

    def __init__(self, functions: dict):
        self.lines: list[str] = []
        self.functions = functions

    def group(self, title: str) -> None:
        if self.lines:
            self.lines.append("")
        self.lines.append(f"# {title}")

    def add(self, name: str, value: Any, comment: str = "") -> str:
        self.lines.append(f"{name} = {literal(value, self.functions)}" + (f"  # {comment}" if comment else ""))
        return name


def _arguments(section, named: dict[str, str], always: tuple[str, ...], every_field: bool,
               functions: dict) -> list[str]:
    """`field=...` for a section's constructor, in field order: the PART 1 name where there is one
    (`named`), else the value of fields in `always` (or of all, `every_field`) and of every field that
    differs from its default."""
    items = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.name in named:
            items.append(f"{f.name}={named[f.name]}")
        elif every_field or f.name in always or value != _default(f):
            items.append(f"{f.name}={literal(value, functions)}")
    return items


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def xtuner_text(header: list[str], sections: dict[str, Any], every_field: bool = False, config_path=None,
                hooks: list = ()) -> str:
    """A config file in XTuner's shape for typed sections (`sections`: name -> section or None, names of
    tuner.config.SECTIONS). PART 1 holds the settings users edit (model path, data, lengths, batch,
    learning rate, saving, the evaluation questions) as variables; PART 2-5 build the sections from them,
    with every other field that differs from its default (`every_field`: with every field). `header`: the
    comment lines on top. Functions written in the file `config_path` are read from it when loaded."""
    functions: dict[str, Any] = {}
    p = _Part1(functions)
    model, lora, data = sections["model"], sections.get("lora"), sections["data"]
    llava, preference, rl = sections.get("llava"), sections.get("preference"), sections.get("rl")
    optim, train = sections["optim"], sections["train"]
    checkpoint, evaluate = sections["checkpoint"], sections["evaluate"]
    named: dict[str, dict[str, str]] = {name: {} for name in sections}

    p.group("Model")
    named["model"]["path"] = p.add("pretrained_model_name_or_path", model.path)
    if llava is not None:
        named["llava"]["visual_encoder"] = p.add("visual_encoder_name_or_path", llava.visual_encoder)
        named["llava"]["pretrained_pth"] = p.add("pretrained_pth", llava.pretrained_pth)

    p.group("Data")
    single = data.sources[0] if data.sources and len(data.sources) == 1 and not data.path else None
    source_named: dict[str, str] = {}
    if single is not None or not data.sources:
        where, names = (single, source_named) if single is not None else (data, named["data"])
        names["path"] = p.add("data_path", where.path)
        if single is not None and single.split != "train":
            names["split"] = p.add("data_split", single.split)
        if single is not None and single.subset is not None:
            names["subset"] = p.add("data_subset", single.subset, "the dataset's configuration name")
        if where.map_fn is not None:
            names["map_fn"] = p.add("dataset_map_fn", where.map_fn)
        elif where.format != "auto":
            names["format"] = p.add("dataset_format", where.format)
    if llava is not None:
        named["llava"]["image_folder"] = p.add("image_folder", llava.image_folder)
    named["data"]["template"] = p.add("prompt_template", data.template,
                                      "None: the tokenizer's own chat template" if data.template is None else "")
    if rl is None:  # (online RL samples its sequences: rl.max_*_length say how long)
        named["data"]["max_length"] = p.add("max_length", data.max_length,
                                            "text tokens plus the image's" if llava is not None else "")
        named["data"]["pack"] = p.add("pack_to_max_length", data.pack,
                                      "several samples per sequence, each seeing only itself" if data.pack else "")

    if preference is not None and preference.method != "reward":
        p.group("Preference objective")
        if preference.method == "dpo":
            named["preference"]["loss"] = p.add("dpo_loss_type", preference.loss, "sigmoid (DPO), ipo, hinge")
        beta_means = {"orpo": "the odds-ratio term's weight (the ORPO paper's lambda)",
                      "simpo": "the scale of the length-normalized log-probs"}
        named["preference"]["beta"] = p.add("beta", preference.beta, beta_means.get(preference.method, ""))
        if preference.method == "dpo" and preference.label_smoothing:
            named["preference"]["label_smoothing"] = p.add("label_smoothing", preference.label_smoothing)
        if preference.method in ("dpo", "kto"):
            named["preference"]["reference"] = p.add(
                "reference", preference.reference,
                "LoRA: the base with the adapter off; full: the start's log-probs, computed once"
                if preference.reference == "auto" else "")

    if rl is not None:
        p.group("Online RL: completions sampled per prompt, scored by the rewards")
        named["rl"]["loss"] = p.add("rl_loss", rl.loss, "grpo, bnpo, dr_grpo, dapo")
        named["rl"]["num_generations"] = p.add("num_generations", rl.num_generations, "completions per prompt")
        named["rl"]["max_prompt_length"] = p.add("max_prompt_length", rl.max_prompt_length)
        named["rl"]["max_completion_length"] = p.add("max_completion_length", rl.max_completion_length)
        named["rl"]["temperature"] = p.add("temperature", rl.temperature)
        named["rl"]["beta"] = p.add("beta", rl.beta, "the KL term's weight (0: no reference model)")
        named["rl"]["rewards"] = p.add("reward_functions", rl.rewards)

    p.group("Scheduler & Optimizer")
    named["train"]["batch_size"] = p.add("batch_size", train.batch_size, "per device")
    named["train"]["accumulative_counts"] = p.add("accumulative_counts", train.accumulative_counts)
    named["train"]["max_epochs"] = p.add("max_epochs", train.max_epochs)
    named["optim"]["lr"] = p.add("lr", optim.lr)
    named["optim"]["betas"] = p.add("betas", optim.betas)
    named["optim"]["weight_decay"] = p.add("weight_decay", optim.weight_decay)
    named["optim"]["max_norm"] = p.add("max_norm", optim.max_norm, "grad clip")
    named["train"]["warmup_ratio"] = p.add("warmup_ratio", train.warmup_ratio)

    if train.sequence_parallel_size > 1:
        p.group("Parallel")
        named["train"]["sequence_parallel_size"] = p.add("sequence_parallel_size", train.sequence_parallel_size,
                                                         "processes sharing each sequence")

    p.group("Save")
    named["checkpoint"]["save_steps"] = p.add("save_steps", checkpoint.save_steps)
    named["checkpoint"]["save_total_limit"] = p.add("save_total_limit", checkpoint.save_total_limit,
                                                    "maximum checkpoints to keep (-1 means unlimited)")

    p.group("Evaluate the generation performance during the training")
    named["evaluate"]["freq"] = p.add("evaluation_freq", evaluate.freq)
    shared_system = data.system == evaluate.system
    named["evaluate"]["system"] = p.add(
        "SYSTEM", evaluate.system, "" if evaluate.system is None else "the evaluation questions'" + (
            " and the data's rows without one" if shared_system else " (the training data's come from its rows)"))
    if shared_system:
        named["data"]["system"] = "SYSTEM"
    named["evaluate"]["inputs"] = p.add("evaluation_inputs", evaluate.inputs)
    if evaluate.image is not None:
        named["evaluate"]["image"] = p.add("evaluation_images", evaluate.image, "a URL: download it, tuner reads a file"
                                           if evaluate.image.startswith(("http://", "https://")) else "a local image file")

    def build(name: str, section, always: tuple[str, ...] = (), comment: str = "") -> str:
        items = _arguments(section, named.get(name, {}), always, every_field, functions)
        line = wrapped(f"{name} = {type(section).__name__}(", items) if items else f"{name} = {type(section).__name__}()"
        return line + (f"  # {comment}" if comment else "")

    part2 = [build("model", model, ("dtype",))]
    part2.append(build("lora", lora, ("r", "alpha", "dropout", "target_modules")) if lora is not None else
                 "lora = None  # " + ("the LLM is frozen" if llava is not None and llava.freeze_llm else
                                      "full fine-tuning"))
    if llava is not None:
        if llava.visual_encoder_lora is not None:
            part2.append(build("visual_encoder_lora", llava.visual_encoder_lora,
                               ("r", "alpha", "dropout", "target_modules")))
            named["llava"]["visual_encoder_lora"] = "visual_encoder_lora"
        part2.append(build("llava", llava, ("freeze_llm", "freeze_visual_encoder", "pad_image_to_square")))
    if preference is not None:
        part2.append(build("preference", preference, ("method",)))
    if rl is not None:
        part2.append(build("rl", rl))

    part3 = []
    if data.sources and single is None:
        part3 += ["sources = [", *(f"    DatasetSource({', '.join(_arguments(s, {}, (), every_field, functions))}),"
                                   for s in data.sources), "]"]
        named["data"]["sources"] = "sources"
    elif single is not None:
        items = _arguments(single, source_named, (), every_field, functions)
        named["data"]["sources"] = f"[DatasetSource({', '.join(items)})]"
    part3.append(build("data", data))

    part4 = [build("optim", optim), build("train", train, ("scheduler", "dtype"))]
    part5 = [build("checkpoint", checkpoint), build("evaluate", evaluate)]
    if hooks:
        part5.append(f"custom_hooks = [{', '.join(python_repr(h, functions) for h in hooks)}]")

    used = {type(v).__name__ for v in _dataclasses(sections.values())}
    lines = [*header, imports("tuner.config", sorted(used))]
    from_config_file = sorted(name for name, fn in functions.items() if _defined_in(fn, config_path))
    for module in sorted({fn.__module__ for name, fn in functions.items() if name not in from_config_file}):
        lines.append(imports(module, sorted(n for n, fn in functions.items()
                                            if fn.__module__ == module and n not in from_config_file)))
    if from_config_file:  # (the config's own functions: from the config file, as tuner train ran it)
        if config_path is None:
            raise ValueError(f"{', '.join(from_config_file)} were written in a config file: give its config_path")
        lines += ["import runpy", f"_config = runpy.run_path({str(config_path)!r})",
                  *[f"{name} = _config[{name!r}]" for name in from_config_file]]
    lines += ["", banner("PART 1  Settings"), *p.lines,
              "", banner("PART 2  Model & Tokenizer"), *part2,
              "", banner("PART 3  Dataset & Dataloader"), *part3,
              "", banner("PART 4  Scheduler & Optimizer"), *part4,
              "", banner("PART 5  Runtime"), *part5]
    return "\n".join(lines) + "\n"
