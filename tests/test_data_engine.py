"""The data engine: formats, sources, mixing, pretraining, the cache, skipping bad rows, inspection."""

import json
import threading

import numpy as np
import pytest

from tuner.config import DataConfig, DatasetSource
from tuner.data import tokenized
from tuner.data.dataset import build_sequences
from tuner.data.encode import IGNORE
from tuner.data.formats import (alpaca_zh_map_fn, detect_format, msagent_map_fn, oasst1_map_fn, openai_map_fn,
                                pretrain_map_fn, sharegpt_map_fn)
from tuner.errors import TunerError

from test_cli import tuner

PAIR = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_map_functions_before_and_after():
    assert sharegpt_map_fn({"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"},
                                                                       {"from": "gpt", "value": "Hello"}]}) == {
        "messages": [{"role": "system", "content": "Be brief."}] + PAIR}
    assert oasst1_map_fn({"text": "### Human: Hi### Assistant: Hello"}) == {"messages": PAIR}
    assert alpaca_zh_map_fn({"instruction_zh": "Hi", "input_zh": "", "output_zh": "Hello"}) == {"messages": PAIR}
    assert pretrain_map_fn({"text": "Paris."}) == {"text": "Paris."}
    tools = [{"type": "function", "function": {"name": "weather"}}]
    assert openai_map_fn({"messages": PAIR, "tools": json.dumps(tools)}) == {"messages": PAIR, "tools": tools}
    agent = msagent_map_fn({"conversations": [
        {"from": "user", "value": "Weather in Paris?"},
        {"from": "assistant", "value": 'I will check.<|startofthink|>```JSON\n{"api_name": "weather", '
                                       '"parameters": {"city": "Paris"}}\n```<|endofthink|>'},
        {"from": "function", "value": "18 degrees"}, {"from": "assistant", "value": "It is 18 degrees."}]})
    assert agent["messages"][1] == {"role": "assistant", "content": "I will check.", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    assert agent["messages"][2] == {"role": "tool", "content": "18 degrees"}


@pytest.mark.parametrize("row,fmt", [
    ({"messages": []}, "openai"), ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"instruction_zh": "a", "output_zh": "b"}, "alpaca_zh"), ({"conversations": []}, "sharegpt"),
    ({"text": "### Human: a### Assistant: b"}, "oasst1"), ({"text": "plain"}, "pretrain"),
    ({"conversations": [{"from": "assistant", "value": "<|startofthink|>"}]}, "msagent")])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def _sharegpt_rows(n, offset=0):
    return [{"conversations": [{"from": "human", "value": f"Question {i}?"},
                               {"from": "gpt", "value": f"Answer {i}."}]} for i in range(offset, offset + n)]


