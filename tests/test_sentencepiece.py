"""A folder with only tokenizer.model: the tokenizer transformers builds from it, loaded through tuner,
splits text exactly as SentencePiece itself does (Mistral's real models from mistral-common)."""

import random

import pytest

from real_tokenizers import mistral_model_file, sentencepiece_folder
from tuner.model.load import load_tokenizer
from tuner.model.sentencepiece import converted_model_file

MODELS = ["tokenizer.model.v1", "mistral_instruct_tokenizer_240216.model.v2",
          "mistral_instruct_tokenizer_240323.model.v3", "mistral_instruct_tokenizer_241114.model.v7"]
PIECES = ["Hi", "there", "Paris", ".", ",", "!", "42", "2026", "请介绍", "上海", "🤗", "naïve", "def", "():",
          "return", "x", "\n", "\t", " ", "  ", "   ", "    "]


def corpus(n: int = 400) -> list[str]:
    """Text with runs of spaces between words, newlines, tabs, digits, Chinese and emoji. None starts with
    whitespace: SentencePiece adds its '▁' before a leading space too, transformers' Metaspace does not; a
    chat text always starts with a special token, so only raw text that starts with a space meets it."""
    rng = random.Random(0)
    texts = ["x.  Hi  there", "a    Hi", "Hello there  ", "x\n  Hi", "end   ", "上海  上海", "tab\t\tx"]
    while len(texts) < n:
        text = "".join(rng.choice(PIECES) + rng.choice(["", " ", " ", "  ", "   "]) for _ in range(rng.randint(1, 12)))
        texts.append(text.lstrip())
    return [t for t in texts if t]


@pytest.mark.parametrize("file", MODELS)
def test_tokenizer_from_tokenizer_model_equals_sentencepiece(file):
    import sentencepiece

    model_file = mistral_model_file(file)
    tokenizer = load_tokenizer(str(sentencepiece_folder(model_file)))
    assert converted_model_file(tokenizer) is not None
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    texts = corpus()
    ours = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    differing = [(t, tokenizer.convert_ids_to_tokens(a), reference.id_to_piece(b))
                 for t, a, b in zip(texts, ours, reference.encode(texts)) if a != b]
    assert not differing, f"{len(differing)} of {len(texts)} texts differ, e.g. {differing[:3]}"


def test_a_folder_with_tokenizer_json_is_left_as_it_is():
    from real_tokenizers import real_tokenizer

    assert converted_model_file(real_tokenizer("mistral_nemo")) is None
