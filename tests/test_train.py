"""The loop on a tiny model: it learns, packing and accumulation do not change the loss,
resume is exact, checkpoints are kept as configured, and converted models match."""

import json

import pytest
import torch

from tuner.config import load_config
from tuner.convert.hf import merge, pth_to_hf
from tuner.data.dataset import collate
from tuner.engine.checkpoint import checkpoints_in
from tuner.engine.loop import Trainer
from tuner.errors import TunerError

from conftest import write_config


def make_trainer(tmp_path, tiny_model_dir, data_file, work="work", options=(), **settings):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file, **settings), list(options))
    return Trainer(cfg, work_dir=tmp_path / work)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_training_lowers_the_loss(tmp_path, tiny_model_dir, data_file, lora):
    trainer = make_trainer(tmp_path, tiny_model_dir, data_file, lora=lora, epochs=8, lr=1e-2 if lora else 2e-3)
    losses = trainer.train()
    assert len(losses) == trainer.cfg.train.max_epochs * trainer.schedule.steps_per_epoch
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0], losses


def test_packed_loss_equals_unpacked_loss(tmp_path, tiny_model_dir, data_file):
    trainer = make_trainer(tmp_path, tiny_model_dir, data_file)
    trainer.setup()
    samples = [trainer.sequences[0]]  # packed: several conversations in one row
    pieces = []  # the same conversations one per row
    starts = [i for i, p in enumerate(samples[0].position_ids) if p == 0] + [len(samples[0].position_ids)]
    for a, b in zip(starts, starts[1:]):
        from tuner.data.dataset import Sample
        pieces.append(Sample(samples[0].input_ids[a:b], samples[0].labels[a:b]))
    assert len(pieces) > 1
    with torch.no_grad():
        packed = trainer.loss_sum(collate(samples, 0))
        unpacked = trainer.loss_sum(collate(pieces, 0))
    assert torch.allclose(packed, unpacked, rtol=1e-5), (packed, unpacked)


def test_accumulation_is_token_weighted_like_one_big_batch(tmp_path, tiny_model_dir, data_file):
    """4 micro-batches of 1 give the same update as 1 batch of 4 (loss = mean over all trained tokens)."""
    big = make_trainer(tmp_path, tiny_model_dir, data_file, work="big", batch_size=4, accum=1, pack=False, epochs=1)
    small = make_trainer(tmp_path, tiny_model_dir, data_file, work="small", batch_size=1, accum=4, pack=False,
                         epochs=1)
    assert big.train() == pytest.approx(small.train(), rel=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, data_file, workers):
    """Exact with dropout, with DataLoader workers too (their seed no longer comes from the restored RNG)."""
    options = [f"train.dataloader_num_workers={workers}"]
    full = make_trainer(tmp_path, tiny_model_dir, data_file, work="full", epochs=3, save_steps=2, dropout=0.1,
                        options=options)
    losses = full.train()
    assert full.total_steps >= 6  # the resume point below falls inside the second epoch
    saved = [p.name for p in checkpoints_in(tmp_path / "full")]
    assert saved[:3] == ["iter_2.pth", "iter_4.pth", "iter_6.pth"] and saved[-1] == f"iter_{full.total_steps}.pth"
    resumed = make_trainer(tmp_path, tiny_model_dir, data_file, work="resumed", epochs=3, save_steps=2, dropout=0.1,
                           options=options)
    resumed.resume = str(tmp_path / "full" / "iter_4.pth")
    assert resumed.train() == losses[4:]  # exact, not approximate: same batches, same dropout masks


def test_resume_auto_and_save_total_limit(tmp_path, tiny_model_dir, data_file):
    trainer = make_trainer(tmp_path, tiny_model_dir, data_file, epochs=1, save_steps=1,
                           options=["checkpoint.save_total_limit=2"])
    trainer.train()
    n = trainer.total_steps
    work = tmp_path / "work"
    assert [p.name for p in checkpoints_in(work)] == [f"iter_{n - 1}.pth", f"iter_{n}.pth"]
    assert (work / "last_checkpoint").read_text().endswith(f"iter_{n}.pth")
    assert not list(work.glob("*.tmp"))
    again = make_trainer(tmp_path, tiny_model_dir, data_file, epochs=2, save_steps=1)
    again.resume = "auto"
    assert len(again.train()) == n and again.start_step == n
    run_dirs = [d for d in work.iterdir() if d.is_dir()]
    scalars = [json.loads(line) for d in run_dirs for line in (d / "vis_data" / "scalars.json").read_text().splitlines()]
    assert sorted(s["step"] for s in scalars) == list(range(1, 2 * n + 1))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(scalars[0])


