"""KTO: single answers marked desirable or not; the loss, its KL estimate and metrics against TRL's
KTOTrainer, the data form, pairs split into desirable and undesirable answers, and a training run."""

import pytest
import torch
from test_preference import PAIRS, preference_config, write_pairs

from tuner.config import DataConfig, PreferenceConfig
from tuner.data.formats import RowError, detect_format, kto_map_fn

ROWS = [{"prompt": p["prompt"], "completion": p[answer], "label": answer == "chosen"}
        for p in PAIRS for answer in ("chosen", "rejected")]


def test_the_kto_form_is_detected_and_checked():
    assert detect_format(ROWS[0]) == "kto"
    assert kto_map_fn({"prompt": "Hi?", "completion": "Hello.", "label": False}) == {
        "messages": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello."}],
        "desirable": False}
    with pytest.raises(RowError, match="'label'.*true .* or false"):
        kto_map_fn({"prompt": "Hi?", "completion": "Hello.", "label": "yes"})
    with pytest.raises(RowError, match="'completion'"):
        kto_map_fn({"prompt": "Hi?", "completion": "", "label": True})


def kto_sequences(tmp_path, tokenizer, rows, name="kto.jsonl"):
    from tuner.data.kto import build_kto_sequences

    data = write_pairs(tmp_path / name, rows)
    cfg = DataConfig(path=str(data), max_length=512, shuffle=False, cache=False)
    return build_kto_sequences(cfg, tokenizer, say=lambda _: None)[0]


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.5)])
def test_kto_loss_kl_and_metrics_equal_trl(tmp_path, tiny_model_dir, tokenizer, weights):
    """The same tiny policy, a different reference, the same rows: TRL 1.16's KTOTrainer makes the same
    tokens for the examples and their KL rows, and its loss, KL estimate, rewards and log-probs equal
    tuner's to 1e-5 (fp32); pairs given instead of KTO rows make the same examples."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    from tuner.engine.kto import KtoLoss

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    desirable_weight, undesirable_weight = weights
    args = KTOConfig(output_dir=str(tmp_path / "kto"), per_device_train_batch_size=len(ROWS), report_to=[],
                     use_cpu=True, bf16=False, fp16=False, max_length=None, beta=0.1,
                     desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tokenizer)
    theirs_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    policy.train()
    theirs = float(trainer.compute_loss(trainer.model, theirs_batch))
    their_metrics = {k: sum(map(float, v)) / len(v) for k, v in trainer._metrics["train"].items()}

    sequences = kto_sequences(tmp_path, tokenizer, ROWS)
    from_pairs = kto_sequences(tmp_path, tokenizer, PAIRS, "pairs.jsonl")
    batch = sequences.collate([sequences[k] for k in range(len(sequences))], tokenizer.pad_token_id)
    again = from_pairs.collate([from_pairs[k] for k in range(len(from_pairs))], tokenizer.pad_token_id)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    for prefix, mask in (("", "attention_mask"), ("kl_", "KL_attention_mask")):
        for row in range(len(ROWS)):
            ours = batch[prefix + "input_ids"][row][batch[prefix + "sample_ids"][row] >= 0]
            their_ids = theirs_batch[prefix.upper() + "input_ids"][row][theirs_batch[mask][row].bool()]
            assert ours.tolist() == their_ids.tolist(), (prefix, row)
    settings = PreferenceConfig(method="kto", beta=0.1, desirable_weight=desirable_weight,
                                undesirable_weight=undesirable_weight, reference="copy")
    objective = KtoLoss(torch.device("cpu"), torch.float32, "sdpa", True, settings=settings)
    objective.reference, objective.reference_model = "copy", reference
    n = objective.units(batch)
    ours = float(objective(policy, batch)) / n
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert float(objective.metrics[name]) / n == pytest.approx(their_metrics[name], rel=1e-5, abs=1e-6), name


def test_kto_trains_with_the_adapter_off_as_reference(tmp_path, tiny_model_dir):
    """A LoRA KTO run on KTO rows: the reference is the base with the adapter off, the loss falls and
    the log shows the rewards and the KL estimate."""
    from tuner.config import load_config
    from tuner.engine.loop import Trainer

    cfg = preference_config(tmp_path, tiny_model_dir, ROWS * 2, name="kto_run", pack=False,
                            preference="PreferenceConfig(method='kto')")
    trainer = Trainer(load_config(cfg), work_dir=tmp_path / "work")
    losses = trainer.train()
    assert trainer.objective.reference == "adapter" and losses[-1] < losses[0], losses
    log = next((tmp_path / "work").glob("*/*.log")).read_text()
    assert "kl:" in log and "rewards chosen / rejected" in log


def test_kto_rows_in_check_custom_dataset_and_log_dataset(tmp_path, tiny_model_dir, tokenizer):
    from tuner.config import load_config
    from tuner.data.inspection import check_custom_dataset, log_dataset

    cfg = load_config(preference_config(tmp_path, tiny_model_dir, ROWS, name="kto_show", pack=False,
                                        preference="PreferenceConfig(method='kto')"))
    report, bad = check_custom_dataset(cfg, tokenizer, samples=2)
    assert bad == 0 and "(desirable)" in report and "(undesirable)" in report and "All 8 rows are valid" in report
    shown = log_dataset(cfg, tokenizer, show="masked_text", num=2)
    assert "sequence 0, desirable: masked_text" in shown and "sequence 1, undesirable" in shown
    assert "Paris." in shown
