"""Tools the model can call in `tuner chat --with-plugins`, and the parsing of its calls.

Calls come in the format the model was trained on (tuner's data engine renders tool
calls Hermes-style for every template):

    I will compute it.
    <tool_call>
    {"name": "calculate", "arguments": {"expression": "12*7"}}
    </tool_call>

or, with `--tool-format react`, as ReAct text:

    Thought: I need the calculator.
    Action: calculate
    Action Input: {"expression": "12*7"}

Nothing the model writes is passed to `eval`: expressions are parsed with `ast` and only
numbers, names of known functions and arithmetic operators are evaluated.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import re
import urllib.error
import urllib.request
import uuid

from tuner.errors import TunerError

TOOL_SPECS = {
    "calculate": {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression, e.g. '(3 + 4) * sqrt(2)'.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    "solve": {"type": "function", "function": {
        "name": "solve", "description": "Solve one equation or a system of equations, e.g. 'x**2 - 4 = 0' or "
                                        "'x + y = 3; x - y = 1'.",
        "parameters": {"type": "object", "properties": {"equations": {"type": "string"}},
                       "required": ["equations"]}}},
    "search": {"type": "function", "function": {
        "name": "search", "description": "Search the web; returns the top results as title, snippet and link.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
}

SEARCH_URL_ENV, SEARCH_KEY_ENV = "TUNER_SEARCH_URL", "SERPER_API_KEY"
DEFAULT_SEARCH_URL = "https://google.serper.dev/search"

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
def _factorial(n):
    if isinstance(n, int) and n > 5_000:
        raise ToolError(f"factorial({n}) is too large")
    return math.factorial(n)


_NUMERIC = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
            "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
            "atan": math.atan, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil,
            "factorial": _factorial, "pi": math.pi, "e": math.e}
_MAX_EXPONENT = 10_000  # 9**9**9 would hang the process
_MAX_BITS = 100_000  # an integer result larger than this (about 30,000 digits) is refused before it is computed


def _scientific(value: int) -> str:
    """A huge integer as '4.0238726008e+2567' (Python refuses str() beyond 4,300 digits)."""
    shift = value.bit_length() - 60
    exponent10 = math.log10(abs(value) >> shift) + shift * math.log10(2)
    whole = math.floor(exponent10)
    return f"{'-' if value < 0 else ''}{10 ** (exponent10 - whole):.10f}e+{whole}"


class ToolError(Exception):
    """A tool could not run; the message goes back to the model as the tool's result."""


