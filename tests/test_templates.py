import pytest

from tuner.data.dataset import IGNORE, encode
from tuner.data.templates import TEMPLATES, PromptTemplate, get_template, register_template
from tuner.errors import TunerError

from conftest import CONVERSATIONS


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_tokenizer_template_matches_apply_chat_template(tokenizer, conversation):
    """The tokenizer's own template, rendered by tuner, gives the same ids as transformers."""
    template = get_template(None, tokenizer)
    ours, _ = encode([dict(m, loss=True) for m in conversation], tokenizer, template, max_length=10_000)
    official = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
    assert ours.input_ids == official
    prompt = template.render(conversation[:-1], add_generation_prompt=True).text
    assert prompt == tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_named_chatml_matches_smollm2_with_system(tokenizer, conversation):
    """chatml equals SmolLM2's official template whenever a system prompt is given."""
    if conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": "You are Ava."}] + conversation
    rendered = get_template("chatml").render(conversation).text
    assert rendered == tokenizer.apply_chat_template(conversation, tokenize=False)


def test_multi_turn_labels_are_exactly_the_assistant_replies(tokenizer):
    conversation = CONVERSATIONS[1]
    for template in (get_template(None, tokenizer), get_template("chatml")):
        sample, truncated = encode(conversation, tokenizer, template, max_length=10_000)
        assert not truncated
        # the trained tokens form exactly two runs, one per assistant reply and its end marker
        pieces, current = [], []
        for i, label in enumerate(sample.labels):
            if label != IGNORE:
                current.append(label)
            elif current:
                pieces.append(tokenizer.decode(current)), current.clear()
        pieces += [tokenizer.decode(current)] if current else []
        assert [p.rstrip("\n") for p in pieces] == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
        assert all(label in (IGNORE, token) for label, token in zip(sample.labels, sample.input_ids))


def test_loss_false_keeps_a_turn_out_of_the_loss(tokenizer):
    conversation = [dict(m) for m in CONVERSATIONS[1]]
    conversation[2]["loss"] = False
    sample, _ = encode(conversation, tokenizer, get_template(None, tokenizer), max_length=10_000)
    trained = tokenizer.decode([t for t in sample.labels if t != IGNORE])
    assert "Rome." in trained and "Paris." not in trained


def test_truncation(tokenizer):
    sample, truncated = encode(CONVERSATIONS[1], tokenizer, get_template("chatml"), max_length=12)
    assert truncated and len(sample.input_ids) == len(sample.labels) == 12


def test_registry():
    with pytest.raises(TunerError, match="unknown prompt template 'chatlm'; known templates: default, zephyr"):
        get_template("chatlm")
    with pytest.raises(ValueError, match="already registered"):
        register_template(PromptTemplate(name="chatml", system="{system}", user="{input}", suffix=""))
    xtuner = {"default", "zephyr", "internlm_chat", "internlm2_chat", "moss_sft", "llama2_chat", "code_llama_chat",
              "chatglm2", "chatglm3", "qwen_chat", "baichuan_chat", "baichuan2_chat", "wizardlm", "wizardcoder",
              "vicuna", "deepseek_coder", "deepseek_moe", "deepseek_v2", "mistral", "mixtral", "minicpm", "gemma",
              "cohere_chat", "llama3_chat", "phi3_chat"}
    assert xtuner | {"chatml", "qwen2_5_chat", "qwen3_chat"} <= set(TEMPLATES)


def family_tokenizer(tokenizer, jinja: str, bos: str | None, eos: str, special: list[str]):
    """The real tokenizer dressed as another family: its official template and special tokens."""
    import copy

    family = copy.deepcopy(tokenizer)
    family.chat_template = jinja
    family.add_special_tokens({"additional_special_tokens": [t for t in (bos, eos, *special) if t]})
    family.bos_token, family.eos_token = bos, eos
    return family


@pytest.mark.parametrize("name", list(__import__("official_templates").FAMILIES))
def test_named_template_renders_like_the_official_one(tokenizer, name):
    from official_templates import FAMILIES

    jinja, bos, eos, has_system, special = FAMILIES[name]
    family = family_tokenizer(tokenizer, jinja, bos, eos, special)
    ours = get_template(name, family)
    ours_as_official = get_template(None, family)
    for conversation in CONVERSATIONS:
        if conversation[0]["role"] == "system" and not has_system:
            conversation = conversation[1:]
        if name == "chatml" and conversation[0]["role"] != "system":
            conversation = [{"role": "system", "content": "You are Ava."}] + conversation
        official = family.apply_chat_template(conversation, tokenize=False)
        assert ours.render(conversation).text == official
        prompt = family.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        assert ours.render(conversation[:-1], add_generation_prompt=True).text == prompt
        # token ids and trained tokens agree too, whether the named or the official template is used
        named, _ = encode(conversation, family, ours, 10_000)
        official_sample, _ = encode(conversation, family, ours_as_official, 10_000)
        assert named.input_ids == family.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        assert named.input_ids == official_sample.input_ids
        trained = lambda s: family.decode([t for t in s.labels if t != IGNORE])  # noqa: E731
        assert all(m["content"] in trained(named) for m in conversation if m["role"] == "assistant")
        assert trained(named).replace("\n", "") == trained(official_sample).replace("\n", "").replace(eos * 2, eos)


def test_tool_calls_render_in_named_and_tokenizer_templates(tokenizer):
    tools = [{"type": "function", "function": {"name": "calculate", "parameters": {"type": "object"}}}]
    conversation = [
        {"role": "user", "content": "What is 3 * 7?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculate", "arguments": '{"expression": "3 * 7"}'}}]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": "3 * 7 = 21."}]
    for template in (get_template("chatml", tokenizer), get_template(None, tokenizer)):
        rendered = template.render(conversation, tools=tools)
        trained = "".join(rendered.text[a:b] for a, b in rendered.spans)
        assert '<tool_call>\n{"name": "calculate", "arguments": {"expression": "3 * 7"}}\n</tool_call>' in trained
        assert "3 * 7 = 21." in trained and "21\n</tool_response>" not in trained
    assert '"name": "calculate"' in get_template("chatml", tokenizer).render(conversation, tools=tools).text.split(
        "<|im_start|>user")[0]  # the tools are listed in the system prompt


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_named_template_as_jinja_renders_like_itself(tokenizer, name):
    """What pth_to_hf and merge write as the chat template renders exactly what training rendered."""
    import copy

    from real_tokenizers import CASES, MISTRAL_TOOL_CASE
    from tuner.data.template_jinja import to_jinja

    family = copy.deepcopy(tokenizer)
    family.bos_token = family.bos_token or "<|endoftext|>"
    template, jinja = TEMPLATES[name].bind(family), to_jinja(TEMPLATES[name])
    for conversation in [*CASES.values(), MISTRAL_TOOL_CASE, {"messages": CONVERSATIONS[1]}]:
        tools = conversation.get("tools")
        for prompt in (False, True):
            messages = conversation["messages"][:-1] if prompt else conversation["messages"]
            ours = template.render(messages, add_generation_prompt=prompt, tools=tools).text
            kwargs = {"tools": tools} if tools else {}
            assert family.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                              add_generation_prompt=prompt, **kwargs) == ours
