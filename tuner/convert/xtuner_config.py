"""`tuner convert xtuner-config SRC.py DST.py`: an XTuner 0.1.x config -> a tuner config.

The XTuner file is never run: xtuner_read.py evaluates its syntax tree (assignments, arithmetic,
strings, `dict(type=...)` trees, `read_base()` imports), every imported name a placeholder (`Symbol`),
so PART 1's arithmetic (`accumulative_counts *= sequence_parallel_size`) and the model / dataset /
optimizer trees come out as plain values. Those are then read field by field into tuner's typed
sections (`convert_namespace`, `_sections`: ModelConfig, DataConfig...) and written by the one config
writer (config_writer.xtuner_text). What has no tuner counterpart, or means something different in
tuner, is named with its line in the new file's header
and on stderr; a file that cannot be trained as tuner trains (another model class, a pre-tokenized
corpus, data tuner has no reader for) is refused with the reason (`Refused`, exit 1).
"""

from __future__ import annotations

import ast
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from tuner.config import (CheckpointConfig, DataConfig, DatasetSource, EvaluateConfig, LlavaConfig, LoraConfig,
                          ModelConfig, OptimConfig, PreferenceConfig, TrainConfig)
from tuner.config_writer import xtuner_text
from tuner.convert.xtuner_read import Call, Refused, Symbol, read_xtuner_config
from tuner.data.system_templates import SYSTEM_TEMPLATES
from tuner.data.templates import TEMPLATES
from tuner.data.xtuner_map_fns import MAP_FNS
from tuner.dtypes import NAMES
from tuner.errors import TunerError

# XTuner's map functions for the general shapes -> tuner's formats.
FORMAT_OF_MAP_FN = {"alpaca_map_fn": "alpaca", "alpaca_zh_map_fn": "alpaca_zh", "oasst1_map_fn": "oasst1",
                    "openai_map_fn": "openai", "pretrain_map_fn": "pretrain", "msagent_react_map_fn": "msagent",
                    "llava_map_fn": "llava"}
DTYPES = {"torch.float16": "float16", "torch.bfloat16": "bfloat16", "torch.float32": "float32",
          "torch.float": "float32", "torch.half": "float16", **{name: name for name in NAMES}}  # -> tuner/dtypes.py
DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def _name(value) -> str:
    """'SupervisedFinetune' for a Symbol, a function's own name, '' for None."""
    if value is None:
        return ""
    if isinstance(value, Symbol):
        return value.last
    if isinstance(value, str):  # type="LinearLR": mmengine's registry names
        return value.rsplit(".", 1)[-1]
    if isinstance(value, Call):
        return _name(value.target)
    return getattr(value, "__name__", type(value).__name__)


@dataclass
class Converted:
    text: str
    notes: list[str] = field(default_factory=list)
    sections: dict = field(default_factory=dict)
    """name -> tuner's typed section (None for an absent optional one), what `text` builds when loaded"""


