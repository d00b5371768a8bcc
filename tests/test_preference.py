"""Preference training: the data forms, the losses against TRL's, packing, the reference model, and
DPO teaching the embedded model something it does not do."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from tuner.config import DataConfig, PreferenceConfig
from tuner.data.formats import RowError, detect_format, preference_map_fn
from tuner.errors import TunerError

from conftest import scalars

PAIRS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "I think it is Lyon, but I am not sure at all."}]},
    {"prompt": [{"role": "user", "content": "Say hello."}],
     "chosen": [{"role": "assistant", "content": "Hello! How can I help you today?"}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And times 3?"}],
     "chosen": [{"role": "assistant", "content": "12."}],
     "rejected": [{"role": "assistant", "content": "It is 7, obviously."}]},
    {"prompt": [{"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Chair."}]},
]


def test_every_preference_form_maps_to_one_shape():
    messages = preference_map_fn(PAIRS[0])
    assert messages["messages"] == PAIRS[0]["prompt"] and messages["chosen"] == PAIRS[0]["chosen"]
    strings = preference_map_fn({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go.", "system": "Be kind."})
    assert strings == {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
                       "chosen": [{"role": "assistant", "content": "Hello."}],
                       "rejected": [{"role": "assistant", "content": "Go."}]}
    whole = preference_map_fn({"chosen": PAIRS[2]["prompt"] + PAIRS[2]["chosen"],
                               "rejected": PAIRS[2]["prompt"] + PAIRS[2]["rejected"]})  # UltraFeedback
    assert whole == {"messages": PAIRS[2]["prompt"], "chosen": PAIRS[2]["chosen"], "rejected": PAIRS[2]["rejected"]}
    binarized = preference_map_fn({"prompt": "And times 3?", "chosen": PAIRS[2]["prompt"] + PAIRS[2]["chosen"],
                                   "rejected": PAIRS[2]["prompt"] + PAIRS[2]["rejected"]})  # ultrafeedback_binarized
    assert binarized == whole
    hh = preference_map_fn({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye, take care.",
                            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Whatever."})
    assert [m["content"] for m in hh["messages"]] == ["Hi", "Hello!", "Bye"]
    assert hh["chosen"] == [{"role": "assistant", "content": "Bye, take care."}]
    assert detect_format(PAIRS[0]) == "preference"
    with pytest.raises(RowError, match="'rejected'"):
        preference_map_fn({"prompt": "Hi", "chosen": "Yo"})


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_pairs_name_the_line_and_field(tmp_path, tokenizer):
    from tuner.data.pairs import build_pair_sequences

    rows = [PAIRS[0], {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}]
    cfg = DataConfig(path=str(write_pairs(tmp_path / "bad.jsonl", rows)), cache=False)
    with pytest.raises(TunerError, match=r"bad.jsonl:2: field 'rejected': is the same as chosen"):
        build_pair_sequences(cfg, tokenizer, say=lambda _: None)
    rows = [PAIRS[0], {"prompt": "", "chosen": "A.", "rejected": "B."}]
    cfg = DataConfig(path=str(write_pairs(tmp_path / "empty.jsonl", rows)), cache=False)
    with pytest.raises(TunerError, match=r"empty.jsonl:2: field 'prompt': is empty"):
        build_pair_sequences(cfg, tokenizer, say=lambda _: None)
    cfg = DataConfig(path=str(write_pairs(tmp_path / "sft.jsonl", [{"messages": PAIRS[0]["prompt"] + PAIRS[0]["chosen"]}])),
                     cache=False)
    with pytest.raises(TunerError, match="holds no chosen / rejected pairs"):
        build_pair_sequences(cfg, tokenizer, say=lambda _: None)


def test_long_pairs_keep_the_prompt_end_and_the_answers_start(tmp_path, tokenizer):
    from tuner.data.pairs import build_pair_sequences

    long_prompt = " ".join(f"word{i}" for i in range(300)) + " END"
    row = {"prompt": long_prompt, "chosen": "Yes " * 100, "rejected": "No."}
    cfg = DataConfig(path=str(write_pairs(tmp_path / "long.jsonl", [row])), max_length=64, cache=False, pack=False)
    sequences, report = build_pair_sequences(cfg, tokenizer, say=lambda _: None)
    chosen, rejected = (sequences.store.sample(i) for i in (0, 1))
    assert len(chosen[0]) == 64 and len(rejected[0]) <= 64 and report.stats.truncated == 2
    assert chosen[1].sum() >= 32 and tokenizer.decode(chosen[0][chosen[1]]).startswith("Yes Yes")
    prompt_text = tokenizer.decode(rejected[0][~rejected[1]])
    assert "END" in prompt_text and "word0 " not in prompt_text
    assert tokenizer.decode(rejected[0][rejected[1]]).startswith("No.")


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory, tiny_model_dir, tokenizer):
    """A policy and a different reference (the tiny Llama, one perturbed), and the pairs as both TRL and
    tuner make them from the same rows with the tokenizer's own chat template."""
    from transformers import AutoModelForCausalLM

    from tuner.data.pairs import build_pair_sequences

    folder = tmp_path_factory.mktemp("pairs")
    data = write_pairs(folder / "pairs.jsonl", PAIRS)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    built = {}
    for pack in (False, True):
        cfg = DataConfig(path=str(data), max_length=512, pack=pack, shuffle=False, cache=False)
        built[pack] = build_pair_sequences(cfg, tokenizer, say=lambda _: None)[0]
    return policy, reference, built, PAIRS


