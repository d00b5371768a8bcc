"""LLaVA checkpoints -> folders, and folders -> a model to chat with.

`tuner convert pth_to_hf CFG iter_N.pth DIR` (save format `tuner`) writes only what was
trained, beside a recipe to rebuild the rest:

    DIR/projector.safetensors       linear_1 / linear_2 of the projector
    DIR/adapter_config.json + adapter_model.safetensors    LoRA (finetune stage, if any)
    DIR/llava.json                  LLM, visual encoder, select layer, padding, template
    DIR/tokenizer files             with the <image> token

`--save-format hf` writes a whole `LlavaForConditionalGeneration` folder (LoRA merged)
with its processor, which plain transformers loads and generates from.
"""

from __future__ import annotations

from pathlib import Path

from tuner.config import Config
from tuner.errors import TunerError
from tuner.model.llava import (
    PROJECTOR_FILE,
    apply_llava_lora,
    build_llava,
    tokenizer_with_image_token,
    vision_info,
    write_recipe,
)


def _split(weights: dict) -> tuple[dict, dict, dict]:
    """Checkpoint weights -> (projector by its own names, LoRA weights by PEFT's names, the rest:
    weights of a tower trained in full, by their names in the LLaVA model)."""
    projector = {k.split("multi_modal_projector.", 1)[1]: v for k, v in weights.items() if "multi_modal_projector." in k}
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    full = {k: v for k, v in weights.items() if k not in lora and "multi_modal_projector." not in k}
    return projector, lora, full


def write_llava_parts(cfg: Config, weights: dict, out: Path) -> None:
    from safetensors.torch import save_file

    projector, lora, full = _split(weights)
    if full:
        raise TunerError(f"this checkpoint trains a tower in full ({next(iter(full))}, ...): write it with "
                         "--save-format hf (a whole LlavaForConditionalGeneration folder)")
    save_file({k: v.contiguous() for k, v in projector.items()}, str(out / PROJECTOR_FILE), metadata={"format": "pt"})
    if lora:
        _peft_config(cfg).save_pretrained(str(out))
        save_file({k: v.contiguous() for k, v in lora.items()}, str(out / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    write_recipe(out, cfg)
    tokenizer_with_image_token(cfg.model.path, cfg.model.trust_remote_code).save_pretrained(out)


def _peft_config(cfg: Config):
    """The same PEFT config training used (built on a model skeleton to list the target layers)."""
    tokenizer = tokenizer_with_image_token(cfg.model.path, cfg.model.trust_remote_code)
    model = apply_llava_lora(build_llava(cfg.model, cfg.llava, tokenizer, meta=True), cfg)
    config = model.peft_config["default"]
    config.base_model_name_or_path = cfg.model.path
    return config


def write_llava_hf(cfg: Config, weights: dict, out: Path, max_shard_size: str) -> None:
    """A LlavaForConditionalGeneration folder plus its processor; LoRA merged into the weights."""
    from transformers import LlavaProcessor

    projector, lora, full = _split(weights)
    tokenizer = tokenizer_with_image_token(cfg.model.path, cfg.model.trust_remote_code)
    model = build_llava(cfg.model, cfg.llava, tokenizer)
    model.model.multi_modal_projector.load_state_dict(projector)
    if full:
        unexpected = model.load_state_dict(full, strict=False).unexpected_keys
        if unexpected:
            raise TunerError(f"the checkpoint holds weights this model lacks: {unexpected[:3]}")
    if lora:
        from peft import set_peft_model_state_dict
        model = apply_llava_lora(model, cfg)
        set_peft_model_state_dict(model, lora)
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(out, max_shard_size=max_shard_size)
    vision = vision_info(cfg.llava, tokenizer)
    processor = LlavaProcessor(image_processor=vision.processor, tokenizer=tokenizer,
                               patch_size=model.config.vision_config.patch_size,
                               vision_feature_select_strategy=model.config.vision_feature_select_strategy,
                               num_additional_image_tokens=1 if model.config.vision_feature_select_strategy ==
                               "default" else 0, image_token="<image>",
                               chat_template=getattr(tokenizer, "chat_template", None))
    processor.save_pretrained(out)