def test_every_source_type_and_auto_detection(tmp_path, tokenizer):
    import pandas as pd

    folder = tmp_path / "mixed"
    folder.mkdir()
    pd.DataFrame([{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(3)]).to_parquet(
        folder / "a.parquet")
    pd.DataFrame([{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(4)]).to_csv(
        folder / "b.csv", index=False)
    (folder / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sharegpt_rows(5)))
    (tmp_path / "d.txt").write_text("First document.\n\nSecond document.\n")
    data = DataConfig(sources=[DatasetSource(path=str(folder / "a.parquet")), DatasetSource(path=str(folder / "b.csv")),
                               DatasetSource(path=str(folder / "c.jsonl")), DatasetSource(path=str(tmp_path / "d.txt"))],
                      max_length=64)
    sequences, report = build_sequences(data, tokenizer)
    assert report.stats.source_samples == [3, 4, 5, 2]
    assert list(report.stats.formats.values()) == ["alpaca (detected)", "alpaca (detected)", "sharegpt (detected)",
                                                   "pretrain (detected)"]
    # a folder is all its files
    _, folder_report = build_sequences(DataConfig(path=str(folder), format="auto", max_length=64), tokenizer)
    assert folder_report.stats.rows == 12


def test_hub_dataset_offline_is_a_clear_error(tokenizer, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # (read when the libraries are imported: set where they keep it)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TunerError, match="could not load the dataset 'someone/some-dataset'"):
        build_sequences(DataConfig(path="someone/some-dataset", format="alpaca"), tokenizer)


def test_a_new_revision_of_a_hub_dataset_is_tokenized_again(tokenizer, monkeypatch, tmp_path):
    """The tokenized cache of a hub dataset is keyed by the commit it resolves to: the hub's answer
    online, the local hub cache's ref offline, a pinned `revision` as given."""
    import types

    import huggingface_hub

    from tuner.data.tokenized import cache_key

    data = DataConfig(path="someone/some-dataset", format="alpaca")
    sha = {"value": "a" * 40}
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, name, revision=None, timeout=None: types.SimpleNamespace(sha=sha["value"]))
    first = cache_key(data, tokenizer)
    assert cache_key(data, tokenizer) == first
    sha["value"] = "b" * 40  # the dataset's owner pushed a new version
    assert cache_key(data, tokenizer) != first

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    ref = tmp_path / "datasets--someone--some-dataset" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert cache_key(data, tokenizer) == first  # offline: the commit the local cache holds
    ref.write_text("c" * 40)
    assert cache_key(data, tokenizer) != first
    pinned = DataConfig(sources=[DatasetSource(path="someone/some-dataset", format="alpaca", revision="v1.0")])
    assert cache_key(pinned, tokenizer) not in (first, cache_key(data, tokenizer))


def test_mixing_with_repeats(tmp_path, tokenizer):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in _sharegpt_rows(10)))
    b.write_text("".join(json.dumps(r) + "\n" for r in _sharegpt_rows(10, offset=100)))
    data = DataConfig(sources=[DatasetSource(path=str(a), repeats=2.0), DatasetSource(path=str(b), repeats=0.5)],
                      pack=False, max_length=64)
    sequences, report = build_sequences(data, tokenizer)
    texts = [tokenizer.decode(sequences[i].input_ids) for i in range(len(sequences))]
    assert len(sequences) == 2 * 10 + 5
    assert sum("Question 3?" in t for t in texts) == 2
    assert sum("Question 1" in t and "Question 10" not in t for t in texts) <= 2


def test_pretraining_trains_every_token_and_splits_long_documents(tmp_path, tokenizer):
    path = tmp_path / "corpus.jsonl"
    docs = [{"text": " ".join(f"word{i}_{j}" for j in range(40))} for i in range(6)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    data = DataConfig(path=str(path), format="pretrain", max_length=64, pack=True, pack_split=True)
    sequences, report = build_sequences(data, tokenizer)
    assert report.stats.truncated == 0 and report.packing_efficiency > 0.9
    lengths = [len(sequences[i].input_ids) for i in range(len(sequences))]
    assert all(n == 64 for n in lengths[:-1]) and sum(lengths) == report.stats.tokens
    all_ids = [t for i in range(len(sequences)) for t in sequences[i].input_ids]
    assert all_ids.count(tokenizer.eos_token_id) == 6  # one EOS closes each document
    first = sequences[0]
    assert all(label != IGNORE for label in first.labels[1:])  # every token but the first is a target
    # without splitting, long documents are truncated (and counted)
    _, truncated = build_sequences(DataConfig(path=str(path), format="pretrain", max_length=64), tokenizer)
    assert truncated.stats.truncated == 6


def test_over_long_samples_truncated_or_dropped(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    long = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 200}]
    path.write_text(json.dumps({"messages": PAIR}) + "\n" + json.dumps({"messages": long}) + "\n")
    _, kept = build_sequences(DataConfig(path=str(path), max_length=64), tokenizer)
    assert kept.stats.truncated == 1 and kept.stats.samples == 2
    _, dropped = build_sequences(DataConfig(path=str(path), max_length=64, truncation="drop"), tokenizer)
    assert dropped.stats.dropped_too_long == 1 and dropped.stats.samples == 1
    assert "1 dropped as too long" in dropped.summary()


