"""Online RL (GRPO and friends): the loss equals TRL's, rewards and advantages are TRL's, the loop trains."""

import json
import math
import textwrap

import pytest
import torch

from tuner.config import RLConfig, load_config
from tuner.engine.grpo import GrpoLoss, Rollout
from tuner.errors import TunerError
from tuner.rewards import final_answer, format_reward, math_accuracy, soft_overlong_punishment

from conftest import scalars

PROMPTS = [[1, 2, 3, 4, 5], [6, 7, 8]]  # (token ids; two prompts, two completions each)
COMPLETIONS = [[11, 12, 13, 14], [15, 16], [17, 18, 19], [20]]


@pytest.fixture(scope="module")
def trl_trainer(tiny_model_dir, tokenizer, tmp_path_factory):
    """TRL 1.16's GRPOTrainer on the tiny model (its real _compute_loss is what tuner's loss is compared with)."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=8, temperature=0.7, report_to=[], use_cpu=True,
                      bf16=False, logging_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def trl_inputs(pad: int) -> dict:
    width_p, width_c = max(map(len, PROMPTS)), max(map(len, COMPLETIONS))
    prompts = [p for p in PROMPTS for _ in range(2)]
    return {"prompt_ids": torch.tensor([[pad] * (width_p - len(p)) + p for p in prompts]),
            "prompt_mask": torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts]),
            "completion_ids": torch.tensor([c + [pad] * (width_c - len(c)) for c in COMPLETIONS]),
            "completion_mask": torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in COMPLETIONS])}


def grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


CASES = [(loss, beta, iterations, "token") for loss in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.04)
         for iterations in (1, 2)] + [("grpo", 0.04, 2, "sequence"), ("dapo", 0.0, 2, "sequence")]


@pytest.mark.parametrize("attention", ["sdpa", "tuner_packed"])
@pytest.mark.parametrize("loss,beta,iterations,level", CASES)
def test_loss_and_gradients_equal_trl(trl_trainer, tokenizer, loss, beta, iterations, level, attention):
    """The same prompts, completions, advantages and old / reference log-probs: tuner's loss (its sum over the
    step's units, as the loop divides it) and its gradients equal TRL's _compute_loss to 1e-5 in fp32, with
    transformers' sdpa and a mask (as TRL runs) and with tuner's packed attention (pads as samples of their own)."""
    from tuner.model import packed_attention

    trainer, model = trl_trainer, trl_trainer.model
    trainer.loss_type, trainer.beta, trainer.importance_sampling_level = loss, beta, level
    trainer.epsilon_low, trainer.epsilon_high = 0.2, 0.28
    pad = tokenizer.pad_token_id
    inputs = trl_inputs(pad)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    settings = RLConfig(loss=loss, beta=beta, num_iterations=iterations, importance_sampling_level=level,
                        temperature=0.7, epsilon=0.2, epsilon_high=0.28, max_completion_length=8, num_generations=2,
                        rewards=[math_accuracy])
    ours = GrpoLoss(torch.device("cpu"), torch.float32, attention, True, settings=settings)
    ours.pad_id = pad
    rollout = Rollout(0, [p for p in PROMPTS for _ in range(2)], COMPLETIONS, advantages)
    torch.manual_seed(0)
    noise = [torch.randn(len(c)) * 0.3 for c in COMPLETIONS]
    if attention == packed_attention.NAME:
        packed_attention.register()
        model.set_attn_implementation(attention)
    try:
        model.train()
        current = ours.logps_of(model, rollout)  # (eval mode = train mode here: the tiny model has no dropout)
        if iterations > 1:
            rollout.old_logps = [c + n for c, n in zip(current, noise)]
        if beta > 0:
            rollout.ref_logps = [c - 2 * n for c, n in zip(current, noise)]
        batch = ours.collate(rollout, [0, 1, 2, 3])
        mine = ours(model, batch) / ours.units(batch)
        mine.backward()
        mine_grads = grads(model)
    finally:
        model.set_attn_implementation("sdpa")
    width = inputs["completion_ids"].shape[1]
    theirs_inputs = dict(inputs, advantages=advantages, num_items_in_batch=inputs["completion_mask"].sum())
    for name, key in (("old_logps", "old_per_token_logps"), ("ref_logps", "ref_per_token_logps")):
        if name in batch:
            theirs_inputs[key] = batch[name][:, :width]
    theirs = trainer._compute_loss(model, theirs_inputs)
    theirs.backward()
    theirs_grads = grads(model)
    assert float(mine) == pytest.approx(float(theirs), abs=1e-5, rel=1e-5)
    assert mine_grads.keys() == theirs_grads.keys() and mine_grads
    for name in mine_grads:
        torch.testing.assert_close(mine_grads[name], theirs_grads[name], atol=1e-5, rtol=1e-4)
    if iterations == 1:  # (ratio 1: nothing is clipped)
        assert ours.sums["clip_ratio/region_mean"] == 0.0
    elif level == "token":  # (old log-probs 0.3 away: some ratios are clipped, so the clipping is compared too)
        assert ours.sums["clip_ratio/region_mean"] > 0


def test_advantages_are_trls():
    """Group-relative advantages with TRL's nanstd (Bessel), scale_rewards group / batch / none, weights, None."""
    from tuner.engine.dist import Distributed

    rewards = torch.tensor([[1.0, 0.5], [0.0, float("nan")], [2.0, 1.0], [2.0, 1.0]])
    for scale in ("group", "batch", "none"):
        loss = GrpoLoss(torch.device("cpu"), torch.float32, "sdpa", True,
                        settings=RLConfig(num_generations=2, scale_rewards=scale, rewards=[math_accuracy, math_accuracy],
                                          reward_weights=[1.0, 2.0]))
        loss.names, loss.weights = ["a", "b"], torch.tensor([1.0, 2.0])
        advantages, figures = loss.advantages(rewards, Distributed())
        total = torch.tensor([2.0, 0.0, 4.0, 4.0])
        centred = total - torch.tensor([1.0, 1.0, 4.0, 4.0])
        std = {"group": torch.tensor([2 ** 0.5] * 2 + [0.0] * 2), "batch": total.std().expand(4),
               "none": None}[scale]
        expected = centred if std is None else centred / (std + 1e-4)
        torch.testing.assert_close(advantages, expected)
        assert figures["reward"] == pytest.approx(2.5) and figures["frac_reward_zero_std"] == 0.5
        assert figures["rewards/a"] == pytest.approx(1.25) and figures["rewards/b"] == pytest.approx(2.5 / 3)


