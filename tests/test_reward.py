"""Reward models: the pairwise loss against TRL's RewardTrainer, packing, the HF folder pth_to_hf writes
(plain transformers gives the same rewards), `tuner score`, and a reward model learning a preference
the embedded model does not have."""

import json

import pytest
import torch
from test_preference import PAIRS, preference_config, write_pairs

from tuner.config import DataConfig, PreferenceConfig


def reward_model(tiny_model_dir, tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)  # rewards that differ between answers
    return model


def pair_sequences(tmp_path, tokenizer, pack):
    from tuner.data.pairs import build_pair_sequences

    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    cfg = DataConfig(path=str(data), max_length=512, pack=pack, shuffle=False, cache=False)
    return build_pair_sequences(cfg, tokenizer, say=lambda _: None)[0]


def tuner_reward_loss(model, sequences, tokenizer, settings, attention="sdpa"):
    from tuner.engine.reward import RewardLoss

    objective = RewardLoss(torch.device("cpu"), torch.float32, attention, False, settings=settings)
    batch = sequences.collate([sequences[k] for k in range(len(sequences))], tokenizer.pad_token_id)
    n = objective.units(batch)
    loss = objective(model, batch) / n
    return float(loss), {k: float(v) / n for k, v in objective.metrics.items()}, batch


