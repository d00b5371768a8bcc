"""The OpenAI-compatible HTTP API (`tuner serve`) and the chat page (`tuner web`).

    GET  /v1/models
    POST /v1/chat/completions   (stream or not; tools)
    POST /v1/completions        (raw text or token ids, no template; echo and logprobs, a list of prompts)
    GET  /                      the chat page (tuner web only)

Log-probabilities: `/v1/completions` takes `logprobs` (0-20 most likely tokens per place), `echo` (the
prompt's tokens and their log-probs first: the first token has none) and `max_tokens: 0` with echo,
in OpenAI's legacy shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), so
lm-evaluation-harness's `local-completions` backend scores multiple-choice tasks against the server;
`/v1/chat/completions` takes `logprobs: true` and `top_logprobs` (0-20) for the generated tokens. Streamed
(without echo), every generated token's log-probs come in one chunk before the last. The values are the
model's own log-softmax (raw logits: before temperature, top-p or penalties).

Every error has an OpenAI-shaped body, {"error": {"message", "type", "param", "code"}},
and the right status; the server keeps serving after it. What it guarantees against hostile
clients (docs/serve.md): the key is checked before the body is read, bodies are capped
(413), prompts too long for the context are refused before they are tokenized, images are
capped in count and pixels before they are decoded (and refused by a text-only model), idle
connections time out and a request's headers and body must arrive within a deadline, at most
MAX_CONNECTIONS are served at once (503 beyond), a client that leaves cancels its generation,
cross-origin requests are refused (`Origin: null` too).
"""


from __future__ import annotations

import hmac
import json
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from tuner.chat.tools import TOOL_CALL_STARTS, parse_tool_calls
from tuner.data.encode import longest_token
from tuner.errors import TunerError
from tuner.generation.generate import GenerationSettings, Generator, partial_suffix
from tuner.serve.engine import BatchEngine, Job

LINGER_SECONDS, LINGER_BYTES = 2.0, 64 << 20  # how long / how much of an unread body is drained before closing
MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) unread; images are in the body
IDLE_SECONDS = 30  # a connection that sends nothing (headers, body, next request) for this long is closed
REQUEST_SECONDS = 60  # headers and body of one request must arrive within this, however they trickle in
BACKLOG = 128  # connections waiting to be accepted (Python's default of 5 resets bursts of clients)
MAX_CONNECTIONS = 64  # connections served at once, one worker thread each; more get 503 at once
# Images are checked from their header, before any decoding: a PNG of zeros compresses ~1000:1, so a
# 0.5 MB file can decode to 0.5 GB. A vision tower resizes to a few hundred pixels a side anyway.
MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096
MAX_IMAGES = 8  # per request
MAX_LOGPROBS = 20  # most likely tokens listed per place (OpenAI's chat cap)
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    valid = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} from {low} to {high}, got {value!r}", param=name)
    return value


def _content(content, index: int, vision: bool, seen: list) -> tuple[str, list]:
    """OpenAI content: a string, or a list of text and image_url parts -> (text with an
    '<image>' where each image was, the images). `seen`: the request's images so far (capped)."""
    if content is None or isinstance(content, str):
        return content or "", []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{index}].content must be a string or a list of parts",
                       param=f"messages[{index}].content")
    texts, images = [], []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise ApiError(400, f"messages[{index}].content: parts must be objects of type 'text' or 'image_url'",
                           param=f"messages[{index}].content")
        if part["type"] == "text":
            texts.append(str(part.get("text", "")))
        else:
            if not vision:
                raise ApiError(400, f"messages[{index}].content has an image, but this model takes text only "
                                    "(load a LLaVA model to chat about images); refused before decoding it",
                               param=f"messages[{index}].content")
            seen.append(index)
            if len(seen) > MAX_IMAGES:
                raise ApiError(400, f"a request may hold at most {MAX_IMAGES} images", param=f"messages[{index}].content")
            images.append(_data_url_image(part.get("image_url"), index))
            texts.append("<image>\n")
    return "".join(texts), images


