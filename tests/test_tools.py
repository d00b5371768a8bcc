"""The chat plugins: safe arithmetic, equations, web search, and parsing the model's calls."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tuner.chat.tools import Toolbox, ToolError, calculate, parse_tool_calls, react_system, search, solve
from tuner.errors import TunerError


@pytest.mark.parametrize("expression, value", [
    ("12*7", "84"), ("(3 + 4) * 2", "14"), ("2^10", "1024"), ("7 / 2", "3.5"), ("-3 ** 2", "-9"),
    ("sqrt(16) + pi - pi", "4"), ("factorial(5)", "120"), ("10 % 4", "2"), ("1/3", "0.3333333333")])
def test_calculate(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('echo hacked')", "().__class__.__bases__", "open('/etc/passwd')", "x + 1",
    "9**9**9", "[1, 2]", "lambda: 1", "1/0", "sqrt(-1)", "True + 1"])
def test_calculate_refuses_anything_but_arithmetic(expression):
    with pytest.raises(ToolError):
        calculate(expression)


def test_solve():
    assert solve("x**2 - 4 = 0") == "x = -2; x = 2"
    assert solve("x + y = 3; x - y = 1") == "x = 2, y = 1"
    assert solve("2*x + 1") == "x = -1/2"
    assert solve("x = x + 1") == "no solution"
    with pytest.raises(ToolError):
        solve("__import__('os') = 1")
    with pytest.raises(ToolError):
        solve("x.real = 1")


class _SearchApi(BaseHTTPRequestHandler):
    """A stand-in for serper.dev on loopback: checks the key, answers in its JSON shape."""
    seen: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.headers["X-API-KEY"], body))
        status, answer = (200, {"organic": [
            {"title": "Paris - Wikipedia", "snippet": "Paris is the capital of France.", "link": "https://w.org/P"},
            {"title": "France", "snippet": "A country in Europe.", "link": "https://w.org/F"}]}) \
            if self.headers["X-API-KEY"] == "good-key" else (403, {"message": "bad key"})
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_search_calls_the_configured_api_with_the_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(ToolError, match="set SERPER_API_KEY"):
        search("capital of France")
    server = HTTPServer(("127.0.0.1", 0), _SearchApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TUNER_SEARCH_URL", f"http://127.0.0.1:{server.server_port}/search")
        monkeypatch.setenv("SERPER_API_KEY", "good-key")
        result = search("capital of France")
        assert result.splitlines() == ["Paris - Wikipedia: Paris is the capital of France. (https://w.org/P)",
                                       "France: A country in Europe. (https://w.org/F)"]
        assert _SearchApi.seen[-1] == ("good-key", {"q": "capital of France"})
        monkeypatch.setenv("SERPER_API_KEY", "wrong-key")
        with pytest.raises(ToolError, match="answered HTTP 403"):
            search("capital of France")
    finally:
        server.shutdown()
    monkeypatch.setenv("TUNER_SEARCH_URL", "http://127.0.0.1:9/closed")
    with pytest.raises(ToolError, match="failed"):
        search("anything")


def test_parse_json_and_react_tool_calls():
    content, calls = parse_tool_calls('Let me compute.\n<tool_call>\n{"name": "calculate", "arguments": '
                                      '{"expression": "2+2"}}\n</tool_call>')
    assert content == "Let me compute."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", "calculate", {"expression": "2+2"})]
    content, calls = parse_tool_calls("Thought: I need a calculator.\nAction: calculate\n"
                                      'Action Input: {"expression": "3*3"}')
    assert content == "Thought: I need a calculator." and calls[0]["function"]["name"] == "calculate"
    assert json.loads(calls[0]["function"]["arguments"]) == {"expression": "3*3"}
    assert parse_tool_calls("Just an answer.") == ("Just an answer.", [])
    text = '<tool_call>\n{"name": "calculate", "arguments": {"expr'  # cut off by max_new_tokens
    assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("name", ["qwen2_5_chat", "qwen3_chat", "llama3_1_chat", "mistral_v3", "mistral_v7",
                                  "mistral_tekken", "deepseek_v3"])
def test_the_calls_a_template_trains_are_read_back(name):
    """What a model trained with each tool format writes (the trained reply, as generated) is parsed back into
    the same calls by `tuner chat` and `tuner serve`: Hermes blocks, Llama 3.1's JSON, [TOOL_CALLS], DeepSeek's."""
    from tuner.data.templates import get_template

    calls = [{"id": "abcDEF123", "type": "function",
              "function": {"name": "calculate", "arguments": {"expression": "2+2"}}},
             {"id": "ghiJKL456", "type": "function", "function": {"name": "solve", "arguments": '{"equation": "x=1"}'}}]
    if name == "llama3_1_chat":
        calls = calls[:1]  # Llama 3.1 calls one tool per reply
    template = get_template(name)
    rendered = template.render([{"role": "user", "content": "Go"},
                                {"role": "assistant", "content": "", "tool_calls": calls}])
    a, b = rendered.spans[0]
    reply = rendered.text[a:b].removesuffix(template.suffix)
    content, parsed = parse_tool_calls(reply)
    assert content == ("<think>\n\n</think>" if template.think else "")  # Qwen3's (empty) reasoning stays
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == \
        [("calculate", {"expression": "2+2"}), ("solve", {"equation": "x=1"})][:len(calls)]
    if name.startswith("mistral"):  # Mistral's calls carry their ids, which the results must name
        assert [c["id"] for c in parsed] == ["abcDEF123", "ghiJKL456"]


def test_toolbox_runs_calls_and_reports_errors_to_the_model():
    box = Toolbox(["calculate", "solve"])
    call = lambda name, args: {"function": {"name": name, "arguments": args}}  # noqa: E731
    assert box.run(call("calculate", '{"expression": "6*7"}')) == "42"
    assert box.run(call("calculate", "6*7")) == "42"  # a bare string (ReAct) is the single argument
    assert box.run(call("solve", {"equations": "x - 1 = 0"})) == "x = 1"
    assert box.run(call("search", {"query": "x"})).startswith("error: no tool named 'search'")
    assert box.run(call("calculate", {"expr": "1"})) == "error: calculate needs a string argument 'expression'"
    assert box.run(call("calculate", {"expression": "1/0"})).startswith("error: cannot evaluate")
    with pytest.raises(TunerError, match="unknown plugin"):
        Toolbox(["weather"])
    assert "Action Input" in react_system("Be brief.", box.specs) and "solve" in react_system("", box.specs)


def test_tool_calls_run_bounded_and_every_failure_is_a_result(monkeypatch):
    """Inputs that ended `tuner chat` with a traceback (ValueError, NotImplementedError, RecursionError) or
    hung it for minutes: each call runs in a worker process with time and memory limits, and comes back
    as text for the model, within the limit."""
    import time

    monkeypatch.setenv("TUNER_TOOL_SECONDS", "3")
    box = Toolbox(["calculate", "solve"])
    call = lambda name, args: {"function": {"name": name, "arguments": args}}  # noqa: E731
    cases = [("calculate", "10**5000", "1.0000000000e+5000"), ("calculate", "factorial(3000)", "4.1493596034e+9130"),
             ("calculate", "(9**9999)**9999", "error: the result is too large"),
             ("calculate", "factorial(10**9)", "error: factorial(1000000000) is too large"),
             ("solve", "sin(x) = x", "error: NotImplementedError"),
             ("solve", "x**10000 = 1", "error: solve ran longer than 3 s and was stopped"),
             ("solve", ";".join(f"x{i} = x{i + 1} + 1" for i in range(2000)), "error: "),
             ("solve", "x/0 = 1", "error: 'x/0' is undefined"), ("solve", "2*x = 6", "x = 3")]
    for name, argument, expected in cases:
        started = time.perf_counter()
        result = box.run(call(name, {"equations" if name == "solve" else "expression": argument}))
        assert result.startswith(expected), (argument[:40], result)
        assert time.perf_counter() - started < 8, argument[:40]
