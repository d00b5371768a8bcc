"""`tuner serve` against hostile and careless clients, with real sockets on loopback: the key is checked
before the body is read, bodies are capped, prompts too long are refused before tokenizing, bad values get
4xx, connections time out, a client that leaves cancels its generation, errors mid-stream arrive as events,
cross-origin requests are refused. Each case is bounded in count and time."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest

from tuner.generation.generate import Generator
from tuner.generation.load import load_chat_model
from tuner.serve.api import Api, make_server

KEY = "sk-hostile-test"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model, tokenizer, _ = load_chat_model(str(tiny_model_dir), torch_dtype="fp32")
    api = Api(Generator(model, tokenizer, context_length=512), "tiny", KEY, max_new_tokens=16)
    httpd = make_server(api, "127.0.0.1", 0, page=False, max_body_bytes=1 << 20, idle_seconds=1.5)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    yield api, port, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    httpd.shutdown()


def raw(port: int, request: bytes, read_seconds: float = 10) -> tuple[int, dict | str]:
    """Send bytes as they are; (status, JSON body or text) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_seconds) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length:")), 0)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    status = int(head.split(b" ")[1])
    try:
        return status, json.loads(rest[:length])
    except ValueError:
        return status, rest.decode(errors="replace")


def post(port: int, body: bytes | str, key: str | None = KEY, path: str = "/v1/chat/completions",
         headers: dict | None = None, length: str | None = None) -> tuple[int, dict | str]:
    body = body.encode() if isinstance(body, str) else body
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {length if length is not None else len(body)}", "Connection: close"]
    lines += [f"Authorization: Bearer {key}"] if key else []
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def chat(content, **extra) -> str:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                       **extra}, ensure_ascii=False)


def test_the_key_is_checked_before_the_body_and_bodies_are_capped(server):
    """A 20 GB Content-Length reserves nothing: 401 without a key, 413 with one; a body over the cap is 413."""
    _, port, client = server
    rss = psutil.Process().memory_info().rss
    started = time.perf_counter()
    assert post(port, b"{", key=None, length=str(20 << 30))[0] == 401
    status, body = post(port, b"{", length=str(20 << 30))
    assert status == 413 and body["error"]["code"] == "request_too_large" and "at most 1048576" in \
        body["error"]["message"]
    status, body = post(port, chat("x" * (2 << 20)))  # 2 MiB, over this server's 1 MiB cap
    assert status == 413
    assert time.perf_counter() - started < 5 and psutil.Process().memory_info().rss - rss < 200 << 20
    assert client.models.list().data[0].id == "tiny"


def test_a_prompt_too_long_is_refused_before_tokenizing(server):
    """900 KB of text for a 512-token context: refused at once, not after tokenizing it."""
    api, port, _ = server
    calls = []
    tokenize = api.generator.prompt_ids
    api.generator.prompt_ids = lambda *a, **k: calls.append(1) or tokenize(*a, **k)
    try:
        started = time.perf_counter()
        status, body = post(port, chat("word " * 180_000))
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert time.perf_counter() - started < 3 and calls == []
        status, body = post(port, json.dumps({"model": "tiny", "prompt": "word " * 180_000}), path="/v1/completions")
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    finally:
        api.generator.prompt_ids = tokenize


@pytest.mark.parametrize("body, length, message", [
    (chat("Hi"), "abc", "Content-Length must be a number"),
    (chat("Hi"), "-1", "Content-Length must be a number"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', None, "lone surrogate"),
    ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
    (json.dumps({"model": "tiny", "prompt": ""}), None, "the prompt is empty"),
    (chat("Hi", n=True), None, "only n=1"),
    (chat("Hi", stream="yes"), None, "'stream' must be true or false"),
    (chat("Hi", logprobs=True, top_logprobs=21), None, "'top_logprobs' must be an integer from 0 to 20"),
    (chat("Hi", top_logprobs=2), None, "'top_logprobs' needs 'logprobs': true"),
    (json.dumps({"model": "tiny", "prompt": "Hi", "echo": True, "stream": True}), None,
     "'echo' with 'stream' is not supported"),
    (chat("Hi", echo=True), None, "'echo' is a /v1/completions parameter"),
    (json.dumps({"model": "tiny", "prompt": "Hi", "logprobs": 21}), None, "'logprobs' must be an integer from 0 to 20"),
    (json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 0}), None, "'max_tokens' must be an integer from 1"),
    (json.dumps({"model": "tiny", "prompt": [[1, 2], [10 ** 9]]}), None, "token id 1000000000 is not in the model"),
    (json.dumps({"model": "tiny", "prompt": [[1, 2], 3]}), None, "'prompt' must be a string, a list of strings"),
    (json.dumps({"model": "tiny", "prompt": ["Hi"] * 65}), None, "at most 64 prompts"),
    (json.dumps({"model": "tiny", "prompt": ["Hi", "Ho"], "stream": True}), None, "'stream' with a list of prompts"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "", "tool_calls": "calc"}]}),
     None, "tool_calls must be a list"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "", "tool_calls": [{"id": 1}]}]}),
     None, r"tool_calls\[0\] must be"),
])
def test_bad_values_get_400_not_500(server, body, length, message):
    import re

    _, port, client = server
    path = "/v1/completions" if '"prompt"' in body else "/v1/chat/completions"
    status, answer = post(port, body, length=length, path=path)
    assert status == 400, answer
    assert re.search(message, answer["error"]["message"]), answer
    assert client.models.list().data[0].id == "tiny"


