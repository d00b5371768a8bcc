"""The OpenAI-compatible server, driven by the official `openai` client on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import CALCULATE

from tuner.generation.generate import Generator
from tuner.generation.load import load_chat_model
from tuner.serve.api import Api, make_server

KEY = "sk-test-key"


def start(model_dir, name: str, api_key: str | None = KEY):
    model, tokenizer, _ = load_chat_model(str(model_dir), torch_dtype="fp32")
    api = Api(Generator(model, tokenizer, context_length=512), name, api_key, max_new_tokens=16)
    server = make_server(api, "127.0.0.1", 0, page=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return api, server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    api, server, url = start(tiny_model_dir, "tiny")
    yield api, url, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    server.shutdown()


def ask(client, content: str, model: str = "tiny", **kwargs) -> str:
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                              temperature=0, max_tokens=12, **kwargs)
    return response.choices[0].message.content


def test_models_chat_stream_and_completions(tiny_server):
    _, _, client = tiny_server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              temperature=0, max_tokens=12)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens > 5
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                 temperature=0, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    completion = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6,
                                           temperature=0)
    streamed = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    assert completion.usage.completion_tokens == 6


def _post(url: str, data: bytes, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers)) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(tiny_server):
    _, url, client = tiny_server
    status, body = _post(url + "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "could not parse the JSON body" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError) as error:
        ask(client, "Hi", model="gpt-4o")
    assert error.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, "word " * 600)
    assert error.value.body["code"] == "context_length_exceeded" and "maximum context length is 512" in \
        error.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as error:
        ask(openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0), "Hi")
    assert error.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError, match="'temperature' must be a number from 0 to 2"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "Hi"}])
    import base64
    import io

    from PIL import Image
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with pytest.raises(openai.BadRequestError, match="this model takes text only"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}]}])
    with pytest.raises(openai.BadRequestError, match="takes text only"):  # (never decoded: a text model's refusal)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    status, body = _post(url + "/v1/nothing", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = _post(url + "/v1/chat/completions", b'{"model": "tiny"}', key=None)
    assert status == 401
    assert ask(client, "Hi") is not None  # still serving


def test_16_concurrent_requests_each_get_their_own_reply(tiny_server):
    api, _, client = tiny_server
    prompts = [f"Question {i}: tell me about {topic}." for i, topic in
               enumerate(["cats", "dogs", "rain", "the sea", "trains", "bread", "music", "snow", "maps", "salt",
                          "glass", "wolves", "tea", "paper", "bees", "stars"])]
    alone = [ask(client, p) for p in prompts]
    before = len(api.engine.batches)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: ask(client, p), prompts))
    assert together == alone
    assert len(set(alone)) > 1
    assert max(api.engine.batches[before:]) > 1  # they were batched, not only queued


def test_tool_calls_through_the_api(tool_model_dir):
    _, server, url = start(tool_model_dir, "tools", api_key=None)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        messages = [{"role": "user", "content": "What is 12 times 7?"}]
        response = client.chat.completions.create(model="tools", messages=messages, tools=[CALCULATE],
                                                  temperature=0, max_tokens=40)
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        call = choice.message.tool_calls[0]
        assert call.function.name == "calculate" and json.loads(call.function.arguments) == {"expression": "12*7"}
        chunks = list(client.chat.completions.create(model="tools", messages=messages, tools=[CALCULATE],
                                                     temperature=0, max_tokens=40, stream=True))
        streamed = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
        assert streamed[0][0].function.name == "calculate"
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # the call is not shown as text
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "84"}]
        answer = client.chat.completions.create(model="tools", messages=messages, tools=[CALCULATE],
                                                temperature=0, max_tokens=40)
        assert answer.choices[0].message.content == "12 times 7 is 84."
        assert answer.choices[0].finish_reason == "stop"
    finally:
        server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stdout.read()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("server did not start")


@pytest.mark.slow
def test_tuner_serve_command_with_the_embedded_model():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tuner.cli", "serve", "smollm2-135m-instruct", "--port",
                                str(port), "--api-key", KEY, "--torch-dtype", "fp32"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, process)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        name = "smollm2-135m-instruct"
        assert "Paris" in ask(client, "What is the capital of France?", model=name)
        prompts = [f"Write one sentence about the number {i}." for i in range(16)]
        alone = [ask(client, p, model=name) for p in prompts]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda p: ask(client, p, model=name), prompts))
        assert together == alone
        assert all(str(i) in reply for i, reply in zip(range(16), together))
    finally:
        process.terminate()
        process.wait(10)