class _Reader:
    """Reads one XTuner namespace into the values of a tuner config, collecting notes."""

    def __init__(self, path: Path, ns: dict):
        self.path, self.ns = path, ns
        source = path.read_text(encoding="utf-8")
        self.lines = source.splitlines()
        self.import_lines = {n for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
                             for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)}
        self.notes: list[str] = []

    def line(self, *needles: str) -> int | str:
        """The first line holding one of `needles` (e.g. 'lora_alpha='), for the notes."""
        for needle in needles:
            pattern = re.compile(r"\b" + re.escape(needle).replace("=", r"\s*="))
            for i, text in enumerate(self.lines, 1):
                if pattern.search(text) and not text.lstrip().startswith("#") and i not in self.import_lines:
                    return i
        return "?"

    def note(self, needle: str, message: str) -> None:
        self.notes.append(f"line {self.line(needle)}: {message}")

    def refuse(self, needle: str, message: str):
        raise Refused(f"{self.path}:{self.line(needle)}: {message}")

    # ------------------------------------------------------------------ sections

    def value(self, value, needle: str, what: str):
        """A plain value; a placeholder where a number or string is needed refuses."""
        if isinstance(value, (Symbol, Call)):
            self.refuse(needle, f"{what} is {value!r}, which is only known when XTuner runs")
        return value

    def dtype(self, value, needle: str) -> str:
        if value is None:
            return "auto"
        key = value.name if isinstance(value, Symbol) else str(value)
        if key not in DTYPES:
            self.refuse(needle, f"torch_dtype {key} is not one of {', '.join(DTYPES)}")
        return DTYPES[key]

    def llm(self, llm: dict) -> dict:
        if not isinstance(llm, dict):
            self.refuse("llm=", f"the LLM is {llm!r}, not a dict(type=...from_pretrained, ...)")
        loader = llm.get("type")
        if _name(loader) != "from_pretrained":
            self.refuse("llm=", f"the LLM is built by {loader!r}; tuner loads models with from_pretrained")
        path = self.value(llm.get("pretrained_model_name_or_path"), "pretrained_model_name_or_path", "the model path")
        model = {"path": str(path), "dtype": self.dtype(llm.get("torch_dtype"), "torch_dtype")}
        if llm.get("trust_remote_code"):
            if "internlm2" in str(path).lower():  # InternLM2 and InternLM2.5
                self.note("trust_remote_code", "trust_remote_code=True dropped: tuner loads InternLM2 as "
                                               "transformers' Llama, without the model's own code")
            else:
                model["trust_remote_code"] = True
        quant = llm.get("quantization_config")
        if isinstance(quant, dict):
            if quant.get("load_in_4bit"):
                model["quantization"] = "4bit"
                if quant.get("bnb_4bit_quant_type", "nf4") != "nf4" or not quant.get("bnb_4bit_use_double_quant",
                                                                                    False):
                    self.note("bnb_4bit_quant_type", "4-bit quantization: tuner always uses NF4 with double "
                                                     "quantization")
            elif quant.get("load_in_8bit"):
                model["quantization"] = "8bit"
        return model

    def lora(self, lora) -> dict | None:
        if lora is None:
            return None
        if not isinstance(lora, dict):
            self.refuse("lora=", f"lora is {lora!r}, not a dict(type=LoraConfig, ...)")
        out = {"r": self.value(lora.get("r", 8), "r=", "lora r"),
               "alpha": self.value(lora.get("lora_alpha", 8), "lora_alpha", "lora_alpha"),
               "dropout": float(self.value(lora.get("lora_dropout", 0.0), "lora_dropout", "lora_dropout"))}
        targets = lora.get("target_modules")
        out["target_modules"] = "all-linear" if targets in (None, "all-linear") else list(targets)
        for key in ("use_rslora", "use_dora"):
            if lora.get(key):
                out[key] = True
        if lora.get("modules_to_save"):
            out["modules_to_save"] = list(lora["modules_to_save"])
        if lora.get("bias", "none") != "none":
            self.note("bias=", f"lora bias={lora['bias']!r} dropped: tuner's adapters have no bias")
        return out

    def dataset(self) -> dict:
        ns = self.ns
        loader = ns.get("train_dataloader")
        dataset = loader.get("dataset") if isinstance(loader, dict) else None
        dataset = dataset if dataset is not None else ns.get("train_dataset")
        if not isinstance(dataset, dict):
            self.refuse("train_dataset", "no train_dataloader.dataset or train_dataset dict")
        kind = _name(dataset.get("type"))
        if kind == "ConcatDataset":
            parts = [self.one_dataset(d) for d in dataset.get("datasets", [])]
            if not parts:
                self.refuse("ConcatDataset", "ConcatDataset without datasets")
            first = dict(parts[0])
            for key in ("template", "max_length", "pack"):
                others = {repr(p.get(key)) for p in parts}
                if len(others) > 1:
                    self.note("ConcatDataset", f"the mixed datasets differ in {key} ({', '.join(sorted(others))}); "
                                               f"tuner uses the first one's ({first.get(key)!r}) for all")
            first["sources"] = [{"path": p["path"], "format": p.get("format", "auto"), "map_fn": p.get("map_fn"),
                                 "split": p.get("split", "train"), "subset": p.get("subset")} for p in parts]
            return first
        return self.one_dataset(dataset)

    def one_dataset(self, d: dict) -> dict:
        kind = _name(d.get("type"))
        refusals = {
            "MOSSSFTDataset": "MOSS-003-SFT's plugin conversations (MOSSSFTDataset): tuner has no reader for them",
            "build_packed_dataset": "a pre-tokenized InternLM corpus (build_packed_dataset): tuner tokenizes its "
                                    "own data",
            "InternVL_V1_5Dataset": "InternVL's dataset: tuner trains LLaVA-style models, not InternVL",
            "RefCOCOJsonDataset": "RefCOCO grounding data: not a LLaVA conversation dataset tuner reads",
            "InvRefCOCOJsonDataset": "RefCOCO grounding data: not a LLaVA conversation dataset tuner reads",
        }
        if kind in refusals:
            self.refuse(kind, refusals[kind])
        if d.get("do_dataset_tokenization") is False:
            self.refuse("do_dataset_tokenization", "do_dataset_tokenization=False: the dataset is already tokenized "
                                                   "(input_ids rows); tuner tokenizes its own data from text")
        if kind not in ("process_hf_dataset", "process_ms_dataset", "build_preference_dataset", "LLaVADataset"):
            self.refuse("type=", f"dataset type {kind or d.get('type')!r} has no tuner counterpart")
        out: dict = {}
        if kind == "LLaVADataset":
            path = d.get("data_path")
            if not path and d.get("offline_processed_text_folder"):
                self.refuse("offline_processed_text_folder", "LLaVA data pre-processed offline: give the JSON file")
            out.update(path=str(self.value(path, "data_path", "the data path")), format="llava")
            out["image_folder"] = str(self.value(d.get("image_folder") or "", "image_folder", "image_folder"))
            out["pad_image_to_square"] = bool(d.get("pad_image_to_square", False))
        else:
            out.update(self.source(d.get("dataset"), kind))
            fn = d.get("dataset_map_fn")
            fname = _name(fn)
            if isinstance(fn, Call) or (fn is not None and not isinstance(fn, Symbol) and fname not in MAP_FNS
                                        and fname not in FORMAT_OF_MAP_FN):
                self.refuse("dataset_map_fn", f"dataset_map_fn {fn!r} is the config's own function; write it "
                                              "as a tuner map_fn (row -> {'messages': [...]}) in the new config")
            if fn is None:
                out["format"] = "preference" if kind == "build_preference_dataset" else "auto"
            elif fname in FORMAT_OF_MAP_FN:
                out["format"] = FORMAT_OF_MAP_FN[fname]
            elif fname in MAP_FNS:
                out["map_fn"] = fname
            else:
                self.refuse("dataset_map_fn", f"dataset_map_fn {fname} has no tuner counterpart")
        template = d.get("template_map_fn")
        if isinstance(template, dict):
            name = template.get("template")
            name = name.last if isinstance(name, Symbol) else None
            if name not in TEMPLATES:
                self.refuse("template_map_fn", f"prompt template {template.get('template')!r} is not one of tuner's")
            out["template"] = name
        elif template is not None:
            self.refuse("template_map_fn", f"template_map_fn {template!r}: expected "
                                           "dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.x)")
        elif kind == "build_preference_dataset":
            out["template"] = None  # the tokenizer's own chat template, as XTuner's preference data uses
        else:
            out["template"] = self.template_of_namespace()
        if d.get("max_length") is not None:
            out["max_length"] = int(self.value(d["max_length"], "max_length", "max_length"))
        out["pack"] = bool(d.get("pack_to_max_length", False)) or bool(d.get("max_packed_length")) \
            or bool(d.get("use_varlen_attn", False))
        if d.get("max_packed_length"):
            self.note("max_packed_length", f"max_packed_length {d['max_packed_length']}: tuner packs pairs into "
                                           f"sequences of max_length; packed pairs never see each other")
        return out

    def template_of_namespace(self):
        name = self.ns.get("prompt_template")
        return name.last if isinstance(name, Symbol) and name.last in TEMPLATES else None

    def source(self, dataset, kind: str) -> dict:
        """dict(type=load_dataset, path=..., data_files=...) -> {'path': ..., 'split': ...}."""
        if not isinstance(dataset, dict):
            self.refuse("dataset=", f"the dataset is {dataset!r}, not a dict(type=load_dataset, ...)")
        loader = _name(dataset.get("type"))
        split = dataset.get("split", "train")
        split = split if isinstance(split, str) else "train"
        origin = dataset["type"].name if isinstance(dataset.get("type"), Symbol) else ""
        if "MsDataset" in origin or "OmDataset" in origin:  # ModelScope's loaders
            name = dataset.get("dataset_name") or dataset.get("path")
            return {"path": f"modelscope://{self.value(name, 'dataset_name', 'the ModelScope dataset')}",
                    "split": split}
        if loader == "load_jsonl_dataset":
            files = dataset.get("data_files")
            return {"path": self.files(files)}
        if loader != "load_dataset":
            self.refuse("dataset=", f"datasets loaded by {dataset.get('type')!r}: tuner reads files, folders, "
                                    "Hugging Face datasets (load_dataset) and ModelScope datasets")
        path = self.value(dataset.get("path"), "path=", "the dataset path")
        files = dataset.get("data_files") or dataset.get("data_dir")
        if path in ("json", "csv", "parquet", "text", "arrow") or (files and path is None):
            if not files:
                self.refuse("path=", f"load_dataset('{path}') without data_files")
            if path == "text":
                self.note("data_files", "plain-text files: tuner reads .txt files as one document per line "
                                        "(format 'pretrain')")
            return {"path": self.files(files)}
        if files:
            self.note("data_files", f"load_dataset({path!r}, data_files=...) reads only those files of the "
                                    f"dataset; tuner reads the whole dataset {path!r}")
        if os.path.isabs(str(path)) or str(path).startswith((".", "~")):
            return {"path": str(path)}
        subset = dataset.get("name")
        return {"path": str(path), "split": split, **({"subset": str(self.value(subset, "name=", "the dataset's "
                                                                                "configuration name"))} if subset else {})}

    def files(self, files):
        if isinstance(files, dict):  # {'train': 'a.json'} or {'train': [...]}
            files = files.get("train", next(iter(files.values())))
        if isinstance(files, (list, tuple)):
            files = [str(self.value(f, "data_files", "a data file")) for f in files]
            return files[0] if len(files) == 1 else files
        return str(self.value(files, "data_files", "the data files"))


