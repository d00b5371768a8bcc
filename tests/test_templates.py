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
    with pytest.raises(TunerError, match="unknown prompt template 'chatlm'; known templates: default, chatml"):
        get_template("chatlm")
    with pytest.raises(ValueError, match="already registered"):
        register_template(PromptTemplate(name="chatml", system="{system}", user="{input}", suffix=""))
    assert {"default", "chatml", "internlm2_chat", "llama3_chat", "qwen_chat", "phi3_chat"} <= set(TEMPLATES)
