"""The generation core and `tuner chat`: token-id history, dropping old rounds, batches
that equal single requests, stop words, streaming, and tools driven end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tuner.chat.session import ChatSession
from tuner.chat.tools import Toolbox
from tuner.generation.generate import GenerationSettings, Generator, PromptTooLong
from tuner.generation.load import load_chat_model, offload_warnings

GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    model, tokenizer, _ = load_chat_model(str(tiny_model_dir), torch_dtype="fp32")
    return Generator(model, tokenizer, "chatml", context_length=200)


def test_prompt_ids_splice_the_generated_ids_of_earlier_replies(generator):
    tokenizer = generator.tokenizer
    # "Hello" tokenized as two pieces, as a model may generate it; re-tokenizing would merge them.
    reply_ids = tokenizer.encode("Hel", add_special_tokens=False) + tokenizer.encode("lo", add_special_tokens=False)
    assert tokenizer.encode("Hello", add_special_tokens=False) != reply_ids
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "ids": reply_ids},
                {"role": "user", "content": "Again"}]
    ids = generator.prompt_ids(messages)
    as_text = generator.prompt_ids([{k: v for k, v in m.items() if k != "ids"} for m in messages])
    head = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[:len(head) + len(reply_ids)] == head + reply_ids
    assert tokenizer.decode(ids) == tokenizer.decode(as_text)  # same text, different (the generated) tokens
    assert ids != as_text


def test_fit_drops_the_oldest_rounds_and_keeps_the_system_prompt(generator):
    system = {"role": "system", "content": "Be brief."}
    rounds = [[{"role": "user", "content": f"Question {i}: " + "word " * 20},
               {"role": "assistant", "content": "Answer " * 10}] for i in range(4)]
    messages = [system] + [m for r in rounds for m in r] + [{"role": "user", "content": "Last question?"}]
    kept, ids, dropped = generator.fit(messages, max_new_tokens=50)
    assert dropped >= 1 and kept[0] == system and kept[-1]["content"] == "Last question?"
    assert kept[1]["content"].startswith(f"Question {dropped}:")
    assert len(ids) <= 200 - 50 < len(generator.prompt_ids(messages))
    with pytest.raises(PromptTooLong):
        generator.fit([system, {"role": "user", "content": "word " * 300}], max_new_tokens=50)


def test_a_batch_gives_each_prompt_its_own_greedy_reply(generator):
    prompts = [generator.prompt_ids([{"role": "user", "content": f"Tell me about {topic}."}])
               for topic in ("cats", "the sea", "a very long and winding road through the hills", "x")]
    alone = [generator.generate([p], GREEDY)[0] for p in prompts]
    together = generator.generate(prompts, GREEDY)
    assert [r.ids for r in together] == [r.ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert len({r.text for r in alone}) > 1  # the prompts really lead to different replies


def test_limits_stop_words_streaming_and_cancel_are_per_row(generator):
    prompt = generator.prompt_ids([{"role": "user", "content": "Go on."}])
    free = generator.generate([prompt], GenerationSettings(max_new_tokens=16))[0]
    assert free.finish_reason == "length" and free.completion_tokens == 16
    stop_word = free.text[len(free.text) // 2:][:3]
    pieces = [[], []]
    short, stopped = generator.generate(
        [prompt, prompt], GREEDY, on_text=[pieces[0].append, pieces[1].append], max_new_tokens=[4, 16],
        stop=[(), (stop_word,)])
    assert short.finish_reason == "length" and short.completion_tokens == 4
    assert stopped.finish_reason == "stop" and stop_word not in stopped.text
    assert free.text.startswith(stopped.text)
    assert "".join(pieces[0]) == short.text and "".join(pieces[1]) == stopped.text
    cancelled = generator.generate([prompt], GenerationSettings(max_new_tokens=16), cancelled=[lambda: True])[0]
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 1


def test_a_row_paused_on_its_last_token_ends_at_its_limit(generator):
    """The server pauses a batch between tokens; a row whose pause came with its last allowed token
    is finished ('length'), not paused: CI's serve test got 13-token replies for max_tokens=12 when the
    pause check came before the limit check and the continuation wrote one more token."""
    prompt = generator.prompt_ids([{"role": "user", "content": "Go on."}])
    alone = generator.generate([prompt], GREEDY, max_new_tokens=[6])[0]
    calls = []

    def pause_at_the_sixth_token() -> bool:  # asked once per token
        calls.append(1)
        return len(calls) >= 6

    paused = generator.generate([prompt], GREEDY, max_new_tokens=[6], cancelled=[pause_at_the_sixth_token])[0]
    assert paused.finish_reason == "length" and paused.ids == alone.ids
    half = generator.generate([prompt], GREEDY, max_new_tokens=[6], cancelled=[lambda: True])[0]
    assert half.finish_reason == "cancelled" and half.completion_tokens == 1
    rest = generator.generate([prompt], GREEDY, max_new_tokens=[6], continued=[(half.ids, half.streamed)])[0]
    assert rest.ids == alone.ids and rest.completion_tokens == 6


def test_offload_warnings_name_what_runs_slowly():
    device_map = {"model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": 0}
    lines = offload_warnings(device_map, torch.device("cuda"))
    assert any("1 of 4 modules are offloaded to disk" in line for line in lines)
    assert any("1 of 4 modules are offloaded to the CPU" in line for line in lines)
    assert offload_warnings({"": "cpu"}, torch.device("cpu")) == []


def test_weights_offloaded_to_disk_still_generate_and_warn(tiny_model_dir, tmp_path):
    warnings = []
    model, tokenizer, _ = load_chat_model(str(tiny_model_dir), torch_dtype="fp32", offload_folder=str(tmp_path),
                                          max_memory={"cpu": "4MB"}, warn=warnings.append)
    assert "disk" in set(map(str, model.hf_device_map.values()))
    assert any("offloaded to disk" in w for w in warnings)
    generator = Generator(model, tokenizer, "chatml")
    assert generator.reply([{"role": "user", "content": "Hi"}], GenerationSettings(max_new_tokens=3)) is not None


def test_session_runs_a_tool_call_the_fine_tuned_model_makes(tool_model_dir):
    model, tokenizer, _ = load_chat_model(str(tool_model_dir), torch_dtype="fp32")
    session = ChatSession(Generator(model, tokenizer), toolbox=Toolbox(["calculate"]))
    events = []
    answer = session.send("What is 12 times 7?", GenerationSettings(max_new_tokens=40), on_event=events.append)
    assert events == ['[calculate] {"expression": "12*7"} -> 84']
    assert answer == "12 times 7 is 84."
    roles = [m["role"] for m in session.messages]
    assert roles[-4:] == ["user", "assistant", "tool", "assistant"]
    assert session.messages[-3]["tool_calls"][0]["function"]["name"] == "calculate"
    session.reset()
    assert session.send("Say hi.", GenerationSettings(max_new_tokens=20), on_event=events.append) == "Hi there!"
    assert len(events) == 1  # no tool this time


def run_chat(*args, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuner.cli", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_chat_cli_with_plugins_system_template_and_dropped_rounds(tool_model_dir):
    result = run_chat(str(tool_model_dir), "--with-plugins", "calculate", "--temperature", "0", "--torch-dtype",
                      "fp32", "--max-new-tokens", "40", stdin="What is 12 times 7?\n\nEXIT\n")
    assert result.returncode == 0, result.stderr
    assert '[calculate] {"expression": "12*7"} -> 84' in result.stdout
    assert "12 times 7 is 84." in result.stdout

    long_turns = "".join(f"Tell me story number {i}, please, in detail.\n\n" for i in range(6))
    result = run_chat(str(tool_model_dir), "--system-template", "moss_sft", "--bot-name", "Ava", "--temperature",
                      "0", "--max-new-tokens", "30", "--context-length", "200", "--no-streamer",
                      stdin=long_turns + "EXIT\n")
    assert result.returncode == 0, result.stderr
    drops = re.findall(r"Log: dropped the (\d+) oldest round\(s\) of the conversation to fit the 200-token context",
                       result.stdout)
    assert drops and all(int(n) >= 1 for n in drops), result.stdout

    result = run_chat(str(tool_model_dir), "--system", "a", "--system-template", "coder", stdin="EXIT\n")
    assert result.returncode == 1 and "give --system or --system-template, not both" in result.stderr
    result = run_chat(str(tool_model_dir), "--with-plugins", "weather", stdin="EXIT\n")
    assert result.returncode == 2 and "invalid choice: 'weather'" in result.stderr


@pytest.mark.slow
def test_chat_cli_with_4_bit_weights(tiny_model_dir):
    result = run_chat(str(tiny_model_dir), "--bits", "4", "--temperature", "0", "--max-new-tokens", "5",
                      stdin="Hi\n\nEXIT\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>>") == 2


class ScriptedGenerator(Generator):
    """The real template, prompts and session; only the model's words are scripted."""

    def __init__(self, model, tokenizer, replies: list[str]):
        super().__init__(model, tokenizer, "chatml", context_length=1024)
        self.replies, self.prompts = list(replies), []

    def generate(self, prompts, settings, on_text=None, cancelled=None, max_new_tokens=None, stop=None,
                 pixel_values=None):
        from tuner.generation.generate import Reply
        text = self.replies.pop(0)
        self.prompts.append(self.tokenizer.decode(prompts[0]))
        return [Reply(text, self.tokenizer.encode(text, add_special_tokens=False), "stop", len(prompts[0]), 1)]