def _data_url_image(image_url, index: int):
    """{"url": "data:image/png;base64,..."} -> a PIL image. Other URLs are refused: a server
    that fetches what clients name can be made to reach inside its network."""
    import base64
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    param = f"messages[{index}].content"
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ApiError(400, "image_url must be a data URL (data:image/png;base64,...); fetching URLs is not "
                            "supported", param=param)
    try:
        image = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1], validate=True)))  # the header only
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ApiError(400, f"the image is {width} x {height} pixels; this server takes at most {MAX_IMAGE_PIXELS:,} "
                                "pixels per image (resize it first)", param=param)
        return image.convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"image_url is not a readable image: {e}", param=param) from None


def parse_messages(raw, vision: bool = False) -> list[dict]:
    """The request's messages, checked; images (vision models only, capped in count and pixels) decoded."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages, seen = [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role must be one of system, user, assistant, tool",
                           param=f"messages[{i}].role")
        content, images = _content(m.get("content"), i, vision, seen)
        message = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
        if images:
            message["images"] = images
        if m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        for key in ("name", "tool_call_id"):
            if m.get(key):
                message[key] = m[key]
        messages.append(message)
    return messages


def _tool_calls(calls, index: int) -> list[dict]:
    """An assistant message's tool_calls, checked: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    param = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise ApiError(400, f"{param} must be a list", param=param)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not isinstance(
                function.get("arguments", ""), (str, dict)):
            raise ApiError(400, f"{param}[{j}] must be {{'type': 'function', 'function': {{'name': str, "
                                "'arguments': str}}}", param=param)
    return calls