def test_builtin_rewards():
    gsm8k = ["Natalia sold 48/2 = 24 clips in May.\n#### 72", "#### 1,000"]
    assert [final_answer(a) for a in gsm8k] == ["72", "1,000"]
    completions = ["... so the answer is \\boxed{72}", [{"role": "assistant", "content": "<answer>1000</answer>"}]]
    assert math_accuracy(["q1", "q2"], completions, answer=gsm8k) == [1.0, 1.0]
    assert math_accuracy(["q"], ["It is 71."], answer=["#### 72"]) == [0.0]
    assert math_accuracy(["q"], ["x"], solution=["so $\\boxed{\\frac{1}{2}}$."]) == [0.0]
    assert math_accuracy(["q"], ["\\boxed{\\frac{1}{2}}"], solution=["so $\\boxed{\\frac{1}{2}}$."]) == [1.0]
    assert math_accuracy(["q"], ["7"], answer=[None]) == [None]
    fmt = format_reward()
    assert fmt(["q", "q"], ["<think>a</think> <answer>b</answer>", "b"]) == [1.0, 0.0]
    length = soft_overlong_punishment(8, 4)
    assert length(["q"] * 3, ["", "", ""], completion_ids=[[1] * 4, [1] * 6, [1] * 8]) == [0.0, -0.5, -1.0]


def write_rl_config(folder, model_dir, data, extra="", rewards="['length']", **rl) -> object:
    """An RL config for the tiny model; `rewards` is Python text (it may name functions defined in `extra`)."""
    settings = dict(num_generations=4, max_completion_length=8)
    settings.update(rl)
    args = "".join(f", {k}={v!r}" for k, v in settings.items())
    path = folder / "rl_config.py"
    path.write_text(textwrap.dedent(f"""\
        from tuner.config import *

        model = ModelConfig(path={str(model_dir)!r})
        lora = LoraConfig(r=8, alpha=16, dropout=0.0)
        data = DataConfig(path={str(data)!r})
        optim = OptimConfig(lr=1e-3)
        train = TrainConfig(batch_size=4, accumulative_counts=2, max_epochs=1, max_steps=4, warmup_ratio=0.0,
                            scheduler='constant', dtype='fp32')
        checkpoint = CheckpointConfig(save_steps=2, save_total_limit=-1)
        evaluate = EvaluateConfig(inputs=[], freq=2)
        """) + extra + f"rl = RLConfig(rewards={rewards}{args})\n")
    return path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}\n#### {2 * i}"})
                            + "\n" for i in range(12)))
    return path


