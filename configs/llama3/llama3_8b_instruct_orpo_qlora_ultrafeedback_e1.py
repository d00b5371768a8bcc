# ORPO, QLoRA, of Llama-3-8B-Instruct on UltraFeedback, one 24 GB GPU (no reference model).
# Data: HuggingFaceH4/ultrafeedback_binarized, split train_prefs (61k prompts, each with a chosen and a
# rejected whole conversation; read from the hub, or give a local copy's path).
from tuner.config import (CheckpointConfig, DataConfig, DatasetSource, EvaluateConfig, LoraConfig, ModelConfig,
                          OptimConfig, PreferenceConfig, TrainConfig)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'meta-llama/Meta-Llama-3-8B-Instruct'  # or your SFT model's folder

# Data
data_path = 'HuggingFaceH4/ultrafeedback_binarized'
data_split = 'train_prefs'
prompt_template = 'llama3_chat'
max_length = 2048  # tokens of prompt + answer (the prompt's end and the answer's start are kept)
pack_to_max_length = True  # whole pairs share a sequence, each answer seeing only its prompt

# Preference objective
beta = 0.1  # the odds-ratio term's weight (the ORPO paper's lambda)

# Scheduler & Optimizer
batch_size = 1  # per device
accumulative_counts = 16
max_epochs = 1
lr = 8e-6
warmup_ratio = 0.03
max_norm = 1.0  # grad clip

# Save
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = None
evaluation_inputs = ['Please tell me five scenic spots in Shanghai', 'What should I pack for a week of hiking?']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=pretrained_model_name_or_path, dtype='bfloat16', quantization='4bit')
lora = LoraConfig(r=64, alpha=16, dropout=0.1, target_modules='all-linear')
preference = PreferenceConfig(method='orpo', beta=beta)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
data = DataConfig(sources=[DatasetSource(path=data_path, split=data_split, format='preference')],
                  template=prompt_template, system=SYSTEM, max_length=max_length, pack=pack_to_max_length)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim = OptimConfig(lr=lr, weight_decay=0.0, betas=(0.9, 0.999), max_norm=max_norm)
train = TrainConfig(batch_size=batch_size, accumulative_counts=accumulative_counts, max_epochs=max_epochs,
                    warmup_ratio=warmup_ratio, scheduler='cosine', dtype='auto', gradient_checkpointing=True)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
checkpoint = CheckpointConfig(save_steps=save_steps, save_total_limit=save_total_limit)
evaluate = EvaluateConfig(inputs=evaluation_inputs, freq=evaluation_freq, system=SYSTEM)