def convert_namespace(path: Path, ns: dict) -> Converted:
    r = _Reader(path, ns)
    model_cfg = ns.get("model")
    if not isinstance(model_cfg, dict):
        raise Refused(f"{path}: no `model = dict(type=...)`; is this an XTuner 0.1.x training config?")
    kind = _name(model_cfg.get("type"))
    if kind == "from_pretrained" and ns.get("training_args") is not None:
        r.refuse("training_args", "a config for Hugging Face's Trainer (`xtuner train --hf`): its settings are "
                                  "TrainingArguments, not XTuner's runner; convert the XTuner-runner variant")
    if kind not in ("SupervisedFinetune", "DPO", "ORPO", "RewardModel", "LLaVAModel"):
        r.refuse("type=", f"model type {kind or model_cfg.get('type')!r}: tuner trains causal LMs (SFT, DPO, ORPO, "
                          "reward models) and LLaVA, not this")
    llava = None
    if kind == "LLaVAModel":
        encoder = model_cfg.get("visual_encoder") or {}
        enc_path = encoder.get("pretrained_model_name_or_path") if isinstance(encoder, dict) else None
        llava = {"visual_encoder": str(r.value(enc_path, "visual_encoder", "the visual encoder")),
                 "freeze_llm": bool(model_cfg.get("freeze_llm", False)),
                 "freeze_visual_encoder": bool(model_cfg.get("freeze_visual_encoder", False))}
        if model_cfg.get("pretrained_pth"):
            llava["pretrained_pth"] = str(r.value(model_cfg["pretrained_pth"], "pretrained_pth", "pretrained_pth"))
            r.note("pretrained_pth", "pretrained_pth names XTuner's pretrain checkpoint: give the iter_N.pth of "
                                     "the converted pretrain config trained with tuner (XTuner's keys differ)")
        if model_cfg.get("visual_encoder_lora"):
            llava["visual_encoder_lora"] = r.lora(model_cfg["visual_encoder_lora"])
        if model_cfg.get("projector_depth", 2) != 2:
            r.refuse("projector_depth", f"projector_depth {model_cfg['projector_depth']}: tuner's projector is "
                                        "Linear-GELU-Linear (2)")
    model = r.llm(model_cfg.get("llm"))
    lora = r.lora(model_cfg.get("lora") or model_cfg.get("llm_lora"))
    preference = None
    if kind == "DPO":
        loss = model_cfg.get("loss_type", "sigmoid")
        if loss not in DPO_LOSSES:
            r.refuse("loss_type", f"DPO loss_type {loss!r}: tuner has {', '.join(DPO_LOSSES)}")
        preference = {"method": "dpo", "loss": loss, "beta": float(model_cfg.get("beta", 0.1)),
                      "label_smoothing": float(model_cfg.get("label_smoothing", 0.0))}
    elif kind == "ORPO":
        preference = {"method": "orpo", "beta": float(model_cfg.get("beta", 0.1))}
    elif kind == "RewardModel":
        preference = {"method": "reward"}
        if model_cfg.get("loss_type", "ranking") != "ranking":
            r.note("loss_type", f"reward loss_type {model_cfg['loss_type']!r}: tuner trains with the pairwise "
                                "(ranking) loss, -log sigmoid(chosen - rejected)")
        if model_cfg.get("penalty_type", "none") not in ("none", None):
            r.note("penalty_type", f"penalty_type {model_cfg['penalty_type']!r}: not carried over; "
                                   "preference.center_rewards is tuner's term that keeps rewards near 0")
        if ns.get("reward_token_id") is not None:
            r.note("reward_token_id", "reward_token_id: tuner reads the reward at each answer's last token "
                                      "(a sequence-classification head), adding no reward token")
        if lora is not None:
            r.note("lora=", "a LoRA reward model: pth_to_hf merges the adapter into the written model")
    data = r.dataset()
    if kind in ("DPO", "ORPO", "RewardModel") and data.get("format") not in ("preference", None) \
            and not data.get("map_fn"):
        data["format"] = "preference"
    if llava is not None:
        llava["image_folder"] = data.pop("image_folder", "")
        llava["pad_image_to_square"] = data.pop("pad_image_to_square", True)
    sections = _sections(path, ns, r, model, lora, data, llava, preference)
    return Converted(xtuner_text(_header(path, r, kind, sections), sections), r.notes, sections)