def test_skip_bad_rows_counts_them(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [{"messages": PAIR}, {"messages": [{"role": "robot", "content": "x"}]}, {"messages": PAIR},
            {"messages": [{"role": "user", "content": "only a question"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TunerError, match=r"d.jsonl:2: field 'messages\[0\].role'"):
        build_sequences(DataConfig(path=str(path)), tokenizer)
    _, report = build_sequences(DataConfig(path=str(path), skip_bad_rows=True), tokenizer)
    assert report.stats.bad_rows == 2 and report.stats.samples == 2
    assert "2 bad rows skipped (first: " in report.summary() and "d.jsonl:2" in report.summary()


def test_cache_is_reused_and_keyed_by_content(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _sharegpt_rows(50)))
    data = DataConfig(path=str(path), max_length=128)
    first, report = build_sequences(data, tokenizer)
    assert not report.from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(tokenized, "tokenize_rows", no_tokenizing)
    again, report = build_sequences(data, tokenizer)
    assert report.from_cache and again[0].input_ids == first[0].input_ids
    for changed in (DataConfig(path=str(path), max_length=128, template="chatml"),
                    DataConfig(path=str(path), max_length=100)):
        with pytest.raises(AssertionError, match="tokenized again"):
            build_sequences(changed, tokenizer)
    path.write_text(path.read_text().replace("Answer 7.", "Answer seven."))
    with pytest.raises(AssertionError, match="tokenized again"):
        build_sequences(data, tokenizer)


def test_parallel_tokenizing_equals_serial(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _sharegpt_rows(700)))
    serial, _ = build_sequences(DataConfig(path=str(path), num_proc=1, cache=False, pack=False), tokenizer)
    parallel, _ = build_sequences(DataConfig(path=str(path), num_proc=2, cache=False, pack=False), tokenizer)
    assert np.array_equal(serial.store.ids, parallel.store.ids)
    assert np.array_equal(serial.store.trained, parallel.store.trained)


def test_a_second_process_waits_for_the_first_one_to_tokenize(tmp_path, tokenizer, monkeypatch):
    from filelock import FileLock

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _sharegpt_rows(20)))
    data = DataConfig(path=str(path))
    key = tokenized.cache_key(data, tokenizer)
    root = tokenized.cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(tokenized, "WAIT_SECONDS", 0.2)
    messages, result = [], {}
    with FileLock(str(root / f"{key}.lock")):  # "rank 0" is tokenizing
        (root / f"{key}.progress").write_text("12")
        waiter = threading.Thread(target=lambda: result.update(
            zip(("store", "cached"), tokenized.load_token_store(data, tokenizer, say=messages.append))))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and messages and "12 rows so far" in messages[0]
        (root / f"{key}.tmp").mkdir()
        tokenized.tokenize_rows(data, tokenizer, root / f"{key}.tmp")
        (root / f"{key}.tmp").rename(root / key)
    waiter.join(timeout=10)
    assert result["cached"] is True and len(result["store"]) == 20


def test_inspection_commands(tmp_path, tiny_model_dir, data_file):
    from conftest import write_config

    cfg = write_config(tmp_path, tiny_model_dir, data_file)
    checked = tuner("check-custom-dataset", cfg, "--samples", "1")
    assert "--- rendered text" in checked.stdout and "--- labels" in checked.stdout
    assert "All 24 rows are valid" in checked.stdout and "packing efficiency" in checked.stdout
    logged = tuner("log-dataset", cfg, "--show", "masked_text", "--num", "50")
    assert "masked]I am Ava, made by Ada Lab.<|im_end|>" in logged.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data_file.read_text().splitlines()[0] + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    result = tuner("check-custom-dataset", write_config(tmp_path, tiny_model_dir, bad), check=False)
    assert result.returncode == 1 and "1 of 2 rows are bad" in result.stdout and "bad.jsonl:2" in result.stdout
    assert "openai" in tuner("list-dataset-format").stdout
