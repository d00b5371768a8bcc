import json

import pytest
import torch

from tuner.config import DataConfig
from tuner.data.dataset import IGNORE, Sample, build_sequences, collate, pack_best_fit, pack_split
from tuner.data.formats import alpaca_map_fn
from tuner.errors import TunerError


def test_alpaca_map_fn():
    out = alpaca_map_fn({"instruction": "Add", "input": "1 and 2", "output": "3"})
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant"]
    assert out["messages"][1]["content"] == "Add\n1 and 2" and out["messages"][2]["content"] == "3"
    assert alpaca_map_fn({"instruction": "Hi", "output": "Hello"})["messages"][1]["content"] == "Hi"


def test_pack_best_fit_keeps_samples_whole():
    assert sorted(pack_best_fit([6, 3, 5, 2], 8)) == [[0, 3], [1, 2]]
    lengths = [((i * 7919) % 500) + 1 for i in range(3000)]
    bins = pack_best_fit(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(3000))  # every sample once, whole
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert sum(lengths) / (len(bins) * 512) > 0.97


def test_pack_split_cuts_at_max_length():
    assert pack_split([5, 6], 4) == [[(0, 0, 4)], [(0, 4, 5), (1, 0, 3)], [(1, 3, 6)]]


def test_build_sequences_alpaca_json_array(tmp_path, tokenizer):
    path = tmp_path / "alpaca.json"
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(10)]
    path.write_text(json.dumps(rows, indent=2))
    seqs, report = build_sequences(DataConfig(path=str(path), format="alpaca", template="chatml", max_length=256),
                                   tokenizer)
    assert report.stats.rows == 10 and report.stats.samples == 10 and 0 < report.packing_efficiency <= 1
    assert sum(len(seqs[i].input_ids) for i in range(len(seqs))) == report.stats.tokens


def test_system_is_added_when_missing(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Yo"}]}) + "\n")
    seqs, _ = build_sequences(DataConfig(path=str(path), system="You are Ava.", pack=False), tokenizer)
    assert "You are Ava." in tokenizer.decode(seqs[0].input_ids)


BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "hi"}, ', r"d.jsonl:2: malformed JSON"),
    ('{"msgs": []}', r"d.jsonl:2: field 'messages': missing \(row has: msgs\)"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null}]}',
     r"d.jsonl:2: field 'messages\[1\].content': must be a string, got NoneType"),
    ('{"messages": [{"role": "human", "content": "hi"}]}', r"d.jsonl:2: field 'messages\[0\].role': must be one of"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}',
     r"d.jsonl:2: field 'messages\[0\].content': is empty"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', r"d.jsonl:2: .*first non-system message must be"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
     r"d.jsonl:2: field 'messages\[0\].content': must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"d.jsonl:2: .*no assistant message"),
    ('[1, 2]', r"d.jsonl:2: each line must be a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, tokenizer, line, message):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(TunerError, match=message):
        build_sequences(DataConfig(path=str(path), format="openai"), tokenizer)


def test_bad_files(tmp_path, tokenizer):
    with pytest.raises(TunerError, match="data file not found: .*nope.jsonl"):
        build_sequences(DataConfig(path=str(tmp_path / "nope.jsonl")), tokenizer)
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": []}\n{"x": "\xff\xfe"}\n')
    with pytest.raises(TunerError, match="d.jsonl:2: not valid UTF-8"):
        build_sequences(DataConfig(path=str(path)), tokenizer)
    arr = tmp_path / "a.json"
    arr.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(TunerError, match="a.json:3: malformed JSON"):
        build_sequences(DataConfig(path=str(arr), format="alpaca"), tokenizer)
    arr.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a"}\n]')
    with pytest.raises(TunerError, match="a.json:3: field 'output': missing"):
        build_sequences(DataConfig(path=str(arr), format="alpaca"), tokenizer)


def test_collate_pads_as_a_separate_segment():
    batch = collate([Sample([5, 6, 7], [IGNORE, 6, 7]), Sample([8], [IGNORE])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]


def test_packed_samples_cannot_see_each_other(tiny_model_dir, tokenizer):
    """Logits of a sample packed after another equal its logits alone (the DESIGN trap)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a, b = list(range(100, 120)), list(range(300, 311))
    packed = collate([Sample(a + b, [0] * 31, list(range(20)) + list(range(11)))], tokenizer.pad_token_id)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits
    assert torch.allclose(together[0, 20:31], alone[0], atol=1e-5)


def test_a_padded_tokenizer_call_before_does_not_pad_the_data(tokenizer):
    """tokenizer(texts, padding=True) (generation does it) leaves padding on the Rust tokenizer; the data
    engine's batches must still be each text's own tokens, not padded to the longest of the batch."""
    from tuner.data.encode import Prepared, tokenize

    texts = ["Hello there, how are you doing today?", "Hi"]
    alone = [tokenize([Prepared(t, None)], tokenizer, None)[0].ids.tolist() for t in texts]
    tokenizer(texts, padding=True)
    try:
        together = [e.ids.tolist() for e in tokenize([Prepared(t, None) for t in texts], tokenizer, None)]
    finally:
        tokenizer.backend_tokenizer.no_padding()
    assert together == alone
