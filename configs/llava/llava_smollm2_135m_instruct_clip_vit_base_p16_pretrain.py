# LLaVA pretrain stage on the embedded SmolLM2-135M-Instruct with CLIP ViT-B/16 (224 px, 196 tokens per image):
# the vision encoder and the LLM are frozen, the projector (Linear-GELU-Linear) learns from image captions.
# Data: LLaVA-Pretrain (blip_laion_cc_sbu_558k.json and its images), saved under ./data/llava_data/.
# Next: the _finetune config, with pretrained_pth set to this run's last iter_N.pth.
from tuner.config import (CheckpointConfig, DataConfig, EvaluateConfig, LlavaConfig, LoraConfig, ModelConfig,
                          OptimConfig, TrainConfig)

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
llm_name_or_path = 'smollm2-135m-instruct'
visual_encoder_name_or_path = 'openai/clip-vit-base-patch16'

# Data
data_root = './data/llava_data/'
data_path = data_root + 'LLaVA-Pretrain/blip_laion_cc_sbu_558k.json'
image_folder = data_root + 'LLaVA-Pretrain/images'
prompt_template = None
max_length = 1024  # text tokens plus 196 per image
pack_to_max_length = True

# Scheduler & Optimizer
batch_size = 16  # per device
accumulative_counts = 2
max_epochs = 1
lr = 1e-3
warmup_ratio = 0.03
max_norm = 1.0  # grad clip

# Save
save_steps = 500
save_total_limit = 2  # maximum checkpoints to keep (-1 means unlimited)

# Evaluate the generation performance during the training
evaluation_freq = 500
evaluation_images = './data/llava_data/view.jpg'  # a local image file
evaluation_inputs = ['Describe this picture.']

#######################################################################
#                      PART 2  Model & Tokenizer                      #
#######################################################################
model = ModelConfig(path=llm_name_or_path, dtype='float32')
lora = None  # the LLM is frozen in this stage
llava = LlavaConfig(visual_encoder=visual_encoder_name_or_path, image_folder=image_folder,
                    freeze_llm=True, freeze_visual_encoder=True, pretrained_pth=None,
                    select_layer=-2, pad_image_to_square=False)

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