def test_a_non_ascii_digit_in_content_length_is_a_400(server):
    """'³'.isdigit() is True but int('³') raises: it was a 500 (headers arrive as Latin-1)."""
    _, port, _ = server
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Length: 1\u00b3\r\nConnection: close\r\n\r\n").encode("latin-1")
    status, body = raw(port, head + chat("Hi").encode())
    assert status == 400 and "Content-Length must be a number" in body["error"]["message"], body


def test_cross_origin_requests_and_foreign_hosts_are_refused(server):
    """What any web page could send to a loopback server: a text/plain POST from another origin, or a
    request through a DNS name that points at 127.0.0.1."""
    _, port, _ = server
    status, body = post(port, chat("Hi"), headers={"Origin": "http://evil.example"})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    lines = ["POST /v1/chat/completions HTTP/1.1", f"Host: evil.example:{port}", "Content-Type: text/plain",
             f"Content-Length: {len(chat('Hi'))}", f"Authorization: Bearer {KEY}", "Connection: close"]
    status, body = raw(port, ("\r\n".join(lines) + "\r\n\r\n" + chat("Hi")).encode())
    assert status == 403 and body["error"]["code"] == "forbidden_host"
    status, body = post(port, chat("Hi"), headers={"Origin": "null"})  # sandboxed iframes, file: pages
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    assert post(port, chat("Hi"), headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200  # the page's own


def test_a_burst_of_clients_is_accepted_and_stalled_ones_time_out(server, capfd):
    """32 clients at once all answered (the backlog was 5); 50 connections that send nothing are closed
    after the idle timeout; clients that leave early leave no traceback in the log."""
    _, port, client = server

    def health(_):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            return s.recv(4096).split(b" ")[1]

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(health, range(32))) == [b"200"] * 32
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
    stalled[0].sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # half the headers
    time.sleep(3)  # idle timeout 1.5 s
    assert all(s.recv(1) == b"" for s in stalled)  # closed by the server
    for s in stalled:
        s.close()
    for _ in range(5):  # clients that send a request and leave before the answer
        s = socket.create_connection(("127.0.0.1", port))
        body = chat("Hi")
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                   f"\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        s.close()
    time.sleep(1)
    assert client.models.list().data[0].id == "tiny"
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_that_leaves_cancels_its_generation(server):
    """A non-streaming request for 400 tokens whose client disconnects stops generating."""
    api, port, _ = server
    jobs = []
    submit = api.engine.submit
    api.engine.submit = lambda job: jobs.append(job) or submit(job)
    try:
        s = socket.create_connection(("127.0.0.1", port))
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 400,
                           "temperature": 1.0, "stop": ["\u0000"]})
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json"
                   f"\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        deadline = time.time() + 10
        while not jobs and time.time() < deadline:
            time.sleep(0.01)
        s.close()
        assert jobs and jobs[0].cancelled.wait(timeout=5), "the job was not cancelled"
    finally:
        api.engine.submit = submit


