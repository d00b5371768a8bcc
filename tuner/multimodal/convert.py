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

import json
from pathlib import Path

import torch

from tuner.config import Config, LlavaConfig, ModelConfig
from tuner.errors import TunerError
from tuner.multimodal.model import (PROJECTOR_FILE, RECIPE_FILE, VisionInfo, apply_llava_lora, build_llava,
                                    load_projector, tokenizer_with_image_token, tokens_per_image, vision_info,
                                    write_recipe)

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


def load_llava_for_chat(model_path: str, llava_dir: str | None, visual_encoder: str | None, dtype: torch.dtype,
                        trust_remote_code: bool = False):
    """(model, tokenizer, VisionInfo, template name) from an HF Llava folder, or from the LLM
    plus a pth_to_hf folder (projector, optional adapter, recipe)."""
    from tuner.model.load import load_config, resolve_model_path

    if llava_dir is None:  # MODEL itself is a LlavaForConditionalGeneration folder
        from transformers import AutoImageProcessor, LlavaForConditionalGeneration

        from tuner.model.load import load_tokenizer
        path = resolve_model_path(model_path)
        if load_config(path).model_type != "llava":
            raise TunerError(f"{model_path} is not a LLaVA model folder; give --llava DIR (a pth_to_hf folder)")
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
        processor = AutoImageProcessor.from_pretrained(path)
        vision = VisionInfo(model.config.image_token_id, tokens_per_image(model.config.vision_config), processor,
                            True)
        return model.eval(), tokenizer, vision, None
    recipe_file = Path(llava_dir) / RECIPE_FILE
    if not recipe_file.exists():
        raise TunerError(f"{llava_dir} holds no {RECIPE_FILE}: not a LLaVA pth_to_hf folder")
    recipe = json.loads(recipe_file.read_text())
    llava = LlavaConfig(visual_encoder=visual_encoder or recipe["visual_encoder"], select_layer=recipe["select_layer"],
                        pad_image_to_square=recipe["pad_image_to_square"])
    tokenizer = tokenizer_with_image_token(llava_dir)
    trust = trust_remote_code or bool(recipe.get("trust_remote_code"))
    model = build_llava(ModelConfig(path=model_path, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16",
                                                           torch.float16: "float16"}.get(dtype, "auto"),
                                    trust_remote_code=trust), llava, tokenizer)
    load_projector(model, llava_dir)
    if (Path(llava_dir) / "adapter_config.json").exists():
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, llava_dir).merge_and_unload()
    model.config.use_cache = True
    return model.eval(), tokenizer, vision_info(llava, tokenizer), recipe.get("template")
