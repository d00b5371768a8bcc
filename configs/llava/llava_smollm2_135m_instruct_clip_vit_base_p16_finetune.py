# LLaVA finetune stage on the embedded SmolLM2-135M-Instruct with CLIP ViT-B/16: projector + LoRA on the LLM,
# starting from the pretrain stage's projector. Data: LLaVA-Instruct (llava_v1_5_mix665k.json and the COCO, GQA,
# OCR-VQA, TextVQA and VG images it names), saved under ./data/llava_data/.
from tuner.config import (CheckpointConfig, DataConfig, EvaluateConfig, LlavaConfig, LoraConfig, ModelConfig,
                          OptimConfig, TrainConfig)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
llm_name_or_path = 'smollm2-135m-instruct'
visual_encoder_name_or_path = 'openai/clip-vit-base-patch16'
pretrained_pth = './work_dirs/llava_smollm2_135m_instruct_clip_vit_base_p16_pretrain/iter_2181.pth'  # the pretrain stage's last checkpoint

# Data
data_root = './data/llava_data/'
data_path = data_root + 'LLaVA-Instruct-150K/llava_v1_5_mix665k.json'
image_folder = data_root + 'llava_images'
prompt_template = None
max_length = 2048  # text tokens plus 196 per image
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 8  # per device
accumulative_counts = 4
max_epochs = 1
lr = 2e-4
warmup_ratio = 0.03
max_norm = 1.0  # grad clip

# Save
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
evaluation_images = './data/llava_data/view.jpg'  # a local image file
evaluation_inputs = ['What is in this picture?', 'Describe this picture in detail.']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=llm_name_or_path, dtype='float32')
lora = LoraConfig(r=64, alpha=16, dropout=0.05, target_modules='all-linear')  # on the LLM
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
