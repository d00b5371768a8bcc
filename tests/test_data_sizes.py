"""Data at the size of real datasets: the .json array reader is streamed, linear in the file and
bounded in memory, with exact line numbers (checked against json.loads and the file's own lines)."""

import json
import os
import random
import time
import tracemalloc

import pytest

from tuner.data import sources
from tuner.data.sources import iter_rows
from tuner.errors import TunerError


def _alpaca(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"指令 {i} " + "x" * rng.randint(0, 300), "input": "",
             "output": f"Answer {i} ü€😀 " + "y" * rng.randint(0, 400)} for i in range(n)]


def _element_lines(text: str) -> list[int]:
    """With indent=4, each element of the array opens on a line of its own: '    {'."""
    return [i + 1 for i, line in enumerate(text.split("\n")) if line == "    {"]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_json_array_rows_and_lines_equal_json_loads(tmp_path, monkeypatch, chunk):
    """Tiny chunks cut elements, strings, escapes and multi-byte characters at every place."""
    monkeypatch.setattr(sources._JsonText, "CHUNK", chunk)
    rows = _alpaca(300) + [{"text": "a\\\"b\n" * 2000, "nested": {"list": [1, 2.5, None, True, "\u00e9"]}}]
    text = json.dumps(rows, indent=4, ensure_ascii=False)
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    read = list(iter_rows(path))
    assert [row for _, _, row in read] == json.loads(text)
    assert [line for _, line, _ in read] == _element_lines(text)
    compact = tmp_path / "compact.json"  # one line, no spaces
    compact.write_text(json.dumps(rows, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    assert [row for _, _, row in iter_rows(compact)] == rows


@pytest.mark.slow
def test_a_real_size_json_file_reads_in_linear_time(tmp_path):
    """52,000 Alpaca-style rows with indent 4 (about 24 MB, the size of alpaca_data.json): the old reader
    recounted lines from the start for each row (257 s measured); streamed it takes about 0.4 s."""
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(_alpaca(52_000), indent=4, ensure_ascii=False), encoding="utf-8")
    start = time.perf_counter()
    count = sum(1 for _ in iter_rows(path))
    elapsed = time.perf_counter() - start
    assert count == 52_000
    assert elapsed < 20, f"{elapsed:.1f} s to read 52,000 rows"


def test_json_array_reading_is_bounded_in_memory(tmp_path, monkeypatch):
    """A 7 MB file is read holding about one chunk (64 KB here; its text is 4 bytes a character once an emoji
    is in it) and one element, not the whole file."""
    monkeypatch.setattr(sources._JsonText, "CHUNK", 1 << 16)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_alpaca(16_000), indent=4, ensure_ascii=False), encoding="utf-8")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        for _ in iter_rows(path):
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 7e6 and peak < 2 * (1 << 20), f"peak {peak / 2**20:.1f} MiB reading a {size / 2**20:.1f} MiB file"


@pytest.mark.parametrize("text, message", [
    ('[\n  {"a": 1},\n  {"a": 2,,}\n]', r"data.json:3: malformed JSON"),
    ('[\n  {"a": 1},\n  {"a": "unterminated\n  }\n]', r"data.json:3: malformed JSON"),
    ('[\n  {"a": 1}\n  {"a": 2}\n]', r"data.json:3: malformed JSON: expected ',' or ']'"),
    ('[\n  {"a": 1},\n  [1, 2]\n]', r"data.json:3: each element must be a JSON object, got list"),
    ('[\n  {"a": 1},\n  {"a": 2}\n', r"data.json:4: malformed JSON: the array is not closed"),
    ('{"a": 1}', r"data.json:1: a .json data file must hold an array of objects"),
])
def test_bad_json_arrays_name_the_line(tmp_path, monkeypatch, text, message):
    monkeypatch.setattr(sources._JsonText, "CHUNK", 5)
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(TunerError, match=message):
        list(iter_rows(path))


def test_invalid_utf8_in_a_json_array_names_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sources._JsonText, "CHUNK", 16)
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n  {"a": "ok"},\n  {"a": "ok"},\n  {"a": "bad \xff byte"}\n]')
    with pytest.raises(TunerError, match=r"data.json:4: not valid UTF-8"):
        list(iter_rows(path))


