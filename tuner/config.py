"""Typed configuration: the sections a config file builds, loading, overrides, saving.

A config file is plain Python in XTuner's shape (PART 1 Settings at the top, then the
sections). It assigns some of these names at module level:

    model = ModelConfig(...)         lora = LoraConfig(...) or None (full fine-tuning)
    data = DataConfig(...)           optim = OptimConfig(...)
    train = TrainConfig(...)         checkpoint = CheckpointConfig(...)
    evaluate = EvaluateConfig(...)   custom_hooks = [...]
    llava = LlavaConfig(...) or None (a text-only model)

Every section checks the types of its fields when it is built, so a wrong value fails
when the config loads, naming the field, not at step 300.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from tuner.dtypes import DtypeName
from tuner.errors import TunerError

EMBEDDED_MODEL = "smollm2-135m-instruct"
TRACKERS = ("tensorboard", "wandb", "swanlab", "mlflow")  # train.report_to (engine/trackers.py)


def section(cls):
    """Make `cls` a dataclass whose constructor names the valid fields on a wrong keyword."""
    cls = dataclass(cls)
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in kwargs if k not in valid]
        if unknown:
            raise TunerError(f"{cls.__name__} has no field {unknown[0]!r}; valid fields: {', '.join(valid)}")
        original_init(self, *args, **kwargs)
        check_types(self)

    cls.__init__ = __init__
    return cls


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    if annotation is Callable or origin is typing.get_origin(Callable):
        return callable(value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    return text[len("<class '"):-2] if text.startswith("<class '") else text


def check_types(obj) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            raise TunerError(
                f"{type(obj).__name__}.{f.name} must be {_describe(hints[f.name])}, got {value!r} ({type(value).__name__})")
    post = getattr(obj, "validate", None)
    if post:
        post()


@section
class ModelConfig:
    path: str = EMBEDDED_MODEL
    """A local HF model folder, a hub id, or 'smollm2-135m-instruct' (embedded, works offline)"""
    dtype: DtypeName = "float32"
    """Dtype the base weights are loaded in ('auto': the checkpoint's own); trainable weights are kept in
    float32. Names as everywhere in tuner: auto, fp32/float32, bf16/bfloat16, fp16/float16"""
    quantization: Optional[Literal["4bit", "8bit"]] = None
    """QLoRA: load the frozen base in 4-bit NF4 (double quantized) or 8-bit with bitsandbytes"""
    freeze: Optional[list[str]] = None
    """Regular expressions of parameter names that stay frozen in full fine-tuning, e.g. ['embed_tokens']"""
    attn_implementation: str = "auto"
    """transformers attention backend. 'auto': in training, FlashAttention 2 on a GPU where flash-attn
    is installed, else tuner's per-sample attention for packed rows ('tuner_packed'); 'sdpa' to chat.
    Or name one: 'sdpa', 'eager', 'flash_attention_2', 'tuner_packed'"""
    trust_remote_code: bool = False
    """Run the model folder's own Python code (remote code), for models transformers does not know.
    InternLM2 never needs it: tuner loads it as transformers' Llama"""


@section
class LoraConfig:
    r: int = 16
    """Rank of the low-rank update"""
    alpha: int = 32
    """Scale: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)"""
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    """'all-linear' = every nn.Linear except the output head"""
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full beside the adapters, e.g. ['lm_head']"""

    def validate(self):
        if self.r <= 0:
            raise TunerError(f"LoraConfig.r must be positive, got {self.r}")


FORMAT_NAMES = Literal["auto", "openai", "alpaca", "alpaca_zh", "sharegpt", "oasst1", "pretrain", "msagent", "llava", "preference",
                       "kto", "xtuner"]


@section
class DatasetSource:
    """One dataset among several in `DataConfig.sources` (mixing)."""
    path: str
    """A file, a folder of files, or a Hugging Face dataset name"""
    format: FORMAT_NAMES = "auto"
    map_fn: Optional[Callable] = None
    repeats: float = 1.0
    """Times each sample is used per epoch: 2.0 doubles this dataset, 0.5 keeps a (seeded) half"""
    split: str = "train"
    """Split of a Hugging Face dataset"""
    subset: Optional[str] = None
    """A Hugging Face dataset's configuration name, where it has several (openai/gsm8k: 'main' or 'socratic')"""
    revision: Optional[str] = None
    """A Hugging Face dataset's branch, tag or commit (None: its default branch). The tokenized cache is
    keyed by the commit it resolves to, so a new revision of the dataset is tokenized again"""

    def validate(self):
        if self.repeats <= 0:
            raise TunerError(f"DatasetSource.repeats must be positive, got {self.repeats}")


@section
class DataConfig:
    path: Union[str, list[str]] = ""
    """A file (.json .jsonl .parquet .csv .txt), a folder of them, a Hugging Face dataset name, or a list"""
    format: FORMAT_NAMES = "auto"
    """How rows are read; 'auto' tells from the columns (`tuner list-dataset-format` lists them)"""
    map_fn: Optional[Callable] = None
    """Your own function row -> {'messages': [...]} or {'text': ...}; replaces `format` when given"""
    sources: Optional[list[DatasetSource]] = None
    """Several datasets mixed, each with its own format and repeats (replaces path/format/map_fn)"""
    template: Optional[str] = None
    """A named prompt template (see tuner.data.templates), or None for the tokenizer's own chat template"""
    template_check: Literal["warn", "error", "off"] = "warn"
    """With a named template and a tokenizer that has its own chat template, the first rows are rendered by
    both at the start of training: 'warn' on a difference in token ids, 'error' to stop"""
    system: Optional[str] = None
    """System prompt added to conversations that have none (None: leave them as they are)"""
    max_length: int = 2048
    """Tokens per sequence"""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What happens to a sample longer than max_length; either way it is counted and reported"""
    pack: bool = True
    """Pack several samples into each max_length sequence (they cannot see each other)"""
    pack_split: bool = False
    """Let a sample continue in the next sequence instead of being truncated (pretraining)"""
    shuffle: bool = True
    """Shuffle sequences every epoch (the order is a function of seed and epoch, so resume is exact)"""
    skip_bad_rows: bool = False
    """Skip and count rows that fail validation instead of stopping at the first"""
    num_proc: int = 0
    """Tokenizer processes (0: one per core)"""
    cache: bool = True
    """Keep tokenized data on disk, keyed by the content of files, tokenizer, template and settings"""

    def validate(self):
        if self.max_length < 8:
            raise TunerError(f"DataConfig.max_length must be at least 8, got {self.max_length}")

    def source_list(self) -> list[DatasetSource]:
        if self.sources:
            return list(self.sources)
        paths = [self.path] if isinstance(self.path, str) else list(self.path)
        return [DatasetSource(path=p, format=self.format, map_fn=self.map_fn) for p in paths]


@section
class OptimConfig:
    name: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    """AdamW from torch (its fused kernel on GPU and CPU), or bitsandbytes' 8-bit / paged AdamW (pip install 'tuner[qlora]')"""
    lr: float = 2e-4
    """Peak learning rate"""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_norm: Optional[float] = 1.0
    """Gradient clipping by global norm (None: no clipping)"""


@section
class TrainConfig:
    batch_size: int = 1
    """Sequences per device per micro-batch"""
    accumulative_counts: int = 16
    """Micro-batches per optimizer step"""
    max_epochs: int = 3
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides max_epochs when smaller)"""
    warmup_ratio: float = 0.03
    """Fraction of the steps with linear warmup"""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, to 0 for cosine and linear"""
    seed: int = 0
    dtype: DtypeName = "auto"
    """Compute dtype for autocast; 'auto' = bf16 where the GPU or CPU runs it natively, else fp16 with a
    loss scale on a GPU (V100, T4) and fp32 on a CPU. Also fp32/float32, bf16/bfloat16, fp16/float16"""
    log_interval: int = 1
    """Steps between lines in the log"""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more time"""
    report_to: list[str] = field(default_factory=list)
    """Also send scalars to 'tensorboard', 'wandb', 'swanlab' and/or 'mlflow' (optional extras)"""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient norm: stop with a message naming the step, or skip that step's update"""
    chunked_loss: bool = True
    """Output head + cross-entropy in chunks, never holding the full logits (one process or DDP)"""
    fused_lora: bool = True
    """LoRA layers (and a SwiGLU MLP's activation with its LoRA down projection) as single autograd functions (one process or DDP)"""
    sequence_parallel_size: int = 1
    """Split each sequence over this many processes (DeepSpeed-Ulysses: attention heads are exchanged around
    attention); the processes form data-parallel groups of this size. XTuner's sequence_parallel_size"""
    dataloader_num_workers: Optional[int] = None
    """Processes that make the next steps' batches (collation, image decoding) while the model trains;
    None: 2 on a GPU, 0 on a CPU (the training process makes them: its cores are busy training)"""

    def validate(self):
        unknown = [r for r in self.report_to if r not in TRACKERS]
        if unknown:
            raise TunerError(f"TrainConfig.report_to: unknown {unknown}; valid: {', '.join(TRACKERS)}")
        for name in ("batch_size", "accumulative_counts", "max_epochs", "log_interval", "sequence_parallel_size"):
            if getattr(self, name) < 1:
                raise TunerError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise TunerError(f"TrainConfig.dataloader_num_workers must be 0 or more, got {self.dataloader_num_workers}")