def _walk(node, name, number, call, power):
    """Evaluate an arithmetic AST with callbacks for names, numbers, calls and powers."""
    if isinstance(node, ast.Expression):
        return _walk(node.body, name, number, call, power)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return number(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left = _walk(node.left, name, number, call, power)
        right = _walk(node.right, name, number, call, power)
        if isinstance(node.op, ast.Pow):
            return power(left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand, name, number, call, power))
    if isinstance(node, ast.Name):
        return name(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        return call(node.func.id, [_walk(a, name, number, call, power) for a in node.args])
    raise ToolError(f"unsupported syntax: {ast.unparse(node) if hasattr(ast, 'unparse') else node!r}")


def _parse(expression: str) -> ast.Expression:
    text = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    if len(text) > 500:
        raise ToolError("expression too long (over 500 characters)")
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None


def calculate(expression: str) -> str:
    """'(3 + 4) * 2' -> '14'; names are limited to math functions and constants."""
    def name(n):
        if n in _NUMERIC and not callable(_NUMERIC[n]):
            return _NUMERIC[n]
        raise ToolError(f"unknown name {n!r}")

    def call(n, args):
        if n not in _NUMERIC or not callable(_NUMERIC[n]):
            raise ToolError(f"unknown function {n!r}")
        return _NUMERIC[n](*args)

    def power(base, exponent):
        if abs(exponent) > _MAX_EXPONENT:
            raise ToolError("exponent too large")
        if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and \
                base.bit_length() * exponent > _MAX_BITS:  # (9**9999)**9999: the exponent alone looks small
            raise ToolError("the result is too large")
        return base ** exponent

    try:
        value = _walk(_parse(expression), name, lambda v: v, call, power)
        if isinstance(value, int) and value.bit_length() > _MAX_BITS:
            raise ToolError("the result is too large")
        if isinstance(value, int) and value.bit_length() > 1000:  # 300+ digits: what the model can use
            return _scientific(value)
    except (ZeroDivisionError, ValueError, OverflowError, TypeError) as e:
        raise ToolError(f"cannot evaluate {expression!r}: {e}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(round(value, 10) if isinstance(value, float) else value)


def solve(equations: str) -> str:
    """'x**2 - 4 = 0' -> 'x = -2; x = 2'; several equations separated by ';' or newlines."""
    import sympy

    functions = {n: getattr(sympy, n) for n in ("sqrt", "exp", "log", "sin", "cos", "tan", "Abs")}
    functions["abs"] = sympy.Abs
    constants = {"pi": sympy.pi, "e": sympy.E}

    def name(n):
        return constants.get(n) or sympy.Symbol(n)

    def call(n, args):
        if n not in functions:
            raise ToolError(f"unknown function {n!r}")
        return functions[n](*args)

    def power(base, exponent):
        if exponent.is_number and abs(exponent) > _MAX_EXPONENT:
            raise ToolError("exponent too large")
        return base ** exponent

    def expression(text):
        value = _walk(_parse(text), name, lambda v: sympy.nsimplify(v), call, power)
        if value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):  # x/0 is zoo*x, which sympy 'solves' as x = 0
            raise ToolError(f"{text.strip()!r} is undefined (a division by zero?)")
        return value

    system = []
    for part in filter(None, (p.strip() for p in re.split(r"[;\n]", equations))):
        sides = part.replace("==", "=").split("=")
        if len(sides) > 2:
            raise ToolError(f"more than one '=' in {part!r}")
        left = expression(sides[0])
        system.append(sympy.Eq(left, expression(sides[1])) if len(sides) == 2 else sympy.Eq(left, 0))
    if not system:
        raise ToolError("no equation given")
    solutions = sympy.solve(system, dict=True)
    if not solutions:
        return "no solution"
    return "; ".join(", ".join(f"{k} = {v}" for k, v in sorted(s.items(), key=lambda kv: str(kv[0])))
                     for s in solutions)


def search(query: str, results: int = 3) -> str:
    """Top results from a Serper-compatible search API: POST {"q": query}, header X-API-KEY."""
    key = os.environ.get(SEARCH_KEY_ENV)
    if not key:
        raise ToolError(f"search is not configured: set {SEARCH_KEY_ENV} (a serper.dev key) and, for another "
                        f"Serper-compatible service, {SEARCH_URL_ENV}")
    url = os.environ.get(SEARCH_URL_ENV, DEFAULT_SEARCH_URL)
    request = urllib.request.Request(url, data=json.dumps({"q": query}).encode(), method="POST",
                                     headers={"X-API-KEY": key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise ToolError(f"search API {url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
        raise ToolError(f"search API {url} failed: {e}") from None
    lines = []
    if isinstance(body.get("answerBox"), dict) and body["answerBox"].get("answer"):
        lines.append(f"Answer: {body['answerBox']['answer']}")
    for item in (body.get("organic") or [])[:results]:
        lines.append(f"{item.get('title', '')}: {item.get('snippet', '')} ({item.get('link', '')})")
    return "\n".join(lines) or "no results"


RUNNERS = {"calculate": ("expression", calculate), "solve": ("equations", solve), "search": ("query", search)}


class Toolbox:
    """The plugins chosen with --with-plugins: their specs for the prompt, and running a call."""

    def __init__(self, names: list[str]):
        unknown = [n for n in names if n not in RUNNERS]
        if unknown:
            raise TunerError(f"unknown plugin(s) {', '.join(unknown)}; known: {', '.join(RUNNERS)}")
        self.names = list(dict.fromkeys(names))
        self.specs = [TOOL_SPECS[n] for n in self.names]

    def run(self, call: dict) -> str:
        """A tool call ({"function": {"name", "arguments"}}) -> the text that goes back to the model."""
        function = call["function"]
        if function["name"] not in self.names:
            return f"error: no tool named {function['name']!r}; available: {', '.join(self.names)}"
        argument, runner = RUNNERS[function["name"]]
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = {argument: arguments}
        value = arguments.get(argument) if isinstance(arguments, dict) else None
        if not isinstance(value, str):
            return f"error: {function['name']} needs a string argument {argument!r}"
        return run_bounded(function["name"], value)


TOOL_SECONDS = 10.0  # a call running longer is stopped ($TUNER_TOOL_SECONDS, read at each call)
TOOL_MEMORY = 2 << 30  # address space of the worker process


def run_bounded(name: str, value: str, seconds: float | None = None, memory: int = TOOL_MEMORY) -> str:
    """Run one call in a worker process (tuner.chat.tool_worker) with a time and a memory limit; any
    failure, a crash or the time running out is a result the model reads, never the end of the chat."""
    import subprocess
    import sys

    seconds = seconds if seconds is not None else float(os.environ.get("TUNER_TOOL_SECONDS", TOOL_SECONDS))
    request = json.dumps({"name": name, "value": value, "seconds": max(1, int(seconds)), "memory": memory})
    try:
        done = subprocess.run([sys.executable, "-m", "tuner.chat.tool_worker"], input=request, capture_output=True,
                              text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return f"error: {name} ran longer than {seconds:g} s and was stopped"
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        return f"error: {name} failed (the worker exited with {done.returncode}; out of memory or time?)"
    return answer["result"] if "result" in answer else f"error: {answer['error']}"


_JSON_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_REACT_CALL = re.compile(r"Action:\s*([\w.-]+)\s*\n\s*Action Input:\s*(.*?)\s*(?=\n\s*Observation:|$)", re.S)


# What starts a tool call in each format tuner trains: Hermes / Qwen, Mistral, DeepSeek V3
TOOL_CALL_STARTS = ("<tool_call>", "[TOOL_CALLS]", "<｜tool▁calls▁begin｜>")
_DEEPSEEK_CALL = re.compile(r"<｜tool▁call▁begin｜>(\w+)<｜tool▁sep｜>(.*?)\n```json\n(.*?)\n```<｜tool▁call▁end｜>", re.S)


def _call(name: str, arguments, call_id: str | None = None) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id if isinstance(call_id, str) and call_id else f"call_{uuid.uuid4().hex[:24]}",
            "type": "function", "function": {"name": name, "arguments": arguments}}


def _native_calls(text: str) -> tuple[str, list[dict]] | None:
    """Mistral's '[TOOL_CALLS] [{"name", "arguments", "id"}, ...]', DeepSeek V3's call tokens, and Llama 3.1's
    reply that is one JSON object {"name", "parameters"}; None when the text holds none of them."""
    if "[TOOL_CALLS]" in text:
        before, _, after = text.partition("[TOOL_CALLS]")
        try:
            listed, _ = json.JSONDecoder().raw_decode(after.strip())
        except json.JSONDecodeError:
            return None
        listed = listed if isinstance(listed, list) else [listed]
        calls = [_call(c["name"], c.get("arguments", {}), c.get("id")) for c in listed
                 if isinstance(c, dict) and isinstance(c.get("name"), str)]
        return (before.strip(), calls) if calls else None
    if "<｜tool▁calls▁begin｜>" in text:
        before = text.split("<｜tool▁calls▁begin｜>")[0]
        calls = [_call(name.strip(), arguments) for _, name, arguments in _DEEPSEEK_CALL.findall(text)]
        return (before.strip(), calls) if calls else None
    stripped = text.strip()
    if stripped.startswith("{") and '"parameters"' in stripped:
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError:
            return None
        if (isinstance(parsed, dict) and isinstance(parsed.get("name"), str) and
                isinstance(parsed.get("parameters"), dict)):
            return "", [_call(parsed["name"], parsed["parameters"])]
    return None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Model output -> (content without the calls, OpenAI-style tool calls). Reads the Hermes / Qwen
    <tool_call> blocks, Mistral's [TOOL_CALLS], DeepSeek V3's call tokens, Llama 3.1's JSON reply and ReAct."""
    native = _native_calls(text)
    if native is not None:
        return native
    calls = []
    for body in _JSON_CALL.findall(text):
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError:
            continue  # not a call the model finished; left in the content for the user to see
        if isinstance(parsed, dict) and isinstance(parsed.get("name"), str):
            calls.append(_call(parsed["name"], parsed.get("arguments", parsed.get("parameters", {}))))
    if calls:
        return _JSON_CALL.sub("", text).strip(), calls
    match = _REACT_CALL.search(text)
    if match:
        raw = match.group(2).strip()
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError:
            arguments = raw  # a bare string; Toolbox.run passes it as the single argument
        return text[:match.start()].strip(), [_call(match.group(1), arguments)]
    return text, []


def react_system(system: str, specs: list[dict]) -> str:
    """A system prompt that teaches the ReAct format for the given tools."""
    listed = "\n".join(f"{s['function']['name']}: {s['function']['description']} Arguments: "
                       f"{json.dumps(s['function']['parameters']['properties'])}" for s in specs)
    names = ", ".join(s["function"]["name"] for s in specs)
    return ((system + "\n\n" if system else "") + f"You can use these tools:\n{listed}\n\n"
            "To use a tool, answer exactly:\nThought: why you need it\nAction: the tool's name, one of "
            f"[{names}]\nAction Input: the arguments as JSON\n\nThe result comes back as 'Observation: ...'. "
            "When you know the answer, reply to the user without an Action.")


def react_observation(result: str) -> str:
    return f"Observation: {result}"
