"""A run assembled from its config, for text and LLaVA alike: the tokenizer, the training sequences and
their collate function, and the model with its trainable parameters (LoRA, full, or LLaVA's projector and
adapters), loaded as the strategy wants it (FSDP: the weights on rank 0 only; ZeRO-3: partitioned).
The loop (loop.py) takes it from there."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tuner.config import Config
from tuner.data.dataset import build_sequences, collate
from tuner.errors import TunerError
from tuner.model import packed_attention
from tuner.model.adapt import apply_lora, prepare_full
from tuner.model.load import describe_conversion, load_tokenizer


@dataclass
class Run:
    tokenizer: object
    sequences: object
    collate: Callable
    model: object  # trainable parameters set; not yet on the device nor wrapped
    attention: str
    built_sharded: bool


def build_run(cfg: Config, strategy, device, dist, work_dir: Path, info: Callable[[str], None]) -> Run:
    built_sharded = False
    if cfg.llava is not None and cfg.preference is not None:
        raise TunerError("preference training of LLaVA models is not supported yet",
                         hint="remove the preference section, or train the LLM alone on text pairs")
    if cfg.llava is not None:
        tokenizer, sequences, model = _llava_data_and_model(cfg, info)
    else:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        check_template(cfg, tokenizer, info)
        if dist.is_main:
            save_chat_template(cfg, tokenizer, work_dir)
        started = time.perf_counter()
        if cfg.rl is not None:  # online RL: the data are prompts; completions are sampled during training
            from tuner.data.prompts import build_prompts
            sequences = build_prompts(cfg.data, tokenizer, cfg.rl.max_prompt_length, say=info)
            report = sequences
        elif cfg.preference is not None and cfg.preference.method == "kto":
            from tuner.data.kto import build_kto_sequences
            sequences, report = build_kto_sequences(cfg.data, tokenizer, cfg.train.seed, say=info)
        elif cfg.preference is not None:
            from tuner.data.pairs import build_pair_sequences
            sequences, report = build_pair_sequences(cfg.data, tokenizer, cfg.train.seed, say=info)
        else:
            sequences, report = build_sequences(cfg.data, tokenizer, cfg.train.seed, say=info)
        info(f"Data: {report.summary()} ({time.perf_counter() - started:.1f}s)")
        for line in report.details().splitlines():
            info(f"Data: {line}")
        model, built_sharded = strategy.load_model(cfg, device, dist, info)
        if cfg.head == "reward":  # (its own forward needs it to find each row's last token)
            model.config.pad_token_id = tokenizer.pad_token_id
    attention = packed_attention.use_for_training(model, cfg.model.attn_implementation, device)
    if cfg.data.pack and cfg.llava is None and cfg.rl is None:
        packed_attention.check_packing(model, attention)
    converted = describe_conversion(cfg.model.path)
    if converted:
        info(f"Model: {converted}")
    if cfg.train.gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) without hooks
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.llava is not None:
        model = _llava_trainable(cfg, model, info)
    elif cfg.lora is not None:
        model = apply_lora(model, cfg.lora, quantized=cfg.model.quantization is not None,
                           task="SEQ_CLS" if cfg.head == "reward" else "CAUSAL_LM")
    else:
        model = prepare_full(model, cfg.model.freeze)
    return Run(tokenizer, sequences, getattr(sequences, "collate", collate), model, attention, built_sharded)


def check_template(cfg: Config, tokenizer, info: Callable[[str], None], rows: int = 8) -> None:
    """A named template against the tokenizer's own chat template, on the first rows."""
    data = cfg.data
    if data.template is None or data.template_check == "off" or not getattr(tokenizer, "chat_template", None):
        return
    from tuner.data.inspection import conversations, template_report_text
    from tuner.data.template_check import compare_templates
    from tuner.data.templates import get_template

    if cfg.rl is not None:  # prompts: each with a short reply
        from tuner.data.prompts import prompt_conversations
        first = prompt_conversations(data, rows)
    else:
        first = conversations(data, limit=rows, skip_bad=True)  # the data build reports bad rows
    if not first:  # pretraining text: no template is applied
        return
    report = compare_templates(get_template(data.template, tokenizer), tokenizer, first)
    if report.ok:
        info(f"Data: template {data.template!r} equals the tokenizer's own chat template: {report.summary()}")
        return
    text = f"template {data.template!r} differs from the tokenizer's own chat template: " + template_report_text(report)
    if data.template_check == "error":
        raise TunerError(text, hint="set data.template=None to train with the tokenizer's own template, "
                                    "or data.template_check='warn'")
    info(f"Warning: {text}")


def save_chat_template(cfg: Config, tokenizer, work_dir: Path) -> None:
    """The exact template trained with, as Jinja, in the work dir (pth_to_hf writes it into outputs)."""
    from tuner.data.template_jinja import trained_chat_template

    template = trained_chat_template(cfg.data.template, tokenizer)
    if template:
        (work_dir / "chat_template.jinja").write_text(template, encoding="utf-8")


def _llava_data_and_model(cfg: Config, info: Callable[[str], None]):
    """Tokenizer with <image>, the image data, and the LLaVA model (vision encoder + projector + LLM)."""
    from tuner.data.llava import build_image_sequences
    from tuner.model.llava import build_llava, tokenizer_with_image_token, vision_info

    tokenizer = tokenizer_with_image_token(cfg.model.path, cfg.model.trust_remote_code)
    vision = vision_info(cfg.llava, tokenizer)
    started = time.perf_counter()
    sequences = build_image_sequences(cfg.data, cfg.llava, tokenizer, vision, say=info, seed=cfg.train.seed)
    info(f"Data: ready in {time.perf_counter() - started:.1f}s")
    return tokenizer, sequences, build_llava(cfg.model, cfg.llava, tokenizer)


def _llava_trainable(cfg: Config, model, info: Callable[[str], None]):
    from tuner.model.llava import apply_llava_lora, load_projector, set_trainable

    if cfg.llava.pretrained_pth:
        count = load_projector(model, cfg.llava.pretrained_pth)
        info(f"Model: projector ({count} tensors) loaded from {cfg.llava.pretrained_pth}")
    if cfg.lora is not None or cfg.llava.visual_encoder_lora is not None:
        model = apply_llava_lora(model, cfg)
    set_trainable(model, cfg.llava, cfg.lora is not None, cfg.llava.visual_encoder_lora is not None)
    model.save_trainable_only = True  # checkpoints hold the projector and adapters, not the frozen towers
    return model
