# LLaVA finetune stage, InternLM2-Chat-1.8B + CLIP ViT-L/14-336, as in the InternLM tutorials: the projector and
# the whole LLM train on LLaVA-Instruct (llava_v1_5_mix665k.json), starting from the pretrain stage's projector.
# 8 GPUs: NPROC_PER_NODE=8 tuner train CFG --deepspeed deepspeed_zero2.
from tuner.config import (CheckpointConfig, DataConfig, EvaluateConfig, LlavaConfig, LoraConfig, ModelConfig,
                          OptimConfig, TrainConfig)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
llm_name_or_path = 'internlm/internlm2-chat-1_8b'
visual_encoder_name_or_path = 'openai/clip-vit-large-patch14-336'
pretrained_pth = './work_dirs/llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain/iter_2181.pth'  # the pretrain stage's last checkpoint

# Data
data_root = './data/llava_data/'
data_path = data_root + 'LLaVA-Instruct-150K/llava_v1_5_mix665k.json'
image_folder = data_root + 'llava_images'
prompt_template = 'internlm2_chat'
max_length = 2048  # text tokens plus 576 per image
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 16  # per device
accumulative_counts = 1
max_epochs = 1
lr = 2e-5
warmup_ratio = 0.03
max_norm = 1.0  # grad clip

# Save
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
evaluation_images = './data/llava_data/view.jpg'  # a local image file
evaluation_inputs = ['请描述一下这张照片', 'Please describe this picture']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=llm_name_or_path, dtype='bfloat16')
lora = None  # the LLM trains in full (freeze_llm=False)
llava = LlavaConfig(visual_encoder=visual_encoder_name_or_path, image_folder=image_folder,
                    freeze_llm=False, freeze_visual_encoder=True, pretrained_pth=pretrained_pth,
                    select_layer=-2, pad_image_to_square=True)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
data = DataConfig(path=data_path, template=prompt_template, max_length=max_length, pack=pack_to_max_length)

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
evaluate = EvaluateConfig(inputs=evaluation_inputs, freq=evaluation_freq, image=evaluation_images)