def _schedule(r: _Reader, ns: dict) -> dict:
    loop = ns.get("train_cfg") or {}
    out: dict = {}
    max_epochs = loop.get("max_epochs") if isinstance(loop, dict) else None
    if isinstance(loop, dict) and loop.get("max_iters"):
        out["max_steps"] = int(loop["max_iters"])
        out["max_epochs"] = 1000  # bounded by max_steps
    else:
        out["max_epochs"] = int(max_epochs or ns.get("max_epochs") or 1)
    warmup = 0.0
    schedules = ns.get("param_scheduler") or []
    schedules = schedules if isinstance(schedules, (list, tuple)) else [schedules]
    # The warmup's share of training: its end over the last schedule's end, in whatever unit the config
    # counts them (epochs, or iterations with max_iters: `end=warmup_ratio * max_steps`, `end=max_steps`).
    ends = [s.get("end") for s in schedules if isinstance(s, dict) and isinstance(s.get("end"), (int, float))]
    total = max(ends) if ends else None
    scheduler = "constant"  # no scheduler: a constant learning rate
    for s in schedules:
        if not isinstance(s, dict):
            continue
        name = _name(s.get("type"))
        if name == "LinearLR" and len(schedules) > 1:
            end = s.get("end", 0)
            if isinstance(end, (int, float)) and total:
                warmup = float(end) / total
        elif name == "CosineAnnealingLR":
            scheduler = "cosine"
            if s.get("eta_min", 0.0):
                r.note("eta_min", f"CosineAnnealingLR eta_min={s['eta_min']}: tuner's cosine decays to 0")
        elif name == "LinearLR":
            scheduler = "linear"
        elif name == "ConstantLR":
            scheduler = "constant"
        else:
            r.note("param_scheduler", f"scheduler {name} is not tuner's; the new config decays with cosine")
            scheduler = "cosine"
    out["warmup_ratio"] = round(warmup, 6)
    out["scheduler"] = scheduler
    return out


