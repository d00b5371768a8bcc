# DPO (LoRA) of the embedded SmolLM2-135M-Instruct on preference pairs: it learns to sign every
# answer "Signed, Tuner." Runs offline on a laptop CPU in a few minutes. Make the data first:
#   python examples/make_signoff_pairs.py --out data/signoff    # data/signoff_train.jsonl, _test.jsonl
from tuner.config import (CheckpointConfig, DataConfig, EvaluateConfig, LoraConfig, ModelConfig, OptimConfig,
                          PreferenceConfig, TrainConfig)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'smollm2-135m-instruct'  # embedded; or a local folder / hub id (your SFT model)

# Data: prompt / chosen / rejected pairs (tuner list-dataset-format shows the forms read)
data_path = 'data/signoff_train.jsonl'
dataset_format = 'preference'
prompt_template = None  # None = the model's own chat template
max_length = 512  # tokens of prompt + answer (the prompt's end and the answer's start are kept)
pack_to_max_length = True  # whole pairs share a sequence, each answer seeing only its prompt

# Preference objective
dpo_loss_type = 'sigmoid'  # sigmoid (DPO), ipo, hinge
beta = 0.1
label_smoothing = 0.0
sft_weight = 0.0  # > 0 adds the chosen answer's NLL (RPO): needed for the model's own answers to change
reference = 'auto'  # LoRA: the base with the adapter off; full fine-tuning: log-probs precomputed once

# Scheduler & Optimizer
batch_size = 1  # per device (packed: each sequence holds several pairs)
accumulative_counts = 1
max_epochs = 2
lr = 1e-4
warmup_ratio = 0.1
max_norm = 1.0  # grad clip

# Save
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = None
evaluation_inputs = ['What is the capital of Sweden?', 'What is 17 plus 25?']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=pretrained_model_name_or_path, dtype='float32')
lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules='all-linear')
preference = PreferenceConfig(method='dpo', loss=dpo_loss_type, beta=beta, label_smoothing=label_smoothing,
                              sft_weight=sft_weight, reference=reference)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
data = DataConfig(path=data_path, format=dataset_format, template=prompt_template, system=SYSTEM,
                  max_length=max_length, pack=pack_to_max_length)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim = OptimConfig(lr=lr, weight_decay=0.0, betas=(0.9, 0.999), max_norm=max_norm)
train = TrainConfig(batch_size=batch_size, accumulative_counts=accumulative_counts, max_epochs=max_epochs,
                    warmup_ratio=warmup_ratio, scheduler='cosine', dtype='auto')

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
checkpoint = CheckpointConfig(save_steps=save_steps, save_total_limit=save_total_limit)
evaluate = EvaluateConfig(inputs=evaluation_inputs, freq=evaluation_freq, system=SYSTEM, max_new_tokens=32)