def test_an_error_after_the_stream_started_is_an_error_event(server, monkeypatch):
    """The engine fails mid-stream: the official client raises the server's message (it read
    'Connection error' when the server wrote a second HTTP response into the stream)."""
    api, _, client = server
    real = api.generator.generate

    def fails_after_a_token(prompts, settings, on_text=None, **kwargs):
        for callback in on_text or []:
            callback("Hel")
        raise RuntimeError("the GPU fell off the bus")

    monkeypatch.setattr(api.generator, "generate", fails_after_a_token)
    with pytest.raises(openai.APIError, match="the GPU fell off the bus"):
        for _ in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                stream=True, max_tokens=8):
            pass
    monkeypatch.setattr(api.generator, "generate", real)
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4).choices[0].message.content is not None


def test_a_short_request_does_not_wait_for_a_long_one(server):
    """A 4-token request sent while a 450-token one runs is answered within about the engine's slice
    (1 s by default, 0.1 s here: a fast CPU writes the 450 tokens in under a second): the long batch
    pauses, the short one runs, the long one goes on. The long reply (greedy, fp32) is the same as when
    it ran alone."""
    api, _, client = server
    api.engine.slice_seconds = 0.1
    long_request = dict(model="tiny", messages=[{"role": "user", "content": "Tell me everything."}],
                        max_tokens=450, temperature=0, stop=["\u0000"])
    started = time.perf_counter()
    alone = client.chat.completions.create(**long_request)
    alone_seconds = time.perf_counter() - started
    assert alone.usage.completion_tokens > 300 and alone_seconds > 0.4, (alone.usage, alone_seconds)
    with ThreadPoolExecutor(1) as pool:
        long_future = pool.submit(client.chat.completions.create, **long_request)
        time.sleep(0.1)
        started = time.perf_counter()
        short = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=4, temperature=0)
        short_seconds = time.perf_counter() - started
        together = long_future.result(timeout=60)
    assert short.usage.completion_tokens <= 4 and short_seconds < alone_seconds / 2, (short_seconds, alone_seconds)
    assert together.choices[0].message.content == alone.choices[0].message.content
    assert together.usage == alone.usage


def bomb_png(side: int = 12_248) -> bytes:
    """A grayscale PNG of side x side zeros (150 megapixels: under PIL's own bomb limit of 179M), about
    150 KB: it decodes to 150 MB, 450 MB as RGB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_request(png: bytes, count: int) -> str:
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return json.dumps({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}} for _ in range(count)] + [{"type": "text", "text": "Hi"}]}]})


def peak_growth_while(action) -> tuple[object, int]:
    """(what `action` returns, how far this process's RSS rose above its start while it ran), sampled every 5 ms."""
    process, peak, done = psutil.Process(), [0], threading.Event()
    start = process.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss - start)
            time.sleep(0.005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        return action(), peak[0]
    finally:
        done.set()
        watcher.join()


def test_image_bombs_are_refused_before_decoding(server, tiny_model_dir):
    """Four 150-megapixel PNGs (about 600 KB together) to a text-only model: 400 before any decoding, the
    server's memory grows by < 100 MB (it grew by 2.4 GB when they were decoded first)."""
    _, port, _ = server
    png = bomb_png()
    assert len(png) < 400_000
    (status, body), grown = peak_growth_while(lambda: post(port, image_request(png, 4)))
    assert status == 400 and "takes text only" in body["error"]["message"], body
    assert grown < 100 << 20, f"{grown >> 20} MB"


def test_a_deadline_drops_a_client_that_trickles_its_request(tiny_model_dir):
    """One byte every 0.3 s never trips the idle timeout (1.5 s); the request deadline (2 s here) drops it."""
    model, tokenizer, _ = load_chat_model(str(tiny_model_dir), torch_dtype="fp32")
    httpd = make_server(Api(Generator(model, tokenizer), "tiny", None), "127.0.0.1", 0, page=False,
                        idle_seconds=1.5, request_seconds=2, max_connections=2)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        started, closed = time.perf_counter(), False
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            readable, _, _ = select.select([s], [], [], 0.3)
            if readable and s.recv(1) == b"":
                closed = True
                break
        assert closed and time.perf_counter() - started < 4
        s.close()
        # at most 2 connections at once: a third is answered 503 at once, and served once one is free
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        deadline = time.monotonic() + 10  # (until the server has taken both: on a busy machine, more than 0.2 s)
        while httpd._slots._value and time.monotonic() < deadline:
            time.sleep(0.05)
        assert raw(port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())[0] == 503
        for h in held:
            h.close()
        time.sleep(0.3)
        assert raw(port, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())[0] == 200
    finally:
        httpd.shutdown()