def _hooks(r: _Reader, ns: dict) -> tuple[dict, dict]:
    evaluate: dict = {"inputs": [], "freq": 500, "system": None}
    for hook in ns.get("custom_hooks") or []:
        if not isinstance(hook, dict):
            continue
        name = _name(hook.get("type"))
        if name == "EvaluateChatHook":
            inputs = hook.get("evaluation_inputs") or []
            evaluate["inputs"] = [str(i) for i in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
            evaluate["freq"] = int(hook.get("every_n_iters") or 500)
            evaluate["system"] = _system_text(r, hook.get("system"))
            if hook.get("max_new_tokens"):
                evaluate["max_new_tokens"] = int(hook["max_new_tokens"])
            images = hook.get("evaluation_images")
            if images:
                evaluate["image"] = str(images[0] if isinstance(images, (list, tuple)) else images)
                if evaluate["image"].startswith(("http://", "https://")):
                    r.note("evaluation_images", f"the evaluation image is a URL ({evaluate['image']}): tuner "
                                                "reads a local file; download it and set evaluate.image")
                if isinstance(images, (list, tuple)) and len(images) > 1:
                    r.note("evaluation_images", "tuner's evaluate hook asks about one image; the first is kept")
        elif name not in ("DatasetInfoHook", "VarlenAttnArgsToMessageHubHook", "ThroughputHook"):
            r.note(name, f"custom hook {name} is not carried over")
    checkpoint = {"save_steps": 500, "save_total_limit": 2}
    hook = (ns.get("default_hooks") or {}).get("checkpoint")
    if isinstance(hook, dict):
        checkpoint["save_steps"] = int(hook.get("interval") or 500)
        keep = hook.get("max_keep_ckpts")
        checkpoint["save_total_limit"] = int(keep) if keep is not None else -1
        if hook.get("by_epoch"):
            r.note("by_epoch", "CheckpointHook by_epoch=True: tuner saves every `save_steps` optimizer steps")
    return evaluate, checkpoint


def _system_text(r: _Reader, system):
    """A system prompt: a string, SYSTEM_TEMPLATE.name, or SYSTEM_TEMPLATE.name.format(bot_name=...)."""
    if system in (None, ""):
        return None
    if isinstance(system, str):
        return system
    if isinstance(system, Call) and system.target.name.endswith(".format"):
        name = system.target.name.rsplit(".", 2)[-2]
        if name in SYSTEM_TEMPLATES:
            return SYSTEM_TEMPLATES[name].format(*system.args, **system.kwargs)
    if isinstance(system, Symbol) and system.last in SYSTEM_TEMPLATES:
        return SYSTEM_TEMPLATES[system.last]
    r.refuse("SYSTEM", f"system prompt {system!r} is not a string or one of XTuner's SYSTEM_TEMPLATE")


def _optim(r: _Reader, ns: dict) -> tuple[dict, dict]:
    wrapper = ns.get("optim_wrapper") or {}
    optimizer = wrapper.get("optimizer") or {}
    name = _name(optimizer.get("type"))
    if name not in ("AdamW", "Adam", ""):
        r.note("optim_type", f"optimizer {name}: tuner trains with AdamW")
    lr = float(r.value(optimizer.get("lr", 2e-4), "lr =", "lr"))
    betas = tuple(float(b) for b in optimizer.get("betas", (0.9, 0.999)))
    clip = wrapper.get("clip_grad")
    max_norm = float(clip["max_norm"]) if isinstance(clip, dict) and clip.get("max_norm") is not None else None
    optim = {"lr": lr, "weight_decay": float(optimizer.get("weight_decay", 0.0)), "betas": betas,
             "max_norm": max_norm}
    accumulation = int(wrapper.get("accumulative_counts", 1))
    train = {"accumulative_counts": accumulation, "dtype": "auto"}
    dtype = wrapper.get("dtype")
    if _name(wrapper.get("type")) == "AmpOptimWrapper" and dtype in ("float16", None):
        r.note("dtype=", "XTuner trained in float16 with a dynamic loss scale (AmpOptimWrapper); tuner's dtype "
                         "'auto' uses bf16 where the hardware runs it natively, else fp16 with a loss scale on a GPU and fp32 "
                         "on a CPU (set train.dtype='fp16' for float16 everywhere)")
    elif dtype == "bfloat16":
        train["dtype"] = "bf16"
    return optim, train


def _sections(path: Path, ns: dict, r: _Reader, model: dict, lora, data: dict, llava, preference) -> dict:
    """The mapped values as tuner's typed sections (a value of the wrong type refuses, naming it)."""
    loader = ns.get("train_dataloader") or {}
    batch_size = int(loader.get("batch_size", 1)) if isinstance(loader, dict) else 1
    sampler = (loader.get("sampler") or {}) if isinstance(loader, dict) else {}
    if _name(sampler.get("type") if isinstance(sampler, dict) else None) == "LengthGroupedSampler":
        r.note("LengthGroupedSampler", "LengthGroupedSampler: tuner shuffles packed sequences instead of "
                                       "grouping samples by length")
    if isinstance(loader, dict) and _name(loader.get("batch_sampler", {}).get("type")
                                          if isinstance(loader.get("batch_sampler"), dict) else None):
        r.note("batch_sampler", "the batch sampler is not carried over")
    sp = ns.get("sequence_parallel_size", 1)
    if isinstance(sp, int) and sp > 1:
        r.note("sequence_parallel_size", f"sequence_parallel_size={sp}: each sequence is split over {sp} processes "
                                         f"(train.sequence_parallel_size); run on a multiple of {sp} (NPROC_PER_NODE)")
    if ns.get("use_varlen_attn"):
        r.note("use_varlen_attn", "use_varlen_attn=True: tuner always keeps packed samples from seeing each "
                                  "other (FlashAttention's varlen kernel on a GPU with flash-attn, else its own)")
    optim, train = _optim(r, ns)
    train.update(_schedule(r, ns), batch_size=batch_size)
    if isinstance(sp, int) and sp > 1:
        train["sequence_parallel_size"] = sp
    evaluate, checkpoint = _hooks(r, ns)
    seed = (ns.get("randomness") or {}).get("seed") if isinstance(ns.get("randomness"), dict) else None
    if isinstance(seed, int):
        train["seed"] = seed
    if ns.get("load_from") or ns.get("resume"):
        r.note("load_from", "load_from / resume: give `tuner train --resume` instead")

    def form(s: dict) -> dict:
        return dict(map_fn=MAP_FNS[s["map_fn"]]) if s.get("map_fn") else dict(format=s.get("format", "auto"))

    def source(s: dict) -> DatasetSource:
        return DatasetSource(path=s["path"], split=s.get("split", "train"), subset=s.get("subset"), **form(s))

    try:
        shared = dict(template=data.get("template"), max_length=data.get("max_length", 2048),
                      pack=data.get("pack", False))
        if data.get("sources") or data.get("split", "train") != "train" or data.get("subset"):
            data_section = DataConfig(sources=[source(s) for s in data.get("sources") or [data]], **shared)
        else:
            data_section = DataConfig(path=data["path"], **form(data), **shared)  # (path: a file or a list)
        if llava is not None:
            encoder_lora = llava.get("visual_encoder_lora")
            llava = LlavaConfig(**{**llava, "visual_encoder_lora": LoraConfig(**encoder_lora) if encoder_lora else None})
        return dict(model=ModelConfig(**model), lora=LoraConfig(**lora) if lora is not None else None, llava=llava,
                    preference=PreferenceConfig(**preference) if preference is not None else None,
                    data=data_section, optim=OptimConfig(**optim), train=TrainConfig(**train),
                    checkpoint=CheckpointConfig(**checkpoint), evaluate=EvaluateConfig(**evaluate))
    except TunerError as e:  # e.g. a float lora_alpha: tuner's section says which field and type
        raise Refused(f"{path}: {e}") from None


def _header(path: Path, r: _Reader, kind: str, sections: dict) -> list[str]:
    """The converted file's comments: where it came from, what it trains, and the notes."""
    model, data = sections["model"], sections["data"]
    placeholders = [p for p in [model.path, *(s.path for s in data.source_list())]
                    if str(p).lstrip("/").startswith("path/to")]
    if placeholders:  # XTuner's custom-data configs ship with '/path/to/json/file.json'
        r.notes.insert(0, f"line {r.line('path/to')}: {', '.join(map(str, placeholders))} is XTuner's placeholder: "
                          "edit it to your own files before training")
    what = {"SupervisedFinetune": "supervised fine-tuning", "DPO": "DPO", "ORPO": "ORPO",
            "RewardModel": "a reward model", "LLaVAModel": "LLaVA"}[kind]
    method = "full fine-tuning" if sections["lora"] is None else ("QLoRA" if model.quantization else "LoRA")
    out = [f"# Converted from the XTuner config {path.name} by `tuner convert xtuner-config`.",
           f"# {what[0].upper() + what[1:]}, {method}, of {model.path}."]
    if r.notes:
        out.append("# Not carried over, or different in tuner:")
        for note in r.notes:
            out += textwrap.wrap(f"{path.name} {note}", 106, initial_indent="#   ", subsequent_indent="#     ")
    return out


def convert_tree(src: str | Path, dst: str | Path, force: bool = False, say=print) -> tuple[int, int, int]:
    """Every config (*.py but __init__.py) under the folder SRC -> the same place under DST, in this process:
    a line per file, converted or refused with the reason. Returns (converted, refused, failed): failed
    counts files that neither converted nor were refused cleanly (DST exists, unreadable, a bug)."""
    src, dst = Path(src), Path(dst)
    files = sorted(p for p in src.rglob("*.py") if p.name != "__init__.py")
    if not files:
        raise TunerError(f"{src}: no .py files under it")
    counts = [0, 0, 0]
    for file in files:
        relative = file.relative_to(src)
        try:
            converted = convert_file(file, dst / relative, force=force)
            counts[0] += 1
            say(f"converted  {relative} ({len(converted.notes)} note{'' if len(converted.notes) == 1 else 's'})")
        except Refused as e:
            counts[1] += 1
            say(f"refused    {relative}: {str(e).removeprefix(str(file) + ':')}")
        except Exception as e:  # noqa: BLE001 - one file's failure must not stop the others
            counts[2] += 1
            say(f"FAILED     {relative}: {type(e).__name__ + ': ' if not isinstance(e, TunerError) else ''}{e}")
    return counts[0], counts[1], counts[2]


def convert_file(src: str | Path, dst: str | Path, force: bool = False) -> Converted:
    """Convert SRC to DST (written to a temporary name, then renamed); raises Refused."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise TunerError(f"{src}: no such file")
    if dst.exists() and not force:
        raise TunerError(f"{dst} exists; not overwriting it", hint="give another name or --force")
    namespace = read_xtuner_config(src)
    try:
        converted = convert_namespace(src, namespace)
    except TunerError:
        raise
    except Exception as e:  # noqa: BLE001 - a value of a shape the mapping did not expect: one line, never a traceback
        raise Refused(f"{src}: a value the converter cannot map ({type(e).__name__}: {e})") from None
    compile(converted.text, str(dst), "exec")  # what we write is Python
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(converted.text, encoding="utf-8")
    os.replace(tmp, dst)
    return converted
