# GRPO (LoRA) on the embedded SmolLM2-135M-Instruct, CPU only: it learns to answer "... Answer with one word."
# questions with one word, which it does not do before (it writes a sentence). The rewards are below:
# brevity (1 / words) and the reference answer. Data: python examples/make_one_word_prompts.py --out data/one_word
# The whole demo: bash examples/grpo_one_word.sh
import re

from tuner.config import (CheckpointConfig, DataConfig, EvaluateConfig, LoraConfig, ModelConfig, OptimConfig,
                          RLConfig, TrainConfig)


def one_word(prompts, completions, **columns):
    """1 for a one-word answer, 1/n for n words: shorter answers score higher from the start."""
    return [1.0 / max(len(re.findall(r"\w+", c[0]["content"])), 1) for c in completions]


def correct(prompts, completions, answer, **columns):
    """1 when the answer's first word is the reference answer (case and punctuation aside)."""
    first = [re.findall(r"\w+", c[0]["content"].lower())[:1] for c in completions]
    return [float(f == [a.lower()]) for f, a in zip(first, answer)]


#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'smollm2-135m-instruct'

# Data
data_path = 'data/one_word_train.jsonl'
prompt_template = None  # None: the tokenizer's own chat template

# Online RL: completions sampled per prompt, scored by the rewards
rl_loss = 'dapo'  # grpo, bnpo, dr_grpo, dapo
num_generations = 8  # completions per prompt
max_prompt_length = 128
max_completion_length = 16
temperature = 1.0
beta = 0.0  # the KL term's weight (0: no reference model)
reward_functions = [one_word, correct]

# Scheduler & Optimizer
batch_size = 8  # per device: completions, so one prompt per micro-batch
accumulative_counts = 2
max_epochs = 1
lr = 5e-4
warmup_ratio = 0.0
max_norm = 1.0  # grad clip

# Save
save_steps = 20
save_total_limit = 1  # maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 10
evaluation_inputs = ['What is the capital of Italy? Answer with one word.', 'What colour is snow? Answer with one word.']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=pretrained_model_name_or_path, dtype='float32')
lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules='all-linear')
rl = RLConfig(loss=rl_loss, num_generations=num_generations, max_prompt_length=max_prompt_length,
              max_completion_length=max_completion_length, temperature=temperature, beta=beta,
              rewards=reward_functions)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
data = DataConfig(path=data_path, template=prompt_template)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim = OptimConfig(lr=lr, weight_decay=0.0, betas=(0.9, 0.999), max_norm=max_norm)
train = TrainConfig(batch_size=batch_size, accumulative_counts=accumulative_counts, max_epochs=max_epochs,
                    warmup_ratio=warmup_ratio, scheduler='constant', dtype='auto')

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
checkpoint = CheckpointConfig(save_steps=save_steps, save_total_limit=save_total_limit)
evaluate = EvaluateConfig(inputs=evaluation_inputs, freq=evaluation_freq, max_new_tokens=16)
