# A reward model from the embedded SmolLM2-135M-Instruct (LoRA and a new scalar head): it learns to score
# answers signed "Signed, Tuner." above the others. `tuner convert pth_to_hf` writes a folder that
# AutoModelForSequenceClassification loads; `tuner score DIR --data FILE` prints its rewards. Data first:
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

# Reward model: -log sigmoid(r_chosen - r_rejected), r read at each answer's last token
center_rewards = 0.01  # keeps the rewards near 0 ((r_chosen + r_rejected)^2 weighted by this)

# Scheduler & Optimizer
batch_size = 1  # per device (packed: each sequence holds several pairs)
accumulative_counts = 1
max_epochs = 1
lr = 5e-4
warmup_ratio = 0.1
max_norm = 1.0  # grad clip

# Save
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)

# A reward model does not generate: no evaluate-chat
evaluation_freq = 500
SYSTEM = None
evaluation_inputs = []

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=pretrained_model_name_or_path, dtype='float32')
lora = LoraConfig(r=16, alpha=32, dropout=0.0, target_modules='all-linear')
preference = PreferenceConfig(method='reward', center_rewards=center_rewards)

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