@pytest.mark.parametrize("center", [0.0, 0.01])
def test_reward_loss_and_metrics_equal_trl(tmp_path, tiny_model_dir, tokenizer, center):
    """The same tiny reward model and rows: TRL 1.16's RewardTrainer tokenizes the pairs into the same
    tokens as tuner, and its loss (with and without centring) and its accuracy and margin equal tuner's."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model = reward_model(tiny_model_dir, tokenizer)
    args = RewardConfig(output_dir=str(tmp_path / "rm"), per_device_train_batch_size=len(PAIRS), report_to=[],
                        use_cpu=True, bf16=False, fp16=False, max_length=None,
                        center_rewards_coefficient=center or None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    their_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))])
    model.train()
    theirs = float(trainer.compute_loss(model, their_batch))
    their_metrics = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
    ours, our_metrics, our_batch = tuner_reward_loss(model, pair_sequences(tmp_path, tokenizer, False), tokenizer,
                                                     PreferenceConfig(method="reward", center_rewards=center))
    n = len(PAIRS)
    for k in range(n):
        for answer in (0, 1):
            row, theirs_at = our_batch["sample_ids"] == 2 * k + answer, answer * n + k
            their_ids = their_batch["input_ids"][theirs_at][their_batch["attention_mask"][theirs_at].bool()]
            assert our_batch["input_ids"][row].tolist() == their_ids.tolist()
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert our_metrics["rewards/accuracies"] == pytest.approx(their_metrics["accuracy"], abs=1e-6)
    assert our_metrics["rewards/margins"] == pytest.approx(their_metrics["margin"], rel=1e-5, abs=1e-6)
    assert 0 < our_metrics["rewards/accuracies"] < 1  # a random head: some pairs each way


def test_packed_pairs_give_the_unpacked_rewards(tmp_path, tiny_model_dir, tokenizer):
    """Each answer's reward is read at its own last token: pairs packed into shared rows give the rewards
    (and so the loss) of one answer per row."""
    from tuner.model import packed_attention

    model = reward_model(tiny_model_dir, tokenizer)
    settings = PreferenceConfig(method="reward")
    unpacked = tuner_reward_loss(model, pair_sequences(tmp_path, tokenizer, False), tokenizer, settings)
    packed_sequences = pair_sequences(tmp_path, tokenizer, True)
    assert len(packed_sequences) < len(PAIRS) * 2
    packed_attention.use_for_training(model, "tuner_packed", torch.device("cpu"))
    packed = tuner_reward_loss(model, packed_sequences, tokenizer, settings, attention=packed_attention.NAME)
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    assert packed[1] == pytest.approx(unpacked[1], rel=1e-5)


@pytest.mark.parametrize("lora", [True, False])
def test_a_trained_reward_model_loads_in_plain_transformers_with_the_same_rewards(tmp_path, tiny_model_dir,
                                                                                  tokenizer, lora):
    """Train a reward model (LoRA with its new head, or full), pth_to_hf: the folder is a reward model
    AutoModelForSequenceClassification loads as it is; its rewards, each conversation alone through the
    tokenizer's chat template, equal those of training's model, and `tuner score` prints them."""
    from test_cli import tuner
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuner.config import load_config
    from tuner.engine.loop import Trainer
    from tuner.errors import TunerError
    from tuner.generation.load import load_chat_model, load_reward_model
    from tuner.generation.score import score_with_reward_model

    cfg_path = preference_config(tmp_path, tiny_model_dir, PAIRS * 2, lora=lora, name="rm", lr=5e-3, epochs=2,
                                 save_steps=4, preference="PreferenceConfig(method='reward')")
    trainer = Trainer(load_config(cfg_path), work_dir=tmp_path / "work")
    losses = trainer.train()
    assert losses[-1] < losses[0], losses
    batch = trainer.sequences.collate([trainer.sequences[k] for k in range(len(trainer.sequences))],
                                      tokenizer.pad_token_id)
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.objective.rewards(trainer.model, batch)
    last = (tmp_path / "work" / "last_checkpoint").read_text().strip()
    out = tmp_path / "rm_hf"
    tuner("convert", "pth_to_hf", cfg_path, last, out)
    assert not (out / "adapter_config.json").exists()  # one folder, LoRA merged in
    plain = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.num_labels == 1 and plain.config.architectures == ["LlamaForSequenceClassification"]
    plain_tokenizer = AutoTokenizer.from_pretrained(out)

    def plain_reward(messages):
        text = plain_tokenizer.apply_chat_template(messages, tokenize=False)
        ids = plain_tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return ids, float(plain(input_ids=torch.tensor([ids])).logits[0, 0])

    pair_no, checked = -1, 0
    for k in range(len(trainer.sequences)):  # pairs numbered through the batch as collate numbers them
        for ids, _, answer, index in trainer.sequences[k].parts:
            pair_no += answer == 0
            row = (PAIRS * 2)[index]
            plain_ids, reward = plain_reward(row["prompt"] + row["chosen" if answer == 0 else "rejected"])
            assert plain_ids == ids
            assert reward == pytest.approx(float(trained[2 * pair_no + answer]), abs=1e-4)
            checked += 1
    assert checked == 16
    if not lora:  # (the command line is the same for both; run once)
        return
    score = tuner("score", out, "--data", tmp_path / "rm.jsonl").stdout
    assert "the reward model ranks the chosen answer higher" in score, score
    conversations = tmp_path / "conversations.jsonl"  # (in this process: the command line is the one above)
    conversations.write_text(json.dumps({"messages": PAIRS[1]["prompt"] + PAIRS[1]["chosen"]}) + "\n")
    model, loaded_tokenizer, compute = load_reward_model(str(out), "fp32")
    rows = score_with_reward_model(model, loaded_tokenizer, str(conversations), None, 512).report()
    printed = float(rows.splitlines()[1].split("\t")[1])
    assert printed == pytest.approx(plain_reward(PAIRS[1]["prompt"] + PAIRS[1]["chosen"])[1], abs=2e-4), rows
    with pytest.raises(TunerError, match="is a reward model"):  # tuner chat, serve and web load with this
        load_chat_model(str(out))


@pytest.mark.slow
def test_a_reward_model_learns_the_sign_off_preference(tmp_path):
    """The built-in reward config on the embedded SmolLM2-135M-Instruct (examples/make_signoff_pairs.py,
    32 pairs, 8 steps): on held-out pairs the reward model's folder, scored by `tuner score`, ranks the
    signed answer higher in more than 90% of them (here 16/16)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from test_cli import tuner

    examples = Path(__file__).resolve().parents[1] / "examples"
    subprocess.run([sys.executable, str(examples / "make_signoff_pairs.py"), "--out", str(tmp_path / "signoff"),
                    "--test", "16"], check=True, capture_output=True)
    train = tmp_path / "train.jsonl"
    train.write_text("".join((tmp_path / "signoff_train.jsonl").read_text().splitlines(keepends=True)[:32]))
    name = "smollm2_135m_instruct_lora_reward_signoff_e1"
    options = [f"data.path={train}"]
    run = tuner("train", name, "--work-dir", tmp_path / "work", "--cfg-options", *options)
    assert "accuracy:" in run.stderr
    last = (tmp_path / "work" / "last_checkpoint").read_text().strip()
    saved = tuner("convert", "pth_to_hf", name, last, tmp_path / "rm", "--cfg-options", *options).stdout
    assert "Saved the reward model (LoRA merged in)" in saved
    report = tuner("score", tmp_path / "rm", "--data", tmp_path / "signoff_test.jsonl").stdout
    right = float(re.search(r"ranks the chosen answer higher: \d+/\d+ = ([\d.]+)%", report).group(1))
    assert right > 90, report