@section
class CheckpointConfig:
    save_steps: int = 500
    """Steps between checkpoints iter_N.pth (the last step is always saved)"""
    save_total_limit: int = 2
    """Keep at most this many iter_N.pth (-1: keep all)"""


@section
class EvaluateConfig:
    inputs: list[str] = field(default_factory=list)
    """Questions answered before training and every `freq` steps, written to eval_outputs_iter_N.txt"""
    freq: int = 500
    system: Optional[str] = None
    """System prompt for the evaluation questions"""
    max_new_tokens: int = 64
    image: Optional[str] = None
    """LLaVA: an image file the questions are asked about"""
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run on the trained model at the end (tuner eval's; needs tuner[eval]),
    their table and results written to the work dir: e.g. ['tuner_general_knowledge']"""
    tasks_limit: Optional[int] = None
    """At most this many examples per task (None: all)"""


@section
class LlavaConfig:
    """A vision encoder and a projector on top of the LLM in `model` (LLaVA). `lora` then
    applies to the LLM; without `lora` the LLM is trained in full unless `freeze_llm`."""
    visual_encoder: str = ""
    """A CLIP or SigLIP vision model: a local folder or a hub id, e.g. 'openai/clip-vit-large-patch14-336'"""
    image_folder: str = ""
    """Folder the rows' image paths are relative to ('' = the data file's folder)"""
    freeze_llm: bool = True
    """Pretrain stage: True (only the projector learns); finetune stage: False, usually with `lora`"""
    freeze_visual_encoder: bool = True
    visual_encoder_lora: Optional[LoraConfig] = None
    """LoRA on the vision encoder's linear layers (finetune stage, optional)"""
    pretrained_pth: Optional[str] = None
    """The pretrain stage's checkpoint (iter_N.pth) or pth_to_hf folder: its projector is loaded"""
    projector_depth: int = 2
    """Linear layers of the projector (2: Linear-GELU-Linear, as LLaVA-1.5)"""
    select_layer: int = -2
    """Hidden layer of the vision encoder whose patch features are used"""
    pad_image_to_square: bool = True
    """Pad images to a square with the encoder's mean colour before resizing (else stretch)"""

    def validate(self):
        if not self.visual_encoder:
            raise TunerError("LlavaConfig.visual_encoder is empty: name a CLIP or SigLIP vision model")
        if self.projector_depth != 2:
            raise TunerError(f"LlavaConfig.projector_depth {self.projector_depth}: only 2 (Linear-GELU-Linear, "
                             "what transformers' LlavaForConditionalGeneration has) is supported")