def test_a_huge_row_is_cut_before_tokenizing_with_the_same_tokens(tokenizer):
    """A 4 MB conversation with max_length 256: the text is cut to what 256 tokens could cover before the
    tokenizer sees it, and the kept ids and trained flags equal those of tokenizing it whole."""
    from tuner.data.encode import longest_token, prepare, tokenize
    from tuner.data.templates import get_template

    row = {"messages": [{"role": "user", "content": "Summarize: " + "The quick brown fox jumps. " * 150_000},
                        {"role": "assistant", "content": "A fox jumps."}]}
    prepared = prepare(row, get_template("chatml", tokenizer), None)
    assert len(prepared.text) > 4_000_000
    seen = []
    backend = tokenizer.backend_tokenizer
    real = backend.encode_batch_fast

    class Recording:
        def __getattr__(self, name):
            return getattr(backend, name)

        def encode_batch_fast(self, texts, **kwargs):
            seen.extend(len(t) for t in texts)
            return real(texts, **kwargs)

    class Wrapped:
        backend_tokenizer = Recording()
        eos_token_id = tokenizer.eos_token_id

        def get_vocab(self):
            return tokenizer.get_vocab()

    started = time.perf_counter()
    cut = tokenize([prepared], Wrapped(), max_length=256)[0]
    elapsed = time.perf_counter() - started
    assert seen == [256 * longest_token(tokenizer) + 1] and cut.truncated
    whole = tokenize([prepared], tokenizer, max_length=None)[0]
    assert cut.ids.tolist() == whole.ids[:256].tolist() and cut.trained.tolist() == whole.trained[:256].tolist()
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def test_an_uncached_token_store_is_removed_when_the_process_ends(tmp_path):
    """data.cache=False tokenizes into a temporary folder (read while training); the process removes it at exit."""
    import subprocess
    import sys

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}"},
                                                     {"role": "assistant", "content": f"A{i}"}]}) + "\n"
                            for i in range(20)))
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = ("from tuner.config import DataConfig\nfrom tuner.data.dataset import build_sequences\n"
              "from tuner.model.load import load_tokenizer\nimport os\n"
              f"data = DataConfig(path={str(data)!r}, cache=False, num_proc=1)\n"
              "sequences, _ = build_sequences(data, load_tokenizer('smollm2-135m-instruct'), say=lambda _: None)\n"
              "print(len(sequences), os.listdir(os.environ['TMPDIR']))\n")
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(temp)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "tuner-tokens-" in run.stdout  # it was there while the process ran
    assert not [p for p in temp.iterdir() if p.name.startswith("tuner-tokens-")]


LOCATING_TEXTS = ["Hello", " leading space", "\n\nnew lines\n", "指令：把这句话翻译成英文。", "emoji 😀🎉 and ü€",
                  "Cafe\u0301 (not NFC)", "\u212b angstrom sign", "tabs\tand  double  spaces ", "x" * 3000,
                  "<|im_end|> typed by a user", "12345678901234567890", "mixed 한국어 text"]


@pytest.mark.parametrize("name", ["smollm2", "qwen2_5", "qwen3", "llama3_2", "deepseek_v3", "mistral_nemo",
                                  "gemma3", "internlm2"])
def test_trained_flags_from_token_bytes_equal_those_from_offsets(tokenizer, name):
    """The fast path (ids only, each token's bytes summed) gives the ids and trained flags that reading
    every token's offsets gives, on each real tokenizer, for replies in many scripts, unnormalized text,
    spaces at the edges and a cut text; a tokenizer it cannot serve takes the offsets path."""
    from real_tokenizers import real_tokenizer

    from tuner.data.encode import Prepared, _trained_by_starts, token_bytes, tokenize
    from tuner.data.templates import get_template

    tok = tokenizer if name == "smollm2" else real_tokenizer(name)
    fast = token_bytes(tok) is not None
    assert fast == (name not in ("gemma3", "internlm2")), name
    template = get_template(None, tok)
    rng = random.Random(0)
    batch = []
    for i in range(40):
        user, reply = rng.choice(LOCATING_TEXTS), rng.choice(LOCATING_TEXTS) + rng.choice(LOCATING_TEXTS)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": rng.choice(LOCATING_TEXTS)},
                         {"role": "assistant", "content": rng.choice(LOCATING_TEXTS)}]
        rendered = template.render(messages)
        batch.append(Prepared(rendered.text, rendered.spans))
    max_length = 300  # some texts are cut before tokenizing
    got = tokenize(batch, tok, max_length)
    limit = max_length * max(len(t) for t in tok.get_vocab()) + 1
    for prepared, encoded in zip(batch, got):
        text = prepared.text[:limit]
        encoding = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        starts = [a for a, _ in encoding.offsets]
        want = _trained_by_starts(__import__("numpy").asarray(starts), prepared.spans)[:max_length]
        assert encoded.ids.tolist() == encoding.ids[:max_length]
        assert encoded.trained.tolist() == want.tolist(), (name, text[:80])
    assert sum(e.trained.any() for e in got) >= 25 and sum(e.truncated for e in got) >= 3
