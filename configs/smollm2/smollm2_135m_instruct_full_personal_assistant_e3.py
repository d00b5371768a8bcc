# Full fine-tuning of the embedded SmolLM2-135M-Instruct into a personal assistant.
# Runs offline on a laptop CPU. Make the data first:
#   tuner make-identity-data --name Ava --author "Ada Lab" --out data/personal_assistant.jsonl
from tuner.config import (CheckpointConfig, DataConfig, EvaluateConfig, ModelConfig, OptimConfig,
                          TrainConfig)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'smollm2-135m-instruct'  # embedded; or a local folder / hub id

# Data
data_path = 'data/personal_assistant.jsonl'
dataset_format = 'openai'
prompt_template = None  # None = the model's own chat template
max_length = 512
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 1  # per device (packed: each sequence holds ~8 samples)
accumulative_counts = 1
max_epochs = 3
lr = 2e-5
warmup_ratio = 0.03
max_norm = 1.0  # grad clip

# Save
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = None
evaluation_inputs = ['Who are you?', 'What is the capital of France?']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=pretrained_model_name_or_path, dtype='float32')
lora = None  # full fine-tuning: every weight trains (float32 master weights)

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
evaluate = EvaluateConfig(inputs=evaluation_inputs, freq=evaluation_freq, system=SYSTEM)