class Api:
    """What the HTTP handler calls: validation, prompts and response bodies, no sockets."""

    def __init__(self, generator: Generator, model_name: str, api_key: str | None = None,
                 max_new_tokens: int = 512, max_batch_size: int = 16):
        self.generator, self.model_name, self.api_key = generator, model_name, api_key
        self.max_new_tokens = max_new_tokens
        self.engine = BatchEngine(generator, max_batch_size)
        self.created = int(time.time())

    def check_key(self, header: str | None) -> None:
        check_bearer(self.api_key, header)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "tuner"}]}

    def _settings(self, body: dict, least_tokens: int = 1) -> GenerationSettings:
        if body.get("model") != self.model_name:
            raise ApiError(404, f"The model {body.get('model')!r} does not exist; this server has "
                                f"{self.model_name!r}", code="model_not_found", param="model")
        n = body.get("n", 1)
        if n is not None and (isinstance(n, bool) or n != 1):
            raise ApiError(400, "only n=1 is supported", param="n")
        if not isinstance(body.get("stream", False), bool):
            raise ApiError(400, f"'stream' must be true or false, got {body['stream']!r}", param="stream")
        if body.get("best_of") not in (None, 1):
            raise ApiError(400, "'best_of' is not supported by this server", param="best_of")
        if body.get("stream") and body.get("echo"):
            raise ApiError(400, "'echo' with 'stream' is not supported by this server: ask without stream",
                           param="echo")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_new = _number({"max_tokens": limit}, "max_tokens", self.max_new_tokens, least_tokens,
                          self.generator.context_length, integer=True)
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
        return GenerationSettings(max_new_tokens=max_new, temperature=_number(body, "temperature", 1.0, 0, 2),
                                  top_p=_number(body, "top_p", 1.0, 0, 1), top_k=0,
                                  repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10),
                                  seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
                                  stop=tuple(stop))

    def _job(self, prompt: list[int], settings: GenerationSettings, pixel_values=None,
             logprobs: int | None = None) -> Job:
        room = self.generator.context_length - settings.max_new_tokens
        if len(prompt) > room:
            raise self._too_long(len(prompt), settings)
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return self.engine.submit(Job(prompt, settings, pixel_values, logprobs=logprobs))

    def token_text(self, token: int) -> str:
        return self.generator.tokenizer.decode([token], skip_special_tokens=False)

    def legacy_logprobs(self, ids: list[int], entries: list) -> dict:
        """OpenAI's /v1/completions logprobs object: each token of `ids`, its TokenLogprob in `entries` (None
        for an echoed prompt's first token, which has nothing before it), and where its text starts."""
        tokens = [self.token_text(t) for t in ids]
        offsets = [0]
        for piece in tokens[:-1]:
            offsets.append(offsets[-1] + len(piece))
        return {"tokens": tokens, "token_logprobs": [e.logprob if e is not None else None for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} if e is not None else None
                                 for e in entries],
                "text_offset": offsets[:len(tokens)]}

    def chat_logprobs(self, entries: list) -> dict:
        """OpenAI's chat logprobs object: each generated token, its log-prob, bytes and the most likely ones."""
        def item(token: int, logprob: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def _too_long(self, prompt_tokens: int | None, settings: GenerationSettings) -> ApiError:
        context = self.generator.context_length
        asked = (f"However, you requested {prompt_tokens + settings.max_new_tokens} tokens ({prompt_tokens} in the "
                 f"prompt, {settings.max_new_tokens} for the completion)." if prompt_tokens is not None else
                 "However, your prompt alone is longer than that (refused before tokenizing).")
        return ApiError(400, f"This model's maximum context length is {context} tokens. {asked}",
                        code="context_length_exceeded", param="messages")

    def _check_length_before_tokenizing(self, characters: int, settings: GenerationSettings) -> None:
        """A text of more characters than the context holds tokens of the longest token surely does not fit:
        refused before the tokenizer spends seconds and gigabytes on it (a 50 MB message took 62 s, +4 GB)."""
        if characters > self.generator.context_length * longest_token(self.generator.tokenizer):
            raise self._too_long(None, settings)

    def chat_job(self, body: dict) -> tuple[Job, list | None]:
        settings = self._settings(body)
        if body.get("echo"):
            raise ApiError(400, "'echo' is a /v1/completions parameter", param="echo")
        if not isinstance(body.get("logprobs", False), (bool, type(None))):
            raise ApiError(400, f"'logprobs' must be true or false, got {body['logprobs']!r}", param="logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if top is not None and not body.get("logprobs"):
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        messages = parse_messages(body.get("messages"), vision=self.generator.vision is not None)
        tools = body.get("tools") if body.get("tool_choice") != "none" else None
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise ApiError(400, "'tools' must be a list of tool objects", param="tools")
        self._check_length_before_tokenizing(sum(len(m["content"]) for m in messages) +
                                             len(json.dumps(tools or [], ensure_ascii=False)), settings)
        try:
            pixel_values = self.generator.pixel_values(messages)
        except TunerError as e:
            raise ApiError(400, str(e), param="messages") from None
        job = self._job(self.generator.prompt_ids(messages, tools or None), settings, pixel_values,
                        logprobs=(top or 0) if body.get("logprobs") else None)
        return job, tools

    def _prompts(self, raw) -> list[tuple[str | None, list[int] | None]]:
        """OpenAI's prompt forms -> [(the text, None) or (None, token ids)]: a string, a list of strings, a list
        of token ids, or a list of such lists."""
        vocabulary = len(self.generator.tokenizer)

        def ids_of(x) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(raw, str) or ids_of(raw):
            raw = [raw]
        if not isinstance(raw, list) or not raw or not all(isinstance(p, str) or ids_of(p) for p in raw):
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "such lists", param="prompt")
        if len(raw) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request, got {len(raw)}", param="prompt")
        prompts = []
        for p in raw:
            if isinstance(p, str):
                if not p:
                    raise ApiError(400, "the prompt is empty", param="prompt")
                prompts.append((p, None))
                continue
            bad = next((t for t in p if not 0 <= t < vocabulary), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is not in the model's vocabulary (0-{vocabulary - 1})",
                               param="prompt")
            prompts.append((None, list(p)))
        return prompts

    def completion_jobs(self, body: dict) -> list[dict]:
        """One entry per prompt: its ids and text, the job scoring its tokens (echo with logprobs) and the job
        generating its completion (none with max_tokens 0), both submitted."""
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, f"'echo' must be true or false, got {echo!r}", param="echo")
        settings = self._settings(body, least_tokens=0 if echo else 1)
        top = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if body.get("top_logprobs") is not None:
            raise ApiError(400, "'top_logprobs' is a /v1/chat/completions parameter; here 'logprobs' is the "
                                "number of most likely tokens", param="top_logprobs")
        prompts = self._prompts(body.get("prompt"))
        if body.get("stream") and len(prompts) > 1:
            raise ApiError(400, "'stream' with a list of prompts is not supported by this server", param="stream")
        work = []
        for text, ids in prompts:
            if ids is None:
                self._check_length_before_tokenizing(len(text), settings)
                ids = self.generator.tokenizer(text)["input_ids"]
            work.append({"ids": ids, "text": text})
        for entry in work:  # (every prompt checked before any job starts)
            if len(entry["ids"]) > self.generator.context_length - settings.max_new_tokens:
                raise self._too_long(len(entry["ids"]), settings)
        for entry in work:
            entry["score"] = self.engine.submit(Job(entry["ids"], settings, score=top)) if echo and top is not None \
                else None
            entry["job"] = self._job(entry["ids"], settings, logprobs=top) if settings.max_new_tokens else None
        return work

    def usage(self, reply) -> dict:
        return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def check_bearer(api_key: str | None, header: str | None) -> None:
    """With a key set, the Authorization header must be 'Bearer KEY' (tuner serve, web and board)."""
    # constant time: how long the comparison takes says nothing about how much of the key was right
    if api_key and not hmac.compare_digest((header or "").encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                       code="invalid_api_key")


