"""QLoRA on CPU with bitsandbytes: 4-bit NF4 base, LoRA on top, gradients that stay right."""

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import write_config  # noqa: E402

from tuner.config import LoraConfig, ModelConfig, load_config  # noqa: E402
from tuner.engine.loop import Trainer  # noqa: E402
from tuner.generation.generate import GenerationSettings, Generator  # noqa: E402
from tuner.model.adapt import apply_lora  # noqa: E402
from tuner.model.load import load_model  # noqa: E402


def dense_copy_of(qlora_model, tiny_model_dir):
    """The same network with the 4-bit weights dequantized into ordinary Linear layers."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dense = apply_lora(dense, LoraConfig(r=8, alpha=16, dropout=0.0))
    quantized = dict(qlora_model.named_modules())
    with torch.no_grad():
        for name, module in dense.named_modules():
            twin = quantized.get(name)
            if isinstance(twin, bnb.nn.Linear4bit):
                module.weight.copy_(bf.dequantize_4bit(twin.weight.data, twin.weight.quant_state).float())
        dense.load_state_dict({k: v for k, v in qlora_model.state_dict().items() if "lora_" in k}, strict=False)
    return dense


def test_qlora_gradients_match_a_dense_reference_after_an_eval_pass(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    base = load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32", quantization="4bit"))
    qlora = apply_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0), quantized=True)
    with torch.no_grad():  # non-zero B, so that A gets gradients too
        for name, param in qlora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    dense = dense_copy_of(qlora, tiny_model_dir)
    # The trap: a no-grad generate (as the evaluate-chat hook does) repacks CPU 4-bit weights
    Generator(qlora, tokenizer).reply([{"role": "user", "content": "Hi"}], GenerationSettings(max_new_tokens=4))
    ids = torch.tensor([tokenizer("Paris is the capital of France.")["input_ids"]])
    grads = {}
    for label, model in (("qlora", qlora), ("dense", dense)):
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["qlora"].keys() == grads["dense"].keys() and len(grads["qlora"]) > 0
    for name, grad in grads["qlora"].items():
        assert torch.allclose(grad, grads["dense"][name], rtol=1e-3, atol=1e-5), name


def test_qlora_training_lowers_the_loss_and_saves_an_adapter(tmp_path, tiny_model_dir, data_file):
    from tuner.convert.hf import pth_to_hf
    from tuner.engine.checkpoint import checkpoints_in

    cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file, epochs=6, lr=1e-2, inputs=["Hi"]),
                      ["model.quantization=4bit", "optim.name=paged_adamw_8bit"])
    assert cfg.method == "qlora"
    trainer = Trainer(cfg, work_dir=tmp_path / "work")
    losses = trainer.train()
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses
    adapter = pth_to_hf(cfg, checkpoints_in(tmp_path / "work")[-1], tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").exists()


def test_8bit_base_trains_lora(tmp_path, tiny_model_dir, data_file):
    import bitsandbytes as bnb

    cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file, epochs=3, lr=1e-2),
                      ["model.quantization=8bit"])
    trainer = Trainer(cfg, work_dir=tmp_path / "work")
    losses = trainer.train()
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in trainer.raw_model.modules())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