def test_bad_rl_settings_are_refused_at_load(tmp_path, tiny_model_dir, prompt_file):
    with pytest.raises(TunerError, match="num_generations must be at least 2"):
        load_config(write_rl_config(tmp_path, tiny_model_dir, prompt_file, num_generations=1))
    with pytest.raises(TunerError, match="not a multiple of rl.num_generations=3"):
        load_config(write_rl_config(tmp_path, tiny_model_dir, prompt_file, num_generations=3))
    with pytest.raises(TunerError, match="cannot import 'no_such_module:f'"):
        load_config(write_rl_config(tmp_path, tiny_model_dir, prompt_file, rewards="['no_such_module:f']"))
    (tmp_path / "my_rewards.py").write_text("def exact(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    path = write_rl_config(tmp_path, tiny_model_dir, prompt_file, rewards="['my_rewards:exact']")
    assert load_config(path).rl.rewards == ["my_rewards:exact"]


def test_check_config_says_what_rl_would_do(tmp_path, tiny_model_dir, prompt_file):
    from test_cli import tuner

    out = tuner("check-config", write_rl_config(tmp_path, tiny_model_dir, prompt_file)).stdout
    assert "4 completions per prompt (temperature 1), rewards length" in out
    assert "6 per epoch x 1 epochs on one process (12 prompts, 2 per step: 4 x 2 completions)" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt here"}) + "\n")
    run = tuner("check-config", write_rl_config(tmp_path, tiny_model_dir, bad), check=False)
    assert run.returncode == 1 and f"{bad}:1: field 'prompt': no prompt" in run.stderr


BROKEN = "def broken(prompts, completions, **kw):\n    raise ValueError('no answer column')\n\n" \
         "def unscorable(prompts, completions, **kw):\n    return [None] * len(prompts)\n\n"


def test_a_reward_that_raises_names_itself_and_the_rows(tmp_path, tiny_model_dir, prompt_file):
    from tuner.engine.loop import Trainer

    path = write_rl_config(tmp_path, tiny_model_dir, prompt_file, extra=BROKEN, rewards="[broken, 'length']")
    with pytest.raises(TunerError, match=r"reward function 'broken' raised ValueError: no answer column .*data rows"):
        Trainer(load_config(path), work_dir=tmp_path / "work").train()
    cfg = load_config(path, ["rl.reward_errors=zero", "train.max_steps=1"])  # scored 0 and counted: it trains
    Trainer(cfg, work_dir=tmp_path / "zero").train()
    first = scalars(tmp_path / "zero")[0]
    assert first["reward_errors"] == 8 and first["rewards/broken"] == 0.0
    path = write_rl_config(tmp_path, tiny_model_dir, prompt_file, extra=BROKEN, rewards="[unscorable]")
    with pytest.raises(TunerError, match="every reward function returned None"):
        Trainer(load_config(path), work_dir=tmp_path / "none").train()


def test_rl_trains_logs_and_resumes_exactly(tmp_path, tiny_model_dir, prompt_file):
    """Four steps of GRPO (LoRA, the tiny model, num_iterations 2, beta > 0): the figures are logged per step;
    a run stopped after step 3 (in the middle of a rollout's two steps) and resumed equals the uninterrupted run
    (the rollouts are sampled from the run's seed and the rollout's number; the one in use is in the checkpoint)."""
    from tuner.engine.loop import Trainer

    extra = "def e_count(prompts, completions, **kw):\n    return [c.count('e') / 4 for c in completions]\n\n"
    path = write_rl_config(tmp_path, tiny_model_dir, prompt_file, extra=extra, rewards="[e_count, 'length']",
                           beta=0.04, num_iterations=2)
    whole = Trainer(load_config(path), work_dir=tmp_path / "whole").train()
    assert len(whole) == 4 and all(math.isfinite(x) for x in whole)
    steps = scalars(tmp_path / "whole")
    for name in ("reward", "reward_std", "rewards/e_count", "rewards/length", "completions/mean_length",
                 "completions/clipped_ratio", "kl", "entropy", "clip_ratio/region_mean"):
        assert name in steps[0], name
    assert steps[1]["kl"] > 0 and steps[0]["completions/max_length"] <= 8
    Trainer(load_config(path, ["train.max_steps=3"]), work_dir=tmp_path / "parts").train()
    rest = Trainer(load_config(path), work_dir=tmp_path / "parts", resume="auto").train()
    assert rest == pytest.approx(whole[3:], abs=1e-7)


@pytest.mark.slow
def test_grpo_teaches_the_embedded_model_one_word_answers(tmp_path):
    """examples/grpo_one_word.sh, shortened (12 steps instead of 34): the embedded model's greedy answers to
    24 held-out "... Answer with one word." questions are one word for none of them before (it writes a
    sentence) and for at least 18 after (measured: 24 with the whole demo, docs/rl.md)."""
    import subprocess
    import sys
    from pathlib import Path

    from test_cli import tuner

    examples = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    try:
        from eval_one_word import one_word_rate
    finally:
        sys.path.remove(str(examples))
    subprocess.run([sys.executable, str(examples / "make_one_word_prompts.py"), "--out", "data/one_word"], cwd=tmp_path,
                   check=True, capture_output=True)
    test_file = str(tmp_path / "data" / "one_word_test.jsonl")
    assert one_word_rate(test_file, show=False)[0] == 0
    config = "smollm2_135m_instruct_lora_grpo_one_word"
    run = tuner("train", config, "--work-dir", "train", "--cfg-options", "train.max_steps=12", "evaluate.inputs=[]",
                cwd=tmp_path)
    assert "rollout 0" in run.stderr + run.stdout
    last = (tmp_path / "train" / "last_checkpoint").read_text().strip()
    tuner("convert", "pth_to_hf", config, last, tmp_path / "adapter", cwd=tmp_path)
    one, correct, total = one_word_rate(test_file, str(tmp_path / "adapter"), show=False)
    assert one >= 18, (one, correct, total)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp"])  # (ZeRO-3: the same, run by hand; left out for time)
def test_two_processes_equal_one_process(tmp_path, tiny_model_dir, prompt_file, monkeypatch, strategy):
    """GRPO under DDP, DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2 with 2 CPU processes x batch 4 against one process x batch 8, the
    same 2 prompts (16 completions) per step: each completion is sampled from its own generator (seeded by
    the step, the prompt and its number), so both runs sample the same completions, and their losses, rewards
    and KL are the same."""
    from test_cli import tuner

    extra = "def e_count(prompts, completions, **kw):\n    return [c.count('e') / 4 for c in completions]\n\n"
    one = write_rl_config(tmp_path, tiny_model_dir, prompt_file, extra=extra, rewards="[e_count, 'length']",
                          beta=0.04, scale_rewards="batch")
    text = one.read_text()
    one.write_text(text.replace("batch_size=4, accumulative_counts=2", "batch_size=8, accumulative_counts=2"))
    two = tmp_path / "rl_two.py"
    two.write_text(text)
    tuner("train", one, "--work-dir", tmp_path / "one", "--cfg-options", "train.max_steps=3")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("PORT", {"ddp": "29587", "zero2": "29589", "fsdp": "29591", "zero3": "29593"}[strategy])
    args = {"ddp": [], "zero2": ["--deepspeed", "deepspeed_zero2"], "fsdp": ["--fsdp"],
            "zero3": ["--deepspeed", "deepspeed_zero3"]}[strategy]
    run = tuner("train", two, "--work-dir", tmp_path / "two", "--cfg-options", "train.max_steps=3", *args)
    assert "2 processes" in run.stderr

    single, double = scalars(tmp_path / "one"), scalars(tmp_path / "two")
    assert len(single) == len(double) == 3 and any(s["kl"] > 0 for s in single[1:])
    # Gradients summed in another order leave a weight different in its last bits after an update or two, and
    # sampling, being discontinuous, may then pick another token: ZeRO-2 and ZeRO-3 do at step 3 here (one
    # completion of 16, its reward 1/64 off); DDP and FSDP2 agree there too. Compared: the first two steps.
    compared = 2
    for name in ("reward", "reward_std", "rewards/e_count", "completions/mean_length", "loss", "kl", "entropy"):
        assert [s[name] for s in double][:compared] == pytest.approx([s[name] for s in single][:compared], rel=1e-4,
                                                                     abs=1e-6), name
    assert all(math.isfinite(s["loss"]) for s in double)


def test_a_reward_model_folder_is_a_reward(tmp_path, tiny_model_dir, tokenizer, prompt_file):
    """'rm:PATH': a sequence-classification folder scores prompt + completion as a conversation, as `tuner score`
    reads it; a missing folder is refused when the config loads."""
    import transformers

    from tuner.engine.grpo import RewardModelReward
    from tuner.engine.loop import Trainer
    from tuner.generation.score import score_with_reward_model

    folder = tmp_path / "rm"
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reward = RewardModelReward(str(folder))
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hi"}]]
    completions = [[{"role": "assistant", "content": "Hello there."}], [{"role": "assistant", "content": "Go away."}]]
    scores = reward(prompts, completions)
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"messages": p + c}) + "\n" for p, c in zip(prompts, completions)))
    expected = score_with_reward_model(reward.model, reward.tokenizer, str(data), None, 4096).rewards.tolist()
    assert scores == pytest.approx(expected) and scores[0] != scores[1]
    with pytest.raises(TunerError, match="no reward model folder"):
        load_config(write_rl_config(tmp_path, tiny_model_dir, prompt_file, rewards=f"['rm:{tmp_path}/missing']"))
    path = write_rl_config(tmp_path, tiny_model_dir, prompt_file, rewards=f"['rm:{folder}', 'length']")
    Trainer(load_config(path, ["train.max_steps=1"]), work_dir=tmp_path / "work").train()
    assert math.isfinite(scalars(tmp_path / "work")[0][f"rewards/rm:{folder}"])