def trl_dpo_loss(settings, policy, reference, tokenizer, rows, tmp_path):
    """TRL's DPO loss and metrics for `rows`, as its trainer computes them in a training step (TRL
    tokenizes the rows itself)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=len(rows), report_to=[],
                     use_cpu=True, bf16=False, fp16=False, max_length=None, beta=settings.beta,
                     loss_type=[settings.loss] + (["sft"] if settings.sft_weight else []),
                     loss_weights=[1.0, settings.sft_weight] if settings.sft_weight else None)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: sum(map(float, v)) / len(v) for k, v in trainer._metrics["train"].items()}
    return float(loss), metrics, batch


def trl_reference_free_loss(settings, policy, tokenizer, rows, our_batch, tmp_path):
    """TRL's SimPO (CPOTrainer, loss_type='simpo', cpo_alpha=0) or ORPO loss and rewards on the rows tuner
    made (TRL's own tokenizing of these trainers adds a BOS and an EOS the chat template does not have)."""
    from datasets import Dataset

    common = dict(output_dir=str(tmp_path / settings.method), report_to=[], use_cpu=True, beta=settings.beta)
    if settings.method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        trainer = CPOTrainer(model=policy, args=CPOConfig(loss_type="simpo", simpo_gamma=settings.simpo_gamma,
                                                          cpo_alpha=0.0, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        trainer = ORPOTrainer(model=policy, args=ORPOConfig(**common), train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer)
    policy.train()
    logits = policy(input_ids=our_batch["input_ids"], position_ids=our_batch["position_ids"]).logits
    mean_logps = trainer.get_batch_logps(logits, our_batch["labels"], average_log_prob=True)  # rows: c0 r0 c1 r1 ...
    chosen, rejected = mean_logps[0::2], mean_logps[1::2]
    if settings.method == "simpo":
        losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(chosen, rejected)
        loss = losses.mean()
    else:  # ORPO: TRL's odds-ratio term; the NLL on the answer's tokens (TRL's also takes the prompt's)
        ratio_terms, chosen_rewards, rejected_rewards, _, _ = trainer.odds_ratio_loss(chosen, rejected)
        loss = (-chosen).mean() - ratio_terms.mean()
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean()}
    return float(loss), {k: float(v) for k, v in metrics.items()}


def tuner_loss(settings, policy, reference, sequences, tokenizer, attention="sdpa"):
    from tuner.engine.preference import PreferenceLoss

    objective = PreferenceLoss(torch.device("cpu"), torch.float32, attention, True, settings=settings)
    objective.reference, objective.reference_model = ("copy", reference) if settings.method == "dpo" else ("none", None)
    batch = sequences.collate([sequences[k] for k in range(len(sequences))], tokenizer.pad_token_id)
    policy.train()
    loss = objective(policy, batch) / objective.units(batch)
    return float(loss), {k: float(v) / objective.units(batch) for k, v in objective.metrics.items()}, batch


@pytest.mark.parametrize("loss,sft", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("sigmoid", 0.5)])
def test_dpo_losses_and_metrics_equal_trl(trl_setup, tokenizer, tmp_path, loss, sft):
    """The same tiny model, reference, rows and settings: tuner's DPO loss (also with the chosen answers'
    NLL added, RPO) and metrics equal those of TRL 1.16's DPOTrainer to 1e-5 (fp32), and both train on
    the same tokens of the same rendering."""
    policy, reference, built, rows = trl_setup
    settings = PreferenceConfig(method="dpo", loss=loss, beta=0.1, sft_weight=sft)
    theirs, their_metrics, their_batch = trl_dpo_loss(settings, policy, reference, tokenizer, rows, tmp_path)
    ours, our_metrics, our_batch = tuner_loss(settings, policy, reference, built[False], tokenizer)
    n = len(rows)
    for k in range(n):
        for answer in (0, 1):
            row, theirs_at = our_batch["sample_ids"] == 2 * k + answer, answer * n + k
            their_ids = their_batch["input_ids"][theirs_at][their_batch["attention_mask"][theirs_at].bool()]
            their_trained = their_batch["input_ids"][theirs_at][their_batch["completion_mask"][theirs_at].bool()]
            assert our_batch["input_ids"][row].tolist() == their_ids.tolist()
            assert our_batch["labels"][row][our_batch["labels"][row] != -100].tolist() == their_trained.tolist()
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        assert our_metrics[name] == pytest.approx(their_metrics[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("method", ["simpo", "orpo"])
def test_simpo_and_orpo_equal_trl(trl_setup, tokenizer, tmp_path, method):
    policy, _, built, rows = trl_setup
    settings = PreferenceConfig(method=method, beta=2.0 if method == "simpo" else 0.1, simpo_gamma=0.5)
    ours, our_metrics, our_batch = tuner_loss(settings, policy, None, built[False], tokenizer)
    theirs, their_metrics = trl_reference_free_loss(settings, policy, tokenizer, rows, our_batch, tmp_path)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    for name, value in their_metrics.items():
        assert our_metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_packed_pairs_give_the_unpacked_loss(trl_setup, tokenizer):
    """Pairs packed into shared rows (tuner_packed attention) give the loss and metrics of one answer per row."""
    from tuner.model import packed_attention

    policy, reference, built, _ = trl_setup
    assert len(built[True]) < len(built[False])  # the pairs do share rows
    settings = PreferenceConfig(beta=0.1)
    unpacked = tuner_loss(settings, policy, reference, built[False], tokenizer)
    packed_attention.use_for_training(policy, "tuner_packed", torch.device("cpu"))
    packed_attention.use_for_training(reference, "tuner_packed", torch.device("cpu"))
    try:
        packed = tuner_loss(settings, policy, reference, built[True], tokenizer, attention=packed_attention.NAME)
    finally:
        policy.set_attn_implementation("sdpa")
        reference.set_attn_implementation("sdpa")
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    assert packed[1] == pytest.approx(unpacked[1], rel=1e-5)


def preference_config(tmp_path, tiny_model_dir, rows, lora=True, name="dpo", preference="PreferenceConfig()", extra="",
                      **settings):
    from conftest import write_config

    data = write_pairs(tmp_path / f"{name}.jsonl", rows)
    values = dict(max_length=256, batch_size=2, accum=1, epochs=3, lr=5e-3)
    values.update(settings)
    return write_config(tmp_path, tiny_model_dir, data, lora=lora, name=name,
                        extra=f"preference = {preference}\n" + extra, **values)


def logps_after_training(trainer, tiny_model_dir, tokenizer):
    """Every answer's log-probs under the trained model, under its reference, and under the base model
    loaded on its own."""
    from transformers import AutoModelForCausalLM

    batch = trainer.sequences.collate([trainer.sequences[k] for k in range(len(trainer.sequences))],
                                      tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.config._attn_implementation = trainer.raw_model.config._attn_implementation
    with torch.no_grad():
        return (trainer.objective.answer_logps(trainer.model, batch)[0],
                trainer.objective.reference_logps(trainer.model, batch),
                trainer.objective.answer_logps(base, batch)[0])


def test_the_adapter_disabled_reference_equals_a_separate_base_model(tmp_path, tiny_model_dir, tokenizer):
    """With LoRA the reference is the base with the adapter switched off: after training has moved the
    adapter, its log-probs equal those of the base model loaded on its own."""
    from tuner.config import load_config
    from tuner.engine.loop import Trainer

    trainer = Trainer(load_config(preference_config(tmp_path, tiny_model_dir, PAIRS * 2)), work_dir=tmp_path / "work")
    losses = trainer.train()
    assert trainer.objective.reference == "adapter" and losses[-1] < losses[0], losses
    moved, reference, separate = logps_after_training(trainer, tiny_model_dir, tokenizer)
    assert not torch.allclose(moved, reference, atol=1e-3)  # the adapter did change the model
    assert torch.allclose(reference, separate, atol=1e-5), (reference - separate).abs().max()


def test_a_copied_reference_is_the_starting_model(tmp_path, tiny_model_dir, tokenizer):
    """reference='copy' (full fine-tuning): a frozen copy of the model as training starts; after training
    its log-probs are still the base model's own."""
    from tuner.config import load_config
    from tuner.engine.loop import Trainer

    cfg = preference_config(tmp_path, tiny_model_dir, PAIRS * 2, lora=False, lr=1e-3, name="copy",
                            preference="PreferenceConfig(reference='copy')")
    trainer = Trainer(load_config(cfg), work_dir=tmp_path / "work")
    losses = trainer.train()
    assert trainer.objective.reference == "copy" and losses[-1] < losses[0], losses
    assert not any(p.requires_grad for p in trainer.objective.reference_model.parameters())
    trained, reference, separate = logps_after_training(trainer, tiny_model_dir, tokenizer)
    assert not torch.allclose(trained, reference, atol=1e-3)
    assert torch.allclose(reference, separate, atol=1e-5), (reference - separate).abs().max()


def test_a_reference_table_of_another_model_is_computed_again(tmp_path, tiny_model_dir):
    """The precomputed reference belongs to one model and one token store: one step of full DPO, then the
    same config and work dir with model.path pointing at another model with the same tokenizer (a
    perturbed copy). The second run's reference is its own starting model, so its first loss is ln 2 (as
    for any fresh DPO run), and the log says why the table was computed again."""
    import math

    from transformers import AutoModelForCausalLM

    from tuner.config import load_config
    from tuner.engine.loop import Trainer

    other = tmp_path / "perturbed"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    cfg = preference_config(tmp_path, tiny_model_dir, PAIRS * 2, lora=False, lr=1e-3, extra="train.max_steps = 1\n")
    work = tmp_path / "work"
    first = Trainer(load_config(cfg), work_dir=work)
    assert first.train()[0] == pytest.approx(math.log(2), abs=1e-6)
    second = Trainer(load_config(cfg, [f"model.path={other}"]), work_dir=work)
    assert second.train()[0] == pytest.approx(math.log(2), abs=1e-6)
    log = next(p for p in sorted(work.glob("*/*.log")) if "computing them again" in p.read_text()).read_text()
    assert "changed since it was computed: model, folder, files" in log
    again = Trainer(load_config(cfg, [f"model.path={other}", "data.max_length=200"]), work_dir=work)
    again.train()
    assert "max_length" in next(p for p in sorted(work.glob("*/*.log"))[::-1]).read_text()


@pytest.mark.slow
def test_full_dpo_precomputes_the_reference_once_and_resumes_with_it(tmp_path, tiny_model_dir):
    """A full fine-tune's reference is the starting model's log-probs, computed before the first step and
    kept in the work dir: a run resumed from a checkpoint reads them and ends as the straight run."""
    from test_cli import tuner

    cfg = preference_config(tmp_path, tiny_model_dir, PAIRS * 2, lora=False, lr=1e-3, epochs=4, save_steps=2)
    straight = tuner("train", cfg, "--work-dir", tmp_path / "straight")
    assert "reference log-probs of 8 pairs computed once" in straight.stderr
    assert "accuracy:" in straight.stderr and (tmp_path / "straight" / "reference_logps.npy").exists()
    steps = scalars(tmp_path / "straight")
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert steps[-1]["rewards/accuracies"] > 0.5 and steps[-1]["loss"] < steps[0]["loss"]
    stop_after_2 = ("\nimport os, signal\n\ndef stop(trainer, step, metrics):\n    if step == 2:\n"
                    "        os.kill(os.getpid(), signal.SIGTERM)\n\ncustom_hooks = [stop]\n")
    stopping = preference_config(tmp_path, tiny_model_dir, PAIRS * 2, lora=False, lr=1e-3, epochs=4, save_steps=2,
                                 name="stopping", extra=stop_after_2)
    work = tmp_path / "resumed"
    assert "stopped by SIGTERM after step 2" in tuner("train", stopping, "--work-dir", work, check=False).stderr
    resumed = tuner("train", cfg, "--work-dir", work, "--resume", "auto")
    assert "read from" in resumed.stderr
    again = scalars(work)
    assert [s["loss"] for s in again] == pytest.approx([s["loss"] for s in steps], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero2"])  # (DDP: test_engine.py and KTO's test)
def test_two_process_dpo_matches_one_process(tmp_path, tiny_model_dir, monkeypatch, strategy):
    """DPO under DDP, FSDP2 and DeepSpeed ZeRO-2, 2 CPU processes x batch 1, against one process x batch 2:
    the same pairs per step, so the same losses and metrics (each process's pairs weigh as much as the
    other's); the reference is the base with the LoRA adapter off, inside each wrapper."""
    from test_cli import tuner

    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    rows = PAIRS * 3
    one = preference_config(tmp_path, tiny_model_dir, rows, name="one", batch_size=2, pack=False, epochs=1)
    two = preference_config(tmp_path, tiny_model_dir, rows, name="two", batch_size=1, pack=False, epochs=1)
    tuner("train", one, "--work-dir", tmp_path / "one")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("PORT", str(29570 + ["ddp", "fsdp", "deepspeed_zero2"].index(strategy)))
    flags = {"ddp": [], "fsdp": ["--fsdp"], "deepspeed_zero2": ["--deepspeed", "deepspeed_zero2"]}[strategy]
    run = tuner("train", two, "--work-dir", tmp_path / "two", *flags)
    assert f"2 processes ({'DEEPSPEED' if 'deepspeed' in strategy else strategy.upper()}" in run.stderr

    single, double = scalars(tmp_path / "one"), scalars(tmp_path / "two")
    assert len(single) == len(double) == 6
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert [s[name] for s in double] == pytest.approx([s[name] for s in single], rel=1e-4, abs=1e-6), name


@pytest.mark.slow
def test_dpo_makes_the_embedded_model_sign_its_own_answers(tmp_path):
    """The built-in DPO config on the embedded SmolLM2-135M-Instruct, with the chosen answer's NLL
    (sft_weight 1.0), on its own answers (tests/fixtures/signoff_on_policy_*.jsonl, written by
    `examples/make_signoff_pairs.py --on-policy --system "Answer in one short sentence."
    --max-new-tokens 48`: 71 pairs to train on, 40 held out, the chosen answer signed "Signed, Tuner.").
    On the held-out pairs the base never prefers the signed answer, after DPO the reward accuracy
    is above 90%, and the model's own greedy answers to held-out questions end with the sign-off
    (measured 36 of 40; the base 0 of 40)."""
    import re
    from pathlib import Path

    from test_cli import tuner

    from tuner.generation.generate import GenerationSettings, Generator
    from tuner.generation.load import load_chat_model

    fixtures = Path(__file__).resolve().parent / "fixtures"
    train, test = fixtures / "signoff_on_policy_train.jsonl", fixtures / "signoff_on_policy_test.jsonl"

    def accuracy(report, what):
        return float(re.search(rf"{what}: \d+/\d+ = ([\d.]+)%", report).group(1))

    name = "smollm2_135m_instruct_lora_dpo_signoff_e2"
    options = [f"data.path={train}", "preference.sft_weight=1.0", "optim.lr=5e-4", "train.max_epochs=1",
               "evaluate.inputs=[]"]
    run = tuner("train", name, "--work-dir", tmp_path / "work", "--cfg-options", *options)
    assert "accuracy:" in run.stderr  # the rewards are logged with each step
    last = (tmp_path / "work" / "last_checkpoint").read_text().strip()
    tuner("convert", "pth_to_hf", name, last, tmp_path / "adapter", "--cfg-options", *options)
    after = tuner("score", "smollm2-135m-instruct", "--adapter", tmp_path / "adapter", "--data", test).stdout
    assert accuracy(after, r"the base \(adapter off\) prefers it") < 20, after
    assert accuracy(after, "reward accuracy against the base") > 90, after

    rows = [json.loads(line) for line in test.read_text().splitlines()][:16]
    model, tokenizer, compute = load_chat_model("smollm2-135m-instruct", adapter=str(tmp_path / "adapter"),
                                                torch_dtype="fp32")
    generator = Generator(model, tokenizer, compute_dtype=compute)
    prompts = [generator.prompt_ids(row["prompt"]) for row in rows]  # a system prompt and a question each
    settings = GenerationSettings(max_new_tokens=64, temperature=0.0)

    def signed(results):
        return sum(r.text.strip().endswith("Signed, Tuner.") for r in results)

    tuned = generator.generate(prompts, settings)
    with model.disable_adapter():
        base = generator.generate(prompts, settings)
    assert signed(base) == 0, [r.text for r in base]
    assert signed(tuned) >= 12, [r.text for r in tuned]  # measured 14 of these 16