@section
class PreferenceConfig:
    """Preference training on pairs of a chosen and a rejected answer (data in the `preference`
    format), usually after SFT. Without this section a config trains on the answers themselves."""
    method: Literal["dpo", "orpo", "simpo", "kto", "reward"] = "dpo"
    """dpo: against a reference model; orpo: odds ratio plus the chosen answer's NLL, no reference;
    simpo: length-normalized log-probs with a target margin, no reference; kto: single answers marked
    desirable or not (data format `kto`; pairs are split into one of each), against a reference;
    reward: a reward model (a scalar head on the LLM, read at each answer's last token) trained so
    chosen scores above rejected"""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO's loss: sigmoid (the paper's), ipo (squared, length-normalized), hinge"""
    beta: float = 0.1
    """DPO / SimPO: the scale of the log-ratio (SimPO usually 2.0); ORPO: the odds-ratio term's weight"""
    label_smoothing: float = 0.0
    """DPO sigmoid: the share of pairs assumed mislabelled (conservative DPO)"""
    sft_weight: float = 0.0
    """DPO: the weight of the chosen answers' NLL (per token) added to the loss, which keeps the model
    writing the chosen answers while it moves away from the rejected ones (RPO; TRL's
    loss_type=['sigmoid', 'sft'] with loss_weights=[1, sft_weight])"""
    simpo_gamma: float = 0.5
    """SimPO: the target reward margin (over beta)"""
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    """KTO: the weights of desirable and undesirable answers' losses (with unbalanced data, about
    desirable_weight * n_desirable = undesirable_weight * n_undesirable, as the KTO paper advises)"""
    center_rewards: float = 0.0
    """reward: the weight of (chosen + rejected)^2, which keeps the rewards near 0 (TRL's
    center_rewards_coefficient; 0.01 is usual)"""
    reference: Literal["auto", "adapter", "copy", "precompute"] = "auto"
    """DPO's and KTO's reference model: adapter (LoRA: the base with the adapter disabled, no second
    model), copy (a frozen copy of the start), precompute (DPO: the start's log-probs computed once
    before training, a forward per step saved); auto: adapter with LoRA, else precompute (KTO: copy)"""

    def validate(self):
        if self.beta <= 0:
            raise TunerError(f"PreferenceConfig.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise TunerError(f"PreferenceConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.method == "kto" and self.reference == "precompute":
            raise TunerError("PreferenceConfig.reference='precompute' is for DPO: KTO's KL term pairs each prompt "
                             "with another answer of its batch, which changes every epoch",
                             hint="use reference='adapter' (LoRA) or 'copy'")
        if self.sft_weight < 0:
            raise TunerError(f"PreferenceConfig.sft_weight must be 0 or more, got {self.sft_weight}")
        if min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise TunerError("PreferenceConfig.desirable_weight and undesirable_weight must be positive")


@section
class RLConfig:
    """Online reinforcement learning with verifiable rewards (GRPO and its variants, named as TRL 1.16
    names them). Each step: sample `num_generations` completions of each of the step's prompts from the
    model as it is, score them with `rewards`, and train on each completion weighted by its reward
    relative to the others of its prompt. `train.batch_size` counts completions (TRL's
    per_device_train_batch_size): a step holds batch_size x accumulative_counts x processes of them, that
    is that many / num_generations prompts."""
    method: Literal["grpo"] = "grpo"
    loss: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """How per-token losses are averaged: grpo (per completion, then over completions), bnpo (over the
    micro-batch's tokens), dr_grpo (over completions x max_completion_length), dapo (over the step's tokens)"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """sequence: one importance ratio per completion, the mean of its tokens' log-ratios (GSPO)"""
    num_generations: int = 8
    """Completions sampled per prompt; the advantages compare them with each other"""
    max_prompt_length: int = 512
    """Longer prompts lose their start (counted in the data summary)"""
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k cut"""
    beta: float = 0.0
    """Weight of the KL term to the reference (0: none, no reference kept)"""
    epsilon: float = 0.2
    """Clipping of the importance ratio below 1 - epsilon"""
    epsilon_high: Optional[float] = None
    """...and above 1 + epsilon_high (None: epsilon; DAPO uses 0.28)"""
    delta: Optional[float] = None
    """Two-sided clipping: the ratio is also capped at delta where the advantage is negative (None: off)"""
    kl_bias_correction: bool = True
    """Multiply the KL term by the importance ratio (the unbiased reverse-KL gradient; TRL's default)"""
    num_iterations: int = 1
    """Optimizer steps per rollout (> 1 reuses its completions, with the log-probs they were sampled with)"""
    rewards: list[Any] = field(default_factory=list)
    """Reward functions f(prompts, completions, **columns) -> list[float | None] (TRL's signature): callables,
    'module:function' strings (importable from the config's folder), built-in names ('math_accuracy',
    'format', 'length'), or 'rm:PATH' for a reward model folder"""
    reward_weights: Optional[list[float]] = None
    """The weight of each reward in the total (None: 1 each)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the std of the prompt's rewards (group), of the step's (batch), or not at all"""
    reward_errors: Literal["raise", "zero"] = "raise"
    """A reward function that raises: stop naming it and the row (raise), or give that completion 0 and count it"""
    reference: Literal["auto", "adapter", "copy"] = "auto"
    """With beta > 0: adapter (LoRA: the base with the adapter off) or copy (a frozen copy); auto: adapter with LoRA"""
    log_completions: int = 2
    """Prompts whose completions and rewards are written to the log every evaluate.freq steps"""

    def validate(self):
        if self.num_generations < 2:
            raise TunerError(f"RLConfig.num_generations must be at least 2, got {self.num_generations}: the advantage "
                             "of a completion is its reward against the other completions of its prompt")
        if not self.rewards:
            raise TunerError("RLConfig.rewards is empty: give at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise TunerError(f"RLConfig.reward_weights has {len(self.reward_weights)} weights for "
                             f"{len(self.rewards)} rewards")
        for name in ("max_prompt_length", "max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise TunerError(f"RLConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise TunerError(f"RLConfig.temperature must be positive, got {self.temperature} (rollouts sample)")
        if not 0 < self.top_p <= 1:
            raise TunerError(f"RLConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.beta < 0 or self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise TunerError("RLConfig.beta must be 0 or more, epsilon and epsilon_high positive")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "optim": OptimConfig,
    "train": TrainConfig, "checkpoint": CheckpointConfig, "evaluate": EvaluateConfig, "llava": LlavaConfig,
    "preference": PreferenceConfig, "rl": RLConfig,
}
OPTIONAL_SECTIONS = ("lora", "llava", "preference", "rl")  # None unless the config sets them


@dataclass
class Config:
    name: str
    path: Path
    source: str
    model: ModelConfig
    lora: Optional[LoraConfig]
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    evaluate: EvaluateConfig
    llava: Optional[LlavaConfig] = None
    preference: Optional[PreferenceConfig] = None
    rl: Optional[RLConfig] = None
    custom_hooks: list = field(default_factory=list)

    @property
    def head(self) -> str:
        """'reward' for a reward model (a scalar head), 'lm' for everything that generates."""
        return "reward" if self.preference is not None and self.preference.method == "reward" else "lm"

    def row_tokens(self) -> int:
        """Tokens of one row on one process (for memory estimates): max_length, or an RL prompt and its
        completion; with sequence parallelism, this process's 1/N of it."""
        tokens = self.data.max_length if self.rl is None else self.rl.max_prompt_length + self.rl.max_completion_length
        return -(-tokens // self.train.sequence_parallel_size)

    @property
    def method(self) -> str:
        if self.lora is None:
            return "full"
        return "qlora" if self.model.quantization else "lora"

    def check_sections(self) -> None:
        """What one section's fields cannot say alone (after --cfg-options)."""
        if self.train.sequence_parallel_size > 1:
            method = self.preference.method if self.preference is not None else None
            other = ("an rl section" if self.rl is not None else f"preference.method='{method}'"
                     if method in ("reward", "kto") else "LLaVA" if self.llava is not None else None)
            if other:
                raise TunerError(f"config {self.path}: train.sequence_parallel_size > 1 with {other} is not supported "
                                 "yet (sequence parallelism shards SFT, pretraining and DPO / SimPO / ORPO rows)",
                                 hint="set train.sequence_parallel_size=1")
        if self.rl is not None:
            if self.preference is not None or self.llava is not None:
                raise TunerError(f"config {self.path}: an rl section trains a text model on its own rewards; it "
                                 "does not combine with a preference or llava section", hint="remove one of them")
            per_step = self.train.batch_size * self.train.accumulative_counts
            if per_step % self.rl.num_generations:
                raise TunerError(
                    f"config {self.path}: a step holds train.batch_size x accumulative_counts = {per_step} completions "
                    f"per process, not a multiple of rl.num_generations={self.rl.num_generations}: each prompt's "
                    "completions must be trained in the same step",
                    hint=f"set train.batch_size x accumulative_counts to a multiple of {self.rl.num_generations}")
            from tuner.rewards import resolve_rewards

            resolve_rewards(self.rl.rewards, self.path.parent, self.rl.max_completion_length)  # fails here, not later
        if self.preference is not None and self.preference.method == "kto" and self.train.batch_size < 2:
            raise TunerError(f"config {self.path}: preference.method='kto' needs train.batch_size >= 2, got "
                             f"{self.train.batch_size}: each example's KL row pairs its prompt with another example's "
                             "answer of the micro-batch, and with one example that is its own answer, so the KL "
                             "term vanishes (TRL's KTOTrainer refuses it too)",
                             hint="set train.batch_size = 2 or more (lower accumulative_counts to keep the step)")

    def apply_overrides(self, options: list[str]) -> None:
        """Apply `--cfg-options section.field=value` with the field's type."""
        for option in options:
            key, sep, raw = option.partition("=")
            section_name, dot, field_name = key.partition(".")
            if not sep or not dot:
                raise TunerError(f"--cfg-options expects section.field=value, got {option!r}")
            if section_name not in SECTIONS:
                raise TunerError(f"--cfg-options {option!r}: unknown section {section_name!r}; "
                                 f"valid sections: {', '.join(SECTIONS)}")
            target = getattr(self, section_name)
            if target is None:  # e.g. lora.r=8 on a full fine-tuning config
                target = SECTIONS[section_name]()
                setattr(self, section_name, target)
            hints = typing.get_type_hints(type(target))
            if field_name not in hints:
                raise TunerError(f"--cfg-options {option!r}: {type(target).__name__} has no field {field_name!r}; "
                                 f"valid fields: {', '.join(f.name for f in dataclasses.fields(target))}")
            try:
                value = parse_value(raw, hints[field_name])
            except ValueError as e:
                raise TunerError(f"--cfg-options {option!r}: {e}") from None
            setattr(target, field_name, value)
            check_types(target)

    def resolved_text(self) -> str:
        """The config after overrides, as Python that loads back as the same config (config_writer.py)."""
        from tuner.config_writer import resolved_text

        return resolved_text(self)


def parse_value(raw: str, annotation: Any) -> Any:
    """'1e-4' -> 0.0001 for a float field, 'a,b' -> ['a', 'b'] for a list field, 'None' -> None ..."""
    if raw == "None":
        return None
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        # Strings last: 'q_proj,v_proj' for Union[str, list[str]] means a list, 'all-linear' a string.
        looks_like_list = raw.startswith(("[", "(")) or "," in raw
        args = [a for a in args if a is not str] + [a for a in args if a is str]
        for arg in args:  # first member type that accepts the value
            if typing.get_origin(arg) in (list, tuple) and not looks_like_list:
                continue
            try:
                value = parse_value(raw, arg)
            except (ValueError, SyntaxError, TunerError):
                continue
            if _type_ok(value, arg):
                return value
        return raw
    if annotation is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise TunerError(f"expected true or false, got {raw!r}")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise ValueError(f"expected {'a whole number' if annotation is int else 'a number'}, got {raw!r}") from None
    if origin in (list, tuple):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = [v for v in raw.split(",") if v]
        value = list(value) if isinstance(value, (list, tuple)) else [value]
        return tuple(value) if origin is tuple else value
    return raw


def load_config(path: str | Path, options: list[str] | None = None) -> Config:
    """Run a config file and collect its sections; errors name the file and line."""
    from tuner.configs_index import resolve_config_path

    path = resolve_config_path(path)
    source = path.read_text(encoding="utf-8")
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": f"tuner_config_{path.stem}"}
    try:
        code = compile(source, str(path), "exec")
        # Register the module so functions and dataclasses defined in the config work.
        module = types.ModuleType(namespace["__name__"])
        module.__dict__.update(namespace)
        sys.modules[module.__name__] = module
        exec(code, module.__dict__)
        namespace = module.__dict__
    except SyntaxError as e:
        raise TunerError(f"config {path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - any failure in user code is reported with its line
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == str(path)), "?")
        raise TunerError(f"config {path}:{line}: {e}") from None

    sections = {}
    for name, cls in SECTIONS.items():
        value = namespace.get(name, None if name in OPTIONAL_SECTIONS else cls())
        if value is not None and not isinstance(value, cls):
            raise TunerError(f"config {path}: `{name}` must be a {cls.__name__}, got {type(value).__name__}")
        sections[name] = value
    hooks = namespace.get("custom_hooks", [])
    config = Config(name=path.stem, path=path, source=source, custom_hooks=list(hooks), **sections)
    config.apply_overrides(options or [])
    config.check_sections()
    if not config.data.path and not config.data.sources:
        raise TunerError(f"config {path}: data.path is empty; set data_path in PART 1")
    return config
