# KTO (LoRA) of the embedded SmolLM2-135M-Instruct: single answers marked desirable or not (here the
# sign-off pairs, each split into its chosen and its rejected answer; or prompt / completion / label
# rows). The reference is the base with the adapter off. Make the data first:
#   python examples/make_signoff_pairs.py --out data/signoff    # data/signoff_train.jsonl, _test.jsonl
from tuner.config import (CheckpointConfig, DataConfig, EvaluateConfig, LoraConfig, ModelConfig, OptimConfig,
                          PreferenceConfig, TrainConfig)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'smollm2-135m-instruct'  # embedded; or a local folder / hub id (your SFT model)

# Data: prompt / completion / label rows, or chosen / rejected pairs (tuner list-dataset-format)
data_path = 'data/signoff_train.jsonl'
dataset_format = 'auto'
prompt_template = None  # None = the model's own chat template
max_length = 512  # tokens of prompt + answer (the prompt's end and the answer's start are kept)
pack_to_max_length = False  # KTO: one example per sequence (with its KL row)

# Preference objective
beta = 0.1
desirable_weight = 1.0  # with unbalanced data: desirable_weight * n_desirable ~ undesirable_weight * n_undesirable
undesirable_weight = 1.0
reference = 'auto'  # LoRA: the base with the adapter off; full fine-tuning: a frozen copy

# Scheduler & Optimizer
batch_size = 8  # per device: examples (the KL rows pair each prompt with another example's answer)
accumulative_counts = 1
max_epochs = 2
lr = 2e-4
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
preference = PreferenceConfig(method='kto', beta=beta, desirable_weight=desirable_weight,
                              undesirable_weight=undesirable_weight, reference=reference)

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
