"""Log-probabilities from `tuner serve`: the prompt's (echo) and the generated tokens', equal to the model's own
log-softmax, and lm-evaluation-harness's API backends against the real server equal to its `hf` backend."""

from __future__ import annotations

import json
import threading

import openai
import pytest
import torch

from tuner.generation.generate import Generator
from tuner.generation.load import load_chat_model
from tuner.serve.api import Api, make_server


def serve(model_dir, name: str):
    model, tokenizer, _ = load_chat_model(str(model_dir), torch_dtype="fp32")
    api = Api(Generator(model, tokenizer, context_length=1024), name, None, max_new_tokens=16)
    server = make_server(api, "127.0.0.1", 0, page=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    server, url, tokenizer = serve(tiny_model_dir, "tiny")
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), tokenizer
    server.shutdown()


def log_softmax_of(model_dir, ids: list[int]) -> torch.Tensor:
    """Plain transformers on the same folder: row i is the distribution of the token after ids[:i + 1]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echoed_prompts_and_generated_tokens_have_the_models_log_probs(tiny, tiny_model_dir):
    client, tokenizer = tiny
    text = "The quick brown fox jumps over the lazy dog because"
    ids = tokenizer(text)["input_ids"]
    # a list of prompts as token ids, echoed, with 3 completion tokens each and the 2 most likely at each place
    response = client.completions.create(model="tiny", prompt=[ids, ids[:4]], max_tokens=3, echo=True, logprobs=2,
                                         temperature=0)
    first, second = response.choices
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.prompt_tokens == len(ids) + 4 and response.usage.completion_tokens == 6
    logprobs = first.logprobs
    assert len(logprobs.tokens) == len(ids) + 3 and logprobs.token_logprobs[0] is None
    assert first.text.startswith(text) and "".join(logprobs.tokens) == first.text
    assert logprobs.text_offset[:3] == [0, len(logprobs.tokens[0]), len(logprobs.tokens[0] + logprobs.tokens[1])]
    whole = ids + tokenizer(first.text[len(text):], add_special_tokens=False)["input_ids"]
    reference = log_softmax_of(tiny_model_dir, whole)
    expected = [float(reference[i - 1, whole[i]]) for i in range(1, len(whole))]
    assert max(abs(a - b) for a, b in zip(logprobs.token_logprobs[1:], expected)) < 1e-4
    for place, top in enumerate(logprobs.top_logprobs[1:], start=1):  # the 2 most likely, largest first
        best = torch.topk(reference[place - 1], 2)
        assert list(top) == [tokenizer.decode([t]) for t in best.indices.tolist()]
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    for generated in logprobs.token_logprobs[len(ids):]:  # greedy: each generated token is the most likely one
        assert generated == max(logprobs.top_logprobs[logprobs.token_logprobs.index(generated)].values())
    assert second.logprobs.token_logprobs[1:4] == pytest.approx(logprobs.token_logprobs[1:4], abs=1e-4)

    # max_tokens 0 with echo: the prompt alone, scored
    alone = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=0)
    assert alone.choices[0].text == text and alone.choices[0].finish_reason == "length"
    assert alone.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected[:len(ids) - 1], abs=1e-4)
    assert alone.choices[0].logprobs.top_logprobs[1] == {} and alone.usage.completion_tokens == 0

    # chat: the generated tokens' log-probs and the most likely ones
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    prompt = Generator(*load_chat_model(str(tiny_model_dir), torch_dtype="fp32")[:2]).prompt_ids(
        [{"role": "user", "content": "Hi"}])
    answer = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(c.token))[0] for c in content]
    reference = log_softmax_of(tiny_model_dir, prompt + answer)
    expected = [float(reference[len(prompt) - 1 + i, t]) for i, t in enumerate(answer)]
    assert [c.logprob for c in content] == pytest.approx(expected, abs=1e-4)
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == c.logprob for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)

    # streamed, chat and completion: every generated token's log-probs in one chunk before the last, as without
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                                                 stream=True))
    streamed = [c.choices[0].logprobs.content for c in chunks if c.choices and c.choices[0].logprobs]
    assert len(streamed) == 1 and [(c.token, c.logprob) for c in streamed[0]] == [(c.token, c.logprob) for c in content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    whole = client.completions.create(model="tiny", prompt=text, max_tokens=3, logprobs=2, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=text, max_tokens=3, logprobs=2, temperature=0,
                                            stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert len(streamed) == 1 and streamed[0].token_logprobs == whole.choices[0].logprobs.token_logprobs
    assert streamed[0].tokens == whole.choices[0].logprobs.tokens


@pytest.mark.slow
def test_lm_eval_against_the_server_equals_its_hf_backend(tmp_path):
    """lm-evaluation-harness 0.4 on the embedded SmolLM2-135M-Instruct: a multiple-choice task through its
    `local-completions` backend (echo + logprobs) and a generation task through `local-chat-completions`,
    each against `tuner serve`, give the same accuracy, the same log-likelihood of every choice (1e-4) and
    the same greedy answers as its own `hf` backend on the model's folder. The tasks are written here."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from tuner.model.embedded import embedded_model_dir

    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "Madrid", "Rome"], "answer": 0},
        {"question": "What is the capital of Japan?", "choices": ["Seoul", "Beijing", "Tokyo", "Bangkok"], "answer": 2},
        {"question": "How many legs does a spider have?", "choices": ["Six", "Four", "Ten", "Eight"], "answer": 3},
        {"question": "Which planet is known as the Red Planet?", "choices": ["Venus", "Mars", "Jupiter", "Saturn"],
         "answer": 1}]))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tmp_path / "facts_mc.yaml").write_text(
        "task: facts_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    (tmp_path / "facts_gen.yaml").write_text(
        "task: facts_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"{{question}} Answer in one word.\"\n"
        "doc_to_target: \"{{choices[answer]}}\"\ngeneration_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 12\n"
        "  do_sample: false\nfilter_list:\n  - name: last_word\n    filter:\n      - function: regex\n"
        "        regex_pattern: \"(\\\\w+)\\\\W*$\"\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n    ignore_case: true\n")
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # (lm-eval's own: not needed here)
    folder = str(embedded_model_dir())
    server, url, _ = serve(folder, "smollm2")
    try:
        served = {
            "facts_mc": lm_eval.simple_evaluate(
                model="local-completions", tasks=["facts_mc"], task_manager=tasks, log_samples=True,
                model_args=f"model=smollm2,base_url={url}/v1/completions,tokenizer={folder},max_retries=1"),
            "facts_gen": lm_eval.simple_evaluate(
                model="local-chat-completions", tasks=["facts_gen"], task_manager=tasks, log_samples=True,
                apply_chat_template=True, model_args=f"model=smollm2,base_url={url}/v1/chat/completions,max_retries=1")}
    finally:
        server.shutdown()
    local = {task: lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,device=cpu",
                                           tasks=[task], task_manager=tasks, log_samples=True,
                                           apply_chat_template=task == "facts_gen")
             for task in ("facts_mc", "facts_gen")}

    mc = served["facts_mc"]["results"]["facts_mc"]["acc,none"]
    assert mc == local["facts_mc"]["results"]["facts_mc"]["acc,none"] and mc >= 0.5
    for ours, theirs in zip(served["facts_mc"]["samples"]["facts_mc"], local["facts_mc"]["samples"]["facts_mc"]):
        assert [r[0][0] for r in ours["resps"]] == pytest.approx([r[0][0] for r in theirs["resps"]], abs=1e-4)
        assert [r[0][1] for r in ours["resps"]] == [r[0][1] for r in theirs["resps"]]  # (is the choice greedy)
    gen = served["facts_gen"]["results"]["facts_gen"]["exact_match,last_word"]
    assert gen == local["facts_gen"]["results"]["facts_gen"]["exact_match,last_word"] and gen >= 0.5
    answers = [s["resps"][0][0] for s in served["facts_gen"]["samples"]["facts_gen"]]
    assert answers == [s["resps"][0][0] for s in local["facts_gen"]["samples"]["facts_gen"]]
    assert "Paris" in answers[0]