def test_resume_rejects_other_method(tmp_path, tiny_model_dir, data_file):
    make_trainer(tmp_path, tiny_model_dir, data_file, epochs=1).train()
    full = make_trainer(tmp_path, tiny_model_dir, data_file, work="other", lora=False, epochs=1)
    full.resume = "auto"
    full.work_dir = tmp_path / "work"
    with pytest.raises(TunerError, match="is a lora checkpoint but the config trains full"):
        full.train()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_pth_to_hf_and_merge_equal_the_trained_model(tmp_path, tiny_model_dir, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, tiny_model_dir, data_file, epochs=2, lr=1e-2)
    trainer.train()
    ids = torch.tensor([trainer.sequences[0].input_ids[:40]])
    trained = _logits(trainer.model.eval(), ids)
    adapter = pth_to_hf(trainer.cfg, checkpoints_in(tmp_path / "work")[-1], tmp_path / "adapter")
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = _logits(base, ids)
    with_adapter = _logits(PeftModel.from_pretrained(base, adapter).eval(), ids)
    assert (with_adapter - trained).abs().max() < 1e-4
    assert (with_adapter - base_logits).abs().max() > 1e-2  # the adapter changes the model

    merged_dir = merge(str(tiny_model_dir), adapter, tmp_path / "merged", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float32
    assert (_logits(merged, ids) - with_adapter).abs().max() < 1e-3
    assert (merged_dir / "tokenizer.json").exists() and (merged_dir / "chat_template.jinja").exists()
    with pytest.raises(TunerError, match="already exists and is not empty"):
        merge(str(tiny_model_dir), adapter, merged_dir, device="cpu")


def test_full_pth_to_hf_keeps_dtype_unless_fp32(tmp_path, tiny_model_dir, data_file):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, tiny_model_dir, data_file, lora=False, epochs=1)
    trainer.train()
    ids = torch.tensor([trainer.sequences[0].input_ids[:40]])
    trained = _logits(trainer.model.eval(), ids)
    pth = checkpoints_in(tmp_path / "work")[-1]
    out = pth_to_hf(trainer.cfg, pth, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (_logits(reloaded, ids) - trained).abs().max() < 1e-5
    assert (out / "tokenizer.json").exists()

    trainer.cfg.model.dtype = "bfloat16"
    bf16 = AutoModelForCausalLM.from_pretrained(pth_to_hf(trainer.cfg, pth, tmp_path / "hf_bf16"), dtype="auto")
    assert bf16.dtype == torch.bfloat16
    fp32 = AutoModelForCausalLM.from_pretrained(pth_to_hf(trainer.cfg, pth, tmp_path / "hf32", fp32=True), dtype="auto")
    assert fp32.dtype == torch.float32


def test_hook_function_written_in_the_config_runs_every_step(tmp_path, tiny_model_dir, data_file):
    extra = "\nSEEN = []\n\ndef remember(trainer, step, metrics):\n    SEEN.append((step, metrics['loss']))\n\n" \
            "custom_hooks = [remember]\n"
    cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file, epochs=1, extra=extra))
    trainer = Trainer(cfg, work_dir=tmp_path / "work")
    losses = trainer.train()
    seen = cfg.custom_hooks[0].__globals__["SEEN"]
    assert seen == list(enumerate(losses, start=1))


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from tuner.engine import checkpoint as ckpt

    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, keep=2)

    def disk_full(obj, path):
        open(path, "wb").write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, 2, {"step": 2}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_1.pth", "last_checkpoint"]
    assert (tmp_path / "last_checkpoint").read_text().endswith("iter_1.pth")
    assert ckpt.load_checkpoint(tmp_path / "iter_1.pth") == {"step": 1}


@pytest.mark.parametrize("option", ["lora.use_dora=true", "lora.use_rslora=true",
                                    "lora.target_modules=q_proj,v_proj"])
def test_lora_variants_train_and_convert(tmp_path, tiny_model_dir, data_file, option):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, tiny_model_dir, data_file, epochs=1, lr=1e-2, options=[option])
    losses = trainer.train()
    assert losses[-1] < losses[0]
    ids = torch.tensor([trainer.sequences[0].input_ids[:30]])
    trained = _logits(trainer.model.eval(), ids)
    adapter = pth_to_hf(trainer.cfg, checkpoints_in(tmp_path / "work")[-1], tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    assert (_logits(loaded, ids) - trained).abs().max() < 1e-4


def test_a_cold_peak_flops_probe_leaves_the_run_as_its_seed_makes_it(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """A machine's first run measures the matmul peak after seeding; its random matrices come from their own
    generator, so the dropout masks (the losses) equal those of a run that read the peak from the cache."""
    monkeypatch.setenv("TUNER_CACHE", str(tmp_path / "cold"))
    cold = make_trainer(tmp_path, tiny_model_dir, data_file, work="cold", dropout=0.1, options=["train.max_steps=2"])
    first = cold.train()
    assert (tmp_path / "cold").exists()  # it measured, and cached
    warm = make_trainer(tmp_path, tiny_model_dir, data_file, work="warm", dropout=0.1, options=["train.max_steps=2"])
    assert warm.train() == first
