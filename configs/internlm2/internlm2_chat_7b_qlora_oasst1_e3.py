# QLoRA fine-tuning of InternLM2-Chat-7B on OpenAssistant-Guanaco (oasst1), one GPU with 24 GB.
# Data: timdettmers/openassistant-guanaco saved as JSONL with a `text` field per row.
from tuner.config import (CheckpointConfig, DataConfig, EvaluateConfig, LoraConfig, ModelConfig, OptimConfig,
                          TrainConfig)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
pretrained_model_name_or_path = 'internlm/internlm2-chat-7b'

# Data
data_path = 'data/openassistant_best_replies_train.jsonl'
dataset_format = 'oasst1'  # '### Human: ... ### Assistant: ...' -> user / assistant turns
prompt_template = 'internlm2_chat'
max_length = 2048
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 1  # per device
accumulative_counts = 16
max_epochs = 3
lr = 2e-4
warmup_ratio = 0.03
max_norm = 1.0  # grad clip

# Save
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
SYSTEM = None
evaluation_inputs = ['请给我介绍五个上海的景点', 'Please tell me five scenic spots in Shanghai']


#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=pretrained_model_name_or_path, dtype='bfloat16', quantization='4bit')
lora = LoraConfig(r=64, alpha=16, dropout=0.1, target_modules='all-linear')

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
