"""A LLaVA model: vision encoder -> projector (Linear-GELU-Linear) -> the LLM's embeddings.

It is transformers' own `LlavaForConditionalGeneration`, assembled from a CLIP or SigLIP
vision model and a causal LM, so the result saves as a folder plain transformers loads.
Each `<image>` in a prompt is expanded to one image token per patch; the model replaces
those tokens' embeddings with the image's projected patch features, image by image, so a
sample may hold several images.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tuner.config import Config, LlavaConfig, ModelConfig
from tuner.data.formats import IMAGE_TOKEN
from tuner.data.llava import VisionInfo
from tuner.errors import TunerError
from tuner.model.load import (
    DTYPES,
    call_loader,
    load_causal_lm,
    load_config,
    load_tokenizer,
    resolve_model_path,
)

RECIPE_FILE = "llava.json"
PROJECTOR_FILE = "projector.safetensors"  # what pth_to_hf writes beside the projector: how to rebuild the model


def is_llava_folder(model: str) -> bool:
    """A LlavaForConditionalGeneration folder (pth_to_hf --save-format hf)?"""
    config = Path(model) / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "llava"


def tokenizer_with_image_token(path: str, trust_remote_code: bool = False):
    tokenizer = load_tokenizer(path, trust_remote_code)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def encoder_vision_config(name: str):
    """The vision half's config of a CLIP or SigLIP model (a full model or its vision tower)."""
    config = load_config(name)
    vision_config = getattr(config, "vision_config", config)
    if vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise TunerError(f"{name}: the visual encoder must be a CLIP or SigLIP model, got {config.model_type}")
    return vision_config


def tokens_per_image(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


def vision_info(llava: LlavaConfig, tokenizer) -> VisionInfo:
    from transformers import AutoImageProcessor

    processor = call_loader(AutoImageProcessor.from_pretrained, resolve_model_path(llava.visual_encoder))
    return VisionInfo(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                      tokens_per_image(encoder_vision_config(llava.visual_encoder)), processor,
                      llava.pad_image_to_square)


def build_llava(model_cfg: ModelConfig, llava: LlavaConfig, tokenizer, meta: bool = False):
    """LlavaForConditionalGeneration from the LLM in `model_cfg` and `llava.visual_encoder`: the
    loaded towers are put in place as they are (no copy), the projector is new. `meta`: the
    structure only, no weights read (to name layers)."""
    from transformers import (
        CLIPVisionModel,
        LlavaForConditionalGeneration,
        SiglipVisionModel,
    )
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    dtype = DTYPES[model_cfg.dtype]
    remote = model_cfg.trust_remote_code
    encoder_path = resolve_model_path(llava.visual_encoder)
    vision_config = encoder_vision_config(llava.visual_encoder)
    kinds = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
    if meta:
        llm = load_causal_lm(model_cfg.path, remote, meta=True)
        with torch.device("meta"):
            encoder = kinds[vision_config.model_type](vision_config)
    else:
        llm = load_causal_lm(model_cfg.path, remote, dtype=dtype)
        encoder = call_loader(kinds[vision_config.model_type].from_pretrained, encoder_path, dtype=dtype)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        _add_token_rows(llm, len(tokenizer))
    config = HFLlavaConfig(vision_config=encoder.config.to_dict(), text_config=llm.config.to_dict(),
                           image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
                           vision_feature_layer=llava.select_layer,
                           vision_feature_select_strategy="default" if vision_config.model_type.startswith("clip")
                           else "full")
    config.text_config.vocab_size = llm.get_input_embeddings().num_embeddings
    config.tie_word_embeddings = bool(getattr(llm.config, "tie_word_embeddings", False))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = encoder
    model.model.language_model = llm.model
    model.lm_head = llm.get_output_embeddings()  # `lm_head` in most families, not in every one
    with torch.random.fork_rng():  # the new projector starts the same in every run; the run's own seed stays
        torch.manual_seed(0)
        model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(torch.float32)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover and not meta:
        raise TunerError(f"building the LLaVA model left {leftover[:3]} unset")
    model.config.use_cache = False
    return model


def _add_token_rows(llm, size: int) -> None:
    """Grow the embeddings for <image>; its row is the mean row (it is never predicted: labels ignore it)."""
    old = llm.get_input_embeddings().weight.detach()
    llm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[old.shape[0]:] = old.mean(0)
        head = llm.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != llm.get_input_embeddings().weight.data_ptr():
            head.weight[old.shape[0]:] = head.weight[:old.shape[0]].mean(0)


def set_trainable(model, llava: LlavaConfig, llm_lora: bool, vision_lora: bool) -> None:
    """Pretrain: projector only. Finetune: projector + the LLM (LoRA or full) + optionally the encoder."""
    for name, parameter in model.named_parameters():
        dotted = f".{name}"
        if "lora_" in name or ".multi_modal_projector." in dotted:
            parameter.requires_grad = True
        elif ".vision_tower." in dotted:
            parameter.requires_grad = not llava.freeze_visual_encoder and not vision_lora
        else:  # the LLM and its head
            parameter.requires_grad = not llava.freeze_llm and not llm_lora
        if parameter.requires_grad and parameter.dtype != torch.float32:
            # float32 master weights for what trains, as in every full fine-tune (bf16 updates barely move)
            parameter.data = parameter.data.float()


def lora_targets(model, llm_lora, vision_lora) -> list[str]:
    """Full module names of the linear layers LoRA goes on: the LLM's (not its head), the encoder's."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if ".language_model." in f".{name}" and llm_lora is not None and _wanted(name, llm_lora.target_modules):
            names.append(name)
        elif ".vision_tower." in f".{name}" and vision_lora is not None and _wanted(name, vision_lora.target_modules):
            names.append(name)
    return names


def _wanted(name: str, targets) -> bool:
    if targets == "all-linear":
        return True
    targets = [targets] if isinstance(targets, str) else targets
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_llava_lora(model, cfg: Config):
    """One PEFT model with LoRA on the chosen linear layers of the LLM and / or the encoder."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = cfg.lora or cfg.llava.visual_encoder_lora
    targets = lora_targets(model, cfg.lora, cfg.llava.visual_encoder_lora)
    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules="|".join(re.escape(t) for t in targets),  # full names, fullmatch
                                 use_rslora=lora.use_rslora, use_dora=lora.use_dora)
    return get_peft_model(model, peft_config)


