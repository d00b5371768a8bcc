"""The named prompt templates, as data (XTuner's names, plus current ChatML families).

Placeholders: {system} and {input} in the role formats, {round} (1, 2, ...) in `user`,
{bos} and {eos} for the tokenizer's own BOS/EOS tokens. Where a family publishes an
official chat template, the named template renders exactly like it (tests hold the
official Jinja strings): chatml, qwen2_5_chat, internlm2_chat, llama3_chat, mistral,
gemma and phi3_chat. The others follow XTuner's definitions.
"""

from __future__ import annotations

CHATML = dict(system="<|im_start|>system\n{system}<|im_end|>\n",
              user="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
              suffix="<|im_end|>", sep="\n", stop_words=("<|im_end|>",), special_tokens=("<|im_start|>", "<|im_end|>"))
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. {system}\n ")
LLAMA3 = dict(prefix="{bos}", system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
              user="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
              suffix="<|eot_id|>", stop_words=("<|eot_id|>",), trim=True,
              special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
MISTRAL = dict(prefix="{bos}", system="[INST] {system} [/INST]\n", user="[INST] {input} [/INST]", suffix="{eos}")

_DEEPSEEK_CODER = dict(
    system="You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeek"
           "Company, and you only answer questions related to computer science. For politically sensitive "
           "questions, security and privacy issues, and other non-computer science questions, you will refuse "
           "to answer. {system}\n",
    user="### Instruction:\n{input}\n### Response:\n", suffix="{eos}", sep="\n")

TEMPLATE_DATA: dict[str, dict] = {
    "default": dict(system="<|System|>:{system}\n", user="<|User|>:{input}\n<|Bot|>:", suffix="{eos}", sep="\n"),
    "zephyr": dict(system="<|system|>\n{system}\n", user="<|user|>\n{input}\n<|assistant|>\n", suffix="{eos}",
                   sep="\n"),
    "internlm_chat": dict(system="<|System|>:{system}\n", user="<|User|>:{input}<eoh>\n<|Bot|>:", suffix="<eoa>",
                          sep="\n", stop_words=("<eoa>",)),
    "internlm2_chat": dict(CHATML, prefix="{bos}"),
    "moss_sft": dict(system="{system}\n", user="<|Human|>: {input}<eoh>\n", suffix="{eos}", sep="\n",
                     stop_words=("<eoc>", "<eom>")),
    "llama2_chat": dict(
        system="[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully as "
               "possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, "
               "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
               "positive in nature.\n{system}\n<</SYS>>\n [/INST] ",
        user="[INST] {input} [/INST]", suffix="{eos}", sep="\n"),
    "code_llama_chat": dict(system="{system}\n", user="[INST] {input} [/INST]", suffix="{eos}"),
    "chatglm2": dict(system="{system}\n", user="[Round {round}]\n\n问：{input}\n\n答：", suffix="{eos}", sep="\n\n"),
    # The official ChatGLM3 template: no end-of-reply token (the model stops by writing <|user|>).
    "chatglm3": dict(prefix="[gMASK]sop", system="<|system|>\n {system}", user="<|user|>\n {input}<|assistant|>",
                     reply_prefix="\n ", suffix="", stop_words=("<|user|>", "<|observation|>"),
                     special_tokens=("[gMASK]", "sop", "<|user|>", "<|assistant|>")),
    "qwen_chat": dict(CHATML, stop_words=("<|im_end|>", "<|endoftext|>")),
    "qwen2_5_chat": dict(CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                         stop_words=("<|im_end|>", "<|endoftext|>"), tool_arguments="json"),
    "qwen3_chat": dict(CHATML, stop_words=("<|im_end|>", "<|endoftext|>"), think=True, tool_arguments="verbatim"),
    "chatml": dict(CHATML),
    "baichuan_chat": dict(system="{system}\n", user="<reserved_102>{input}<reserved_103>", suffix="{eos}", sep="\n"),
    "baichuan2_chat": dict(system="{system}\n", user="<reserved_106>{input}<reserved_107>", suffix="{eos}", sep="\n"),
    "wizardlm": dict(system=VICUNA_SYSTEM, user="USER: {input} ASSISTANT:", suffix="{eos}", sep="\n"),
    "wizardcoder": dict(
        system="Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n{system}\n ",
        user="### Instruction:\n{input}\n\n### Response:", suffix="{eos}", sep="\n\n"),
    "vicuna": dict(system=VICUNA_SYSTEM, user="USER: {input} ASSISTANT:", suffix="{eos}", sep="\n"),
    "deepseek_coder": dict(_DEEPSEEK_CODER),
    "deepseekcoder": dict(_DEEPSEEK_CODER),  # XTuner's second name for it
    "deepseek_moe": dict(system="[INST] {system} [/INST]\n", user="[INST] {input} [/INST]", suffix="{eos}", sep="\n"),
    "deepseek_v2": dict(system="{system}\n\n", user="User: {input}\n\nAssistant: ", suffix="<｜end▁of▁sentence｜>",
                        stop_words=("<｜end▁of▁sentence｜>",)),
    "mistral": dict(MISTRAL),
    "mixtral": dict(MISTRAL),
    "minicpm3": dict(CHATML, stop_words=("<|im_end|>", "<|endoftext|>")),
    "minicpm": dict(system="{system}\n", user="<用户> {input} <AI>", suffix="{eos}", sep="\n"),
    "gemma": dict(prefix="{bos}", system="<start_of_turn>system\n{system}<end_of_turn>\n",
                  user="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
                  suffix="<end_of_turn>", sep="\n", stop_words=("<end_of_turn>",),
                  special_tokens=("<start_of_turn>", "<end_of_turn>")),
    "cohere_chat": dict(
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
        user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{input}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        suffix="<|END_OF_TURN_TOKEN|>", stop_words=("<|END_OF_TURN_TOKEN|>",)),
    "llama3_chat": dict(LLAMA3),
    "llama3_1_chat": dict(LLAMA3, default_system="", system="<|start_header_id|>system<|end_header_id|>\n\n"
                          "{environment}Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}<|eot_id|>",
                          tool_style="llama3_1", tool="<|start_header_id|>ipython<|end_header_id|>\n\n{input}<|eot_id|>"
                                                      "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma3": dict(prefix="{bos}", system="", system_in="first_user", trim=True,
                   user="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
                   suffix="<end_of_turn>", sep="\n", stop_words=("<end_of_turn>",),
                   special_tokens=("<start_of_turn>", "<end_of_turn>")),
    # Mistral's own encoder (mistral-common) is the reference: v3 (Mistral 7B v0.3, Mixtral 8x22B), v7 (Mistral
    # Large 2411, Small 3), tekken (Nemo). The system prompt goes before the last user turn in v3 and tekken.
    "mistral_v3": dict(prefix="{bos}", system="", system_in="last_user", user="[INST] {input}[/INST]",
                       reply_prefix=" ", suffix="{eos}", special_tokens=("[INST]", "[/INST]"), tool_style="mistral",
                       tools_list="[AVAILABLE_TOOLS] {tools}[/AVAILABLE_TOOLS]", tool_calls_start="[TOOL_CALLS] ",
                       tool="[TOOL_RESULTS] {input}[/TOOL_RESULTS]"),
    "mistral_v7": dict(prefix="{bos}", system="[SYSTEM_PROMPT] {system}[/SYSTEM_PROMPT]", user="[INST] {input}[/INST]",
                       reply_prefix=" ", suffix="{eos}", special_tokens=("[INST]", "[/INST]", "[SYSTEM_PROMPT]"),
                       tool_style="mistral", tools_list="[AVAILABLE_TOOLS] {tools}[/AVAILABLE_TOOLS]",
                       tool_calls_start="[TOOL_CALLS] ",
                       tool="[TOOL_RESULTS] {call_id}[TOOL_CONTENT] {input}[/TOOL_RESULTS]"),
    "mistral_tekken": dict(prefix="{bos}", system="", system_in="last_user", user="[INST]{input}[/INST]",
                           suffix="{eos}", special_tokens=("[INST]", "[/INST]"), tool_style="mistral",
                           tool="[TOOL_RESULTS]{input}[/TOOL_RESULTS]"),
    "deepseek_v3": dict(prefix="{bos}", system="{system}", user="<｜User｜>{input}<｜Assistant｜>",
                        suffix="<｜end▁of▁sentence｜>", stop_words=("<｜end▁of▁sentence｜>",),
                        special_tokens=("<｜User｜>", "<｜Assistant｜>"), tool_style="deepseek",
                        tool="<｜tool▁outputs▁begin｜>{input}<｜tool▁outputs▁end｜>", tool_arguments="verbatim"),
    "phi3_chat": dict(system="<|system|>\n{system}<|end|>\n", user="<|user|>\n{input}<|end|>\n<|assistant|>\n",
                      suffix="<|end|>", sep="\n", end="{eos}", stop_words=("<|end|>",),
                      special_tokens=("<|user|>", "<|assistant|>", "<|end|>")),
}