def _chunk(kind: str, request_id: str, model: str, choice: dict) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tuner"
    timeout = IDLE_SECONDS  # socket timeout: a stalled or idle connection is closed, not held by a thread
    api: Api
    page: bool
    max_body_bytes: int = MAX_BODY_BYTES
    streaming: bool = False

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # one line per request would drown the console

    # -- plumbing --------------------------------------------------------------------------
    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_bytes(self, data: bytes, kind: str, cache_control: str | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if cache_control:
            self.send_header("Cache-Control", cache_control)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        self._send_json(error.status, error.body())

    @staticmethod
    def _parse_body(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # a lone surrogate ('\\ud800') cannot be text
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from None
        except UnicodeEncodeError:
            raise ApiError(400, "the JSON body holds a lone surrogate (\\ud800-\\udfff): not valid text") from None
        except RecursionError:
            raise ApiError(400, "the JSON body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        return body

    def _body_length(self) -> int:
        """Content-Length, checked before anything is read or reserved (never trusted for memory)."""
        header = self.headers.get("Content-Length")
        if header is None:
            if self.headers.get("Transfer-Encoding"):
                raise ApiError(411, "send the body with a Content-Length (chunked bodies are not accepted)")
            return 0
        if not (header.strip().isascii() and header.strip().isdigit()):  # ('³'.isdigit() is True)
            raise ApiError(400, f"Content-Length must be a number of bytes, got {header!r}")
        length = int(header)
        if length > self.max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes; this server takes at most "
                                f"{self.max_body_bytes} (tuner serve --max-body-mb)", code="request_too_large")
        return length

    def _json_body(self, admit) -> dict:
        """The request's JSON body, once the origin and `admit()` (route, key...) have let it in. Everything
        that can refuse the request does so before the body is read: an unread body spoils the connection,
        so it is closed after the answer."""
        try:
            self._check_origin()
            admit()
            length = self._body_length()
        except ApiError:
            self.close_connection = self.body_unread = True
            raise
        raw = self.rfile.read(length)
        self.server.clear_deadline(self.connection)  # (what the route does may take long: not the client's time)
        if len(raw) < length:
            self.close_connection = True
            raise ApiError(400, f"the body ended after {len(raw)} of {length} bytes")
        return self._parse_body(raw)

    def _check_origin(self) -> None:
        """Refuse what a web page the user visits could send to this loopback server: a request from another
        origin (Origin header), or a Host that is not this server's name (DNS rebinding)."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host and not _allowed_host(host, self.server.server_address):
            raise ApiError(403, f"Host {host!r} is not this server's address", code="forbidden_host")
        origin = self.headers.get("Origin")
        if origin and urlsplit(origin).netloc.lower() != host:  # 'null' too: sandboxed frames, file: pages
            raise ApiError(403, f"cross-origin requests are refused (Origin {origin})", code="forbidden_origin")

    def _client_gone(self) -> bool:
        """True once the client has closed its end (readable with no bytes)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _start_stream(self) -> None:
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, data) -> None:
        text = "data: " + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"
        payload = text.encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _end_stream(self) -> None:
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    body_unread = False

    def finish(self):
        """After an answer sent without reading the body (401, 413...), read and drop what the client still
        sends for a moment before closing (Apache's lingering close): closing with unread bytes resets the
        connection, and the client, still writing its body, would see a broken pipe instead of the answer."""
        super().finish()
        if not self.body_unread:
            return
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
            while time.monotonic() < deadline and dropped < LINGER_BYTES:
                self.connection.settimeout(max(deadline - time.monotonic(), 0.01))
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    def handle_one_request(self):
        # From the first byte awaited: the request line, headers and body must all arrive within the
        # server's deadline (a client trickling a byte every few seconds never trips the idle timeout).
        self.server.set_deadline(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.clear_deadline(self.connection)

    # -- routes ----------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802 - the base class's name
        self.server.clear_deadline(self.connection)
        try:
            if self.path in ("/", "/index.html") and self.page:
                self._send_bytes(resources.files("tuner.serve").joinpath("page.html").read_bytes(),
                                 "text/html; charset=utf-8")
            elif self.path == "/health":
                self._send_json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self.api.check_key(self.headers.get("Authorization"))
                self._send_json(200, self.api.models())
            else:
                raise ApiError(404, f"no route GET {self.path}", code="not_found")
        except ApiError as e:
            self._send_error(e)

    def do_POST(self):  # noqa: N802
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completion}
        self.streaming = False
        try:
            def admit():
                if self.path not in routes:
                    raise ApiError(404, f"no route POST {self.path}", code="not_found")
                self.api.check_key(self.headers.get("Authorization"))

            body = self._json_body(admit)  # (before the route is looked up: an unknown one is refused in admit)
            routes[self.path](body)
        except ApiError as e:
            self._fail(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away (its job was cancelled) or stalled
        except Exception as e:  # noqa: BLE001 - a bug must not take the server down
            self._fail(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    def _fail(self, error: ApiError) -> None:
        """An error as the client can read it: its own response, or, once an event stream has started,
        an error event that ends the stream (a second HTTP response inside it reads as a broken connection)."""
        try:
            if self.streaming:
                self._event(error.body())
                self._end_stream()
                self.close_connection = True
            else:
                self._send_error(error)
        except OSError:
            self.close_connection = True

    def _chat(self, body: dict) -> None:
        job, tools = self.api.chat_job(body)
        request_id, model = f"chatcmpl-{uuid.uuid4().hex}", self.api.model_name
        if not body.get("stream"):
            reply = self._wait(job)
            content, calls = parse_tool_calls(reply.text) if tools else (reply.text, [])
            message = {"role": "assistant", "content": content or (None if calls else "")}
            if calls:
                message["tool_calls"] = calls
            finish = "tool_calls" if calls else reply.finish_reason
            logprobs = self.api.chat_logprobs(reply.logprobs) if reply.logprobs is not None else None
            self._send_json(200, {**_chunk("chat.completion", request_id, model, {
                "index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}),
                "usage": self.api.usage(reply)})
            return
        self._start_stream()
        emit = lambda choice: self._event(_chunk("chat.completion.chunk", request_id, model, choice))  # noqa: E731
        try:
            emit({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            pieces, text, streamed = job.texts_then_reply(), "", 0
            while True:
                try:
                    text += next(pieces)
                except StopIteration as stop:
                    reply = stop.value
                    break
                # With tools, hold back a (possibly half-written) tool call; it is sent whole at the end.
                starts = [text.find(w) for w in TOOL_CALL_STARTS if w in text] if tools else []
                visible = text[:min(starts)] if starts else (
                    text[:len(text) - partial_suffix(text, TOOL_CALL_STARTS)] if tools else text)
                if tools:  # whitespace before a tool call is not content; a reply that opens with '{' may be
                    visible = "" if visible.lstrip().startswith("{") else visible.rstrip()  # Llama 3.1's call
                if len(visible) > streamed:
                    emit({"index": 0, "delta": {"content": visible[streamed:]}, "finish_reason": None})
                    streamed = len(visible)
            finish = reply.finish_reason
            content, calls = parse_tool_calls(reply.text) if tools else (reply.text, [])
            if calls:
                emit({"index": 0, "delta": {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]},
                      "finish_reason": None})
                finish = "tool_calls"
            elif len(content) > streamed:
                emit({"index": 0, "delta": {"content": content[streamed:]}, "finish_reason": None})
            if reply.logprobs is not None:  # (every generated token's, in one chunk before the last)
                emit({"index": 0, "delta": {}, "logprobs": self.api.chat_logprobs(reply.logprobs),
                      "finish_reason": None})
            final = _chunk("chat.completion.chunk", request_id, model,
                           {"index": 0, "delta": {}, "finish_reason": finish})
            if (body.get("stream_options") or {}).get("include_usage"):
                final["usage"] = self.api.usage(reply)
            self._event(final)
            self._end_stream()
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()
            raise

    def _wait(self, job: Job):
        """The job's reply; if the client disconnects while it waits, the job is cancelled (its rows stop
        generating) and the wait ends."""
        return job.wait(gone=self._client_gone)

    def _completion(self, body: dict) -> None:
        work = self.api.completion_jobs(body)
        request_id, model = f"cmpl-{uuid.uuid4().hex}", self.api.model_name
        if not body.get("stream"):
            choices, prompt_tokens, completion_tokens = [], 0, 0
            try:
                for index, entry in enumerate(work):
                    choices.append(self._completion_choice(index, entry, body))
                    prompt_tokens += len(entry["ids"])
                    completion_tokens += choices[-1].pop("completion_tokens")
            except BaseException:
                for entry in work:  # (the client left or a prompt failed: the others stop too)
                    for job in (entry["score"], entry["job"]):
                        if job is not None:
                            job.cancelled.set()
                raise
            self._send_json(200, {"id": request_id, "object": "text_completion", "created": int(time.time()),
                                  "model": model, "choices": choices,
                                  "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                            "total_tokens": prompt_tokens + completion_tokens}})
            return
        job = work[0]["job"]
        self._start_stream()
        try:
            pieces = job.texts_then_reply()
            while True:
                try:
                    piece = next(pieces)
                except StopIteration as stop:
                    reply = stop.value
                    break
                self._event(_chunk("text_completion", request_id, model,
                                   {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}))
            if reply.logprobs is not None:  # (every generated token's, in one chunk before the last)
                self._event(_chunk("text_completion", request_id, model, {
                    "index": 0, "text": "", "finish_reason": None,
                    "logprobs": self.api.legacy_logprobs(reply.ids, reply.logprobs)}))
            self._event(_chunk("text_completion", request_id, model,
                               {"index": 0, "text": "", "finish_reason": reply.finish_reason, "logprobs": None}))
            self._end_stream()
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()
            raise


    def _completion_choice(self, index: int, entry: dict, body: dict) -> dict:
        """One prompt's choice: the completion (after the echoed prompt when asked) and its log-probs."""
        ids, echo, top = entry["ids"], body.get("echo", False), body.get("logprobs")
        reply = self._wait(entry["job"]) if entry["job"] is not None else None
        text = reply.text if reply is not None else ""
        if echo:
            prompt_text = entry["text"] if entry["text"] is not None else self.api.generator.tokenizer.decode(ids)
            text = prompt_text + text
        logprobs = None
        if top is not None:
            shown, entries = [], []
            if echo:
                shown, entries = list(ids), self._wait(entry["score"])
            if reply is not None:
                shown += reply.ids
                entries += reply.logprobs
            logprobs = self.api.legacy_logprobs(shown, entries)
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": reply.finish_reason if reply is not None else "length",
                "completion_tokens": reply.completion_tokens if reply is not None else 0}


def _allowed_host(host: str, address) -> bool:
    """The Host header names this server: a loopback name, or the address it listens on, with its port."""
    name, _, port = host.rpartition(":") if host.rsplit(":", 1)[-1].isdigit() else (host, "", "")
    name = name.strip("[]")
    if port and int(port) != address[1]:
        return False
    bound = str(address[0])
    if bound in ("0.0.0.0", "::"):  # every interface: any name that reaches it (a key protects it)
        return True
    return name in ("localhost", "127.0.0.1", "::1", bound)


_BUSY_BODY = json.dumps({"error": {"message": "the server is serving as many connections as it takes; retry",
                                    "type": "server_error", "param": None, "code": "busy"}}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Retry-After: 1\r\nContent-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class Server(ThreadingHTTPServer):
    """One worker thread per connection, at most `max_connections` of them (more are answered 503 and
    closed); a watchdog closes a connection whose request has not fully arrived by its deadline."""
    daemon_threads = True
    request_queue_size = BACKLOG
    max_connections = MAX_CONNECTIONS
    request_seconds = REQUEST_SECONDS

    def server_activate(self):
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._deadlines: dict = {}
        self._deadlines_lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._watch_deadlines, daemon=True, name="tuner-deadlines").start()

    def server_close(self):
        self._closed.set()  # (the watchdog ends with the server)
        super().server_close()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def set_deadline(self, connection) -> None:
        with self._deadlines_lock:
            self._deadlines[connection] = time.monotonic() + self.request_seconds

    def clear_deadline(self, connection) -> None:
        with self._deadlines_lock:
            self._deadlines.pop(connection, None)

    def _watch_deadlines(self) -> None:
        while not self._closed.wait(min(0.5, self.request_seconds / 4)):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [c for c, deadline in self._deadlines.items() if deadline < now]
                for connection in late:
                    del self._deadlines[connection]
            for connection in late:  # its reader wakes with end-of-file and the connection is closed
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request, client_address):
        """A client that disconnects or stalls is normal: no traceback in the log (one line for anything else)."""
        import sys

        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, OSError)):
            return
        print(f"[tuner] request from {client_address[0]} failed: {type(error).__name__}: {error}", file=sys.stderr)


def make_server(api: Api, host: str, port: int, page: bool, max_body_bytes: int = MAX_BODY_BYTES,
                idle_seconds: float = IDLE_SECONDS, request_seconds: float = REQUEST_SECONDS,
                max_connections: int = MAX_CONNECTIONS) -> Server:
    handler = type("TunerHandler", (Handler,), {"api": api, "page": page, "max_body_bytes": max_body_bytes,
                                                "timeout": idle_seconds})
    server_class = type("TunerServer", (Server,), {"request_seconds": request_seconds,
                                                   "max_connections": max_connections})
    return server_class((host, port), handler)


def serve_forever(server: ThreadingHTTPServer) -> None:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        server.shutdown()
