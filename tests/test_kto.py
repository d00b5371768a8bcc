"""KTO: single answers marked desirable or not; the loss, its KL estimate and metrics against TRL's
KTOTrainer, the data form, pairs split into desirable and undesirable answers, and a training run."""

import pytest
import torch
from conftest import scalars
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


def test_kto_refuses_a_batch_of_one(tmp_path, tiny_model_dir):
    """With one example per micro-batch its KL row would be its own answer (no KL anchor): refused when
    the config loads, --cfg-options included, with exit 1 from the CLI."""
    from test_cli import tuner

    from tuner.config import load_config
    from tuner.errors import TunerError

    cfg = preference_config(tmp_path, tiny_model_dir, ROWS, name="kto_one", pack=False, batch_size=1,
                            preference="PreferenceConfig(method='kto')")
    with pytest.raises(TunerError, match="needs train.batch_size >= 2"):
        load_config(cfg)
    ok = preference_config(tmp_path, tiny_model_dir, ROWS, name="kto_two", pack=False, batch_size=2,
                           preference="PreferenceConfig(method='kto')")
    with pytest.raises(TunerError, match="needs train.batch_size >= 2, got 1"):
        load_config(ok, ["train.batch_size=1"])
    run = tuner("train", cfg, "--work-dir", tmp_path / "w", check=False)
    assert run.returncode == 1 and "needs train.batch_size >= 2" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("n,batch,world", [(9, 2, 1), (9, 2, 2), (5, 4, 2), (7, 3, 1), (2, 2, 2)])
def test_a_kl_row_never_takes_its_own_answer(n, batch, world):
    """Every sequence's KL partner is another sequence, an epoch's last micro-batch of one and the empty
    micro-batch of a rank with nothing left (it runs sequence 0) included; and the step's KL rows over all
    ranks are the ones one process with the whole batch makes (so DDP equals one process)."""
    from tuner.engine.batches import StepSchedule

    def pairs(schedule, step, ranks):
        out = set()
        for rank in range(ranks):
            for idx, others in zip(schedule.micro_batches(step, rank), schedule.kl_partners(step, rank)):
                assert len(others) == len(idx or [0])
                for i, p in zip(idx or [0], others):
                    assert i != p, (step, rank, idx, others)
                    if idx:
                        out.add((i, p))
        return out

    schedule = StepSchedule(n, batch, 1, seed=3, shuffle=True, world_size=world)
    whole = StepSchedule(n, batch * world, 1, seed=3, shuffle=True, world_size=1)
    for step in range(schedule.steps_per_epoch * 2):
        assert pairs(schedule, step, world) == pairs(whole, step, 1)


def test_kto_batches_pair_each_prompt_with_another_answer(tmp_path, tokenizer):
    """An epoch's last micro-batch of one example: its KL row is its prompt with another example's answer,
    not its own (which made the KL term vanish)."""
    from tuner.engine.batches import StepBatches, StepSchedule

    sequences = kto_sequences(tmp_path, tokenizer, ROWS[:3], "three.jsonl")
    schedule = StepSchedule(len(sequences), 2, 1, seed=0, shuffle=False)
    last = StepBatches(schedule, sequences, sequences.collate, tokenizer.pad_token_id, 0, lambda b: 1)[1]
    (batch,) = last.batches
    assert len(batch["desirable"]) == 1
    row = batch["input_ids"][0][batch["sample_ids"][0] >= 0].tolist()
    kl_row = batch["kl_input_ids"][0][batch["kl_sample_ids"][0] >= 0].tolist()
    own, other = sequences[2], sequences[0]
    assert row == own.ids and kl_row == own.ids[:own.start] + other.ids[other.start:] != row
    with pytest.raises(ValueError, match="batch of one"):
        sequences.collate([own], tokenizer.pad_token_id)


@pytest.mark.slow
def test_two_process_kto_equals_one_process(tmp_path, tiny_model_dir, monkeypatch):
    """KTO under DDP, 2 CPU processes x batch 2, against one process x batch 4: the same KL rows per step
    and the mean of the processes' KL estimates, so the same losses and KL. (The logged reward means are
    per micro-batch, weighted by its examples: they differ where the processes' shares of desirable
    answers differ.)"""
    from test_cli import tuner

    rows = ROWS * 2  # 16 examples: 4 steps of 4, no remainder
    settings = dict(pack=False, epochs=1, preference="PreferenceConfig(method='kto')")
    one = preference_config(tmp_path, tiny_model_dir, rows, name="one", batch_size=4, **settings)
    two = preference_config(tmp_path, tiny_model_dir, rows, name="two", batch_size=2, **settings)
    tuner("train", one, "--work-dir", tmp_path / "one")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("PORT", "29585")
    assert "2 processes (DDP" in tuner("train", two, "--work-dir", tmp_path / "two").stderr

    single, double = scalars(tmp_path / "one"), scalars(tmp_path / "two")
    assert len(single) == len(double) == 4
    assert any(s["kl"] > 0 for s in single[1:])  # the KL estimate is in play
    for name in ("loss", "kl"):
        assert [s[name] for s in double] == pytest.approx([s[name] for s in single], rel=1e-4, abs=1e-6), name


def test_full_kto_under_fsdp_or_zero3_names_what_works(tiny_model_dir):
    """A frozen copy is not sharded, so full-FT KTO under FSDP / ZeRO-3 is refused; the hint names what
    works (it used to say reference='precompute', which KTO refuses)."""
    import types

    from transformers import AutoModelForCausalLM

    from tuner.engine.kto import KtoLoss
    from tuner.errors import TunerError

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = types.SimpleNamespace(cfg=types.SimpleNamespace(lora=None), raw_model=model, model=model, dist=None,
                                    seqpar=None,
                                    strategy=types.SimpleNamespace(sharded=lambda m: True))
    objective = KtoLoss(torch.device("cpu"), torch.float32, "sdpa", True, settings=PreferenceConfig(method="kto"))
    with pytest.raises(TunerError) as refused:
        objective.prepare(trainer)
    assert "reference='precompute'" not in refused.value.hint and "reference='adapter'" in refused.value.hint