def test_react_tool_format_runs_actions_and_feeds_observations_back(generator):
    scripted = ScriptedGenerator(generator.model, generator.tokenizer, [
        'Thought: I should solve it.\nAction: solve\nAction Input: {"equations": "x**2 - 4 = 0"}',
        "The solutions are x = -2 and x = 2."])
    session = ChatSession(scripted, "Be brief.", Toolbox(["calculate", "solve"]), tool_format="react")
    events = []
    answer = session.send("Solve x^2 = 4.", GenerationSettings(), on_event=events.append)
    assert answer == "The solutions are x = -2 and x = 2."
    assert events == ['[solve] {"equations": "x**2 - 4 = 0"} -> x = -2; x = 2']
    assert "Action Input: the arguments as JSON" in scripted.prompts[0]  # ReAct instructions in the system prompt
    assert "<|im_start|>user\nObservation: x = -2; x = 2<|im_end|>" in scripted.prompts[1]
    assert scripted.prompts[1].startswith(scripted.prompts[0])  # the history is kept, not rebuilt


def test_tool_data_example_trains_the_prompt_that_chat_sends(tmp_path, tokenizer):
    """examples/make_calculator_data.py rows encode cleanly, and the tokens before the first
    trained token are exactly what `tuner chat --with-plugins calculate` sends."""
    import importlib.util
    from pathlib import Path

    from tuner.config import DataConfig
    from tuner.data.dataset import build_sequences
    from tuner.data.encode import IGNORE

    path = Path(__file__).parents[1] / "examples" / "make_calculator_data.py"
    spec = importlib.util.spec_from_file_location("make_calculator_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.rows(12, seed=1)
    data = tmp_path / "calc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sequences, report = build_sequences(DataConfig(path=str(data), max_length=1024, pack=False), tokenizer)
    assert report.stats.rows == 12 and len(sequences) == 12
    first = next(i for i, r in enumerate(rows) if len(r["messages"]) == 4)
    sample = sequences[first]
    trained_from = next(i for i, label in enumerate(sample.labels) if label != IGNORE)

    class _NoModel:
        config = None
    generator = Generator(_NoModel(), tokenizer)
    prompt = generator.prompt_ids(rows[first]["messages"][:1], tools=Toolbox(["calculate"]).specs)
    assert list(sample.input_ids[:trained_from]) == prompt