def load_projector(model, source: str) -> int:
    """Projector weights from the pretrain stage: an iter_N.pth or a pth_to_hf folder."""
    path = Path(source)
    if path.is_dir():
        from safetensors.torch import load_file
        file = path / PROJECTOR_FILE
        if not file.exists():
            raise TunerError(f"{source} holds no projector.safetensors: not a LLaVA pth_to_hf folder")
        weights = {f"multi_modal_projector.{k}": v for k, v in load_file(str(file)).items()}
    elif path.exists():
        from tuner.model.load import load_pth
        weights = load_pth(path)["model"]
    else:
        raise TunerError(f"pretrained_pth {source} not found")
    projector = {k.split("multi_modal_projector.", 1)[1]: v for k, v in weights.items()
                 if "multi_modal_projector." in k}
    if not projector:
        raise TunerError(f"{source} holds no projector weights")
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.model.multi_modal_projector.load_state_dict(projector, strict=True)
    return len(projector)


def write_recipe(out: Path, cfg: Config) -> None:
    recipe = {"llm": cfg.model.path, "visual_encoder": cfg.llava.visual_encoder, "select_layer": cfg.llava.select_layer,
              "pad_image_to_square": cfg.llava.pad_image_to_square, "lora": cfg.lora is not None or
              cfg.llava.visual_encoder_lora is not None, "template": cfg.data.template,
              "trust_remote_code": cfg.model.trust_remote_code}
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")


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
        model = call_loader(LlavaForConditionalGeneration.from_pretrained, path, dtype=dtype)
        tokenizer = load_tokenizer(path)
        processor = call_loader(AutoImageProcessor.from_pretrained, path)
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
        from tuner.model.adapt import load_adapter
        model = load_adapter(model, llava_dir).merge_and_unload()
    model.config.use_cache = True
    return model.eval(), tokenizer, vision_info(llava, tokenizer), recipe.get("template")
