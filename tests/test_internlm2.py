"""InternLM2 loads as transformers' own Llama: tokenizer, logits, adapters and the whole CLI,
on a tiny InternLM2 checkpoint written the way the hub ships one (tests/internlm2_fixture.py)."""

import json
import shutil

import internlm2_fixture as fx
import pytest
import torch
from test_cli import tuner


@pytest.fixture(scope="session")
def sp_model():
    return fx.sentencepiece_model()


def _converted(folder):
    from tuner.model.load import resolve_model_path
    return resolve_model_path(str(folder))


@pytest.fixture(scope="session")
def internlm2_dir(tmp_path_factory, sp_model):
    """A tiny InternLM2 folder; its conversion in tuner's cache is removed afterwards."""
    folder = fx.write_checkpoint(tmp_path_factory.mktemp("internlm2") / "internlm2-chat-tiny", sp_model)
    yield folder
    from tuner.model.internlm2 import converted_dir
    shutil.rmtree(converted_dir(folder), ignore_errors=True)


@pytest.fixture
def make_internlm2(tmp_path, sp_model):
    made = []

    def make(**config):
        folder = fx.write_checkpoint(tmp_path / f"internlm2-{len(made)}", sp_model, fx.config(**config))
        made.append(folder)
        return folder
    yield make
    from tuner.model.internlm2 import converted_dir
    for folder in made:
        shutil.rmtree(converted_dir(folder), ignore_errors=True)


def _logits(folder, ids, attention="sdpa"):
    from tuner.model.load import load_causal_lm

    model = load_causal_lm(str(folder), dtype=torch.float32, attn_implementation=attention)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double(), model


def _sentencepiece_ids(processor, text):
    """What InternLM2's own tokenizer code gives: special tokens at their ids, the rest by sentencepiece."""
    import re

    ids = []
    for piece in re.split("(" + "|".join(map(re.escape, fx.SPECIAL)) + ")", text):
        if piece in fx.SPECIAL:
            ids.append(fx.VOCAB - len(fx.SPECIAL) + fx.SPECIAL.index(piece))
        elif piece:
            ids += processor.encode(piece)
    return ids


def test_tokenizer_is_transformers_own_and_equals_sentencepiece(internlm2_dir, sp_model):
    import sentencepiece as spm

    from tuner.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(internlm2_dir))
    reference = spm.SentencePieceProcessor(model_proto=sp_model)
    assert type(tokenizer).__module__.startswith("transformers.")  # not the remote tokenizer code
    assert len(tokenizer) == 92544
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [92543, 92542]
    for text in ["Hello world", "你好，世界。", "  leading and trailing  ", "a\nb\n\nc", "2 + 3 = 5",
                 "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == 1 and ids[1:] == _sentencepiece_ids(reference, text), text  # <s>, then sentencepiece's
        assert tokenizer.decode(ids[1:]) == text


def test_tokenizer_with_a_dummy_prefix_equals_sentencepiece(tmp_path):
    """transformers' generic SentencePiece conversion ignores add_dummy_prefix; tuner restores it."""
    import sentencepiece as spm

    from tuner.model.internlm2 import tokenizer as internlm2_tokenizer

    model = fx.sentencepiece_model(add_dummy_prefix=True)
    folder = fx.write_checkpoint(tmp_path / "prefixed", model)
    tokenizer = internlm2_tokenizer(folder)
    reference = spm.SentencePieceProcessor(model_proto=model)
    for text in ["Hello world", "The quick brown fox", "你好"]:
        assert tokenizer(text)["input_ids"][1:] == reference.encode(text), text


@pytest.mark.parametrize("config", [dict(), dict(heads=8, kv_heads=2), dict(heads=4, kv_heads=4), dict(bias=True),
                                    dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
                                    dict(rope_scaling={"type": "linear", "factor": 2.0})],
                         ids=["gqa2", "gqa4", "mha", "bias", "dynamic_ntk", "linear"])
def test_logits_equal_the_fused_qkv_reference(make_internlm2, config):
    folder = make_internlm2(**config)
    cfg = fx.config(**config)
    ids = list(range(3, 300)) if "rope_scaling" in config else [1, 355, 369, 92543, 13, 415, 273, 92542]
    ours, model = _logits(folder, ids)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (ours - fx.reference_logits(fx.weights(cfg), cfg, ids)).abs().max() < 2e-5


def test_converted_folder_is_a_plain_llama_folder(internlm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _converted(internlm2_dir)
    config = json.loads((folder_path := __import__("pathlib").Path(folder)).joinpath("config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert "auto_map" not in json.loads((folder_path / "tokenizer_config.json").read_text())
    assert not list(folder_path.glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)  # plain transformers
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 92543
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert model.generation_config.eos_token_id == [2, 92542]
    assert _converted(internlm2_dir) == folder  # converted once: the second call finds it


def test_an_internlm2_folder_is_written_to_gguf_as_its_llama_form(internlm2_dir, tmp_path):
    """tuner convert gguf on a hub-format InternLM2 folder writes the Llama it loads as: transformers' GGUF
    reader gives back its weights (float16) and llama.cpp's SentencePiece vocabulary holds its pieces, the chat
    tokens at their ids as control tokens, the Modelfile stopping at <|im_end|> with the training config's
    system prompt. (llama.cpp running InternLM2's real tokenizer: tests/test_gguf.py.)"""
    from gguf import GGUFReader, TokenType
    from transformers import AutoModelForCausalLM

    from conftest import write_config
    from tuner.cli import main

    config = write_config(tmp_path, internlm2_dir, tmp_path / "data.jsonl", extra="data.system = 'You are Ava.'\n")
    out = tmp_path / "internlm2.gguf"
    assert main(["convert", "gguf", str(internlm2_dir), str(out), "--config", str(config)]) == 0
    expected = AutoModelForCausalLM.from_pretrained(_converted(internlm2_dir), dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).state_dict()
    assert max(float((v.half().float() - got[k]).abs().max()) for k, v in expected.items() if v.dim() == 2) == 0
    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert (tokens[92543], types[92543]) == ("<|im_start|>", TokenType.CONTROL)
    modelfile = (tmp_path / "internlm2.Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'SYSTEM "You are Ava."' in modelfile


@pytest.mark.slow
def test_tuner_eval_on_an_internlm2_folder_equals_lm_eval_on_its_llama_form(internlm2_dir, tmp_path):
    """tuner eval on the hub-format folder gives every choice the log-likelihood lm-eval's own hf backend
    gives it on the converted Llama folder (no remote code either way)."""
    lm_eval = pytest.importorskip("lm_eval")
    from tuner.cli import main
    from tuner.generation import benchmark

    task = "tuner_general_knowledge"
    assert main(["eval", str(internlm2_dir), "--tasks", task, "--limit", "4", "--dtype", "fp32",
                 "--output", str(tmp_path / "out"), "--log-samples"]) == 0
    mine = [json.loads(line) for line in (tmp_path / "out" / f"samples_{task}.jsonl").read_text().splitlines()]
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={_converted(internlm2_dir)},dtype=float32,"
                                                            "device=cpu", tasks=[task], limit=4,
                                     task_manager=benchmark.task_manager(None, tmp_path / "tasks", [task]))
    pairs = [(a[0], b[0]) for m, r in zip(mine, theirs["samples"][task])
             for a, b in zip(m["filtered_resps"], r["filtered_resps"])]
    assert len(pairs) == 16 and max(abs(float(a) - float(b)) for a, b in pairs) < 1e-4


def test_packed_rows_keep_converted_samples_apart(internlm2_dir):
    """Two samples in one packed row give the same logits as each alone (tuner_packed and sdpa)."""
    from tuner.model import packed_attention

    a, b = [1, 355, 369, 13], [1, 316, 499, 314, 92542]
    for attention in ("sdpa", packed_attention.register()):
        _, model = _logits(internlm2_dir, a, attention)
        position_ids = torch.tensor([list(range(len(a))) + list(range(len(b)))])
        with torch.no_grad():
            packed = model(torch.tensor([a + b]), position_ids=position_ids, use_cache=False).logits[0]  # as in training
            alone = model(torch.tensor([b])).logits[0]
        assert (packed[len(a):] - alone).abs().max() < 1e-5, attention


def test_an_xtuner_adapter_loads_onto_the_converted_model(internlm2_dir, tmp_path):
    """LoRA on wqkv/wo/w1/w2/w3, as XTuner saves it: its wqkv B rows are split like wqkv."""
    from tuner.model.adapt import load_adapter

    adapter = fx.xtuner_adapter(tmp_path / "xtuner_adapter", fx.config())
    ids = [1, 355, 369, 92543, 13, 415, 273, 92542]
    _, model = _logits(internlm2_dir, ids)
    model = load_adapter(model, adapter, _converted(internlm2_dir))
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double()
    expected = fx.reference_logits(fx.reference_with_adapter(fx.weights(fx.config()), adapter), fx.config(), ids)
    assert (ours - expected).abs().max() < 2e-5
    without = fx.reference_logits(fx.weights(fx.config()), fx.config(), ids)
    assert (expected - without).abs().max() > 1e-3  # the adapter does change the output


@pytest.mark.slow
def test_internlm2_workflow_through_the_cli(tmp_path, internlm2_dir):
    """The built-in InternLM2 config, pointed at the tiny checkpoint: LoRA and QLoRA train with
    packing and the evaluate hook, pth_to_hf, merge, chat (merged, adapter, XTuner adapter)."""
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Who are you?", "input": "", "output": "I am an assistant."},
                                {"instruction": "What is 2 + 3?", "input": "", "output": "It is 5."}] * 8))
    common = [f"model.path={internlm2_dir}", f"data.path={data}", "data.max_length=512", "train.max_steps=3",
              "train.accumulative_counts=1", "train.batch_size=2", "train.dtype=fp32", "model.dtype=float32",
              "evaluate.freq=2", "evaluate.max_new_tokens=4", "checkpoint.save_steps=3", "optim.lr=1e-3"]
    for name, extra in (("lora", ["model.quantization=None"]), ("qlora", [])):
        work = tmp_path / f"work_{name}"
        run = tuner("train", "internlm2_1_8b_qlora_alpaca_e3", "--work-dir", work, "--cfg-options", *common, *extra)
        assert "loaded as transformers' Llama (converted, no remote code)" in run.stderr
        assert "attention tuner_packed" in run.stderr and "Training finished" in run.stderr
        losses = [json.loads(line)["loss"] for d in work.iterdir() if d.is_dir()
                  for line in (d / "vis_data" / "scalars.json").read_text().splitlines()]
        assert len(losses) == 3 and all(loss == loss for loss in losses)
        answers = (work / "eval_outputs_iter_2.txt").read_text().split("### A: ")[1:]  # generation worked
        assert len(answers) == 2 and all(a.strip() for a in answers)

    cfg = tmp_path / "work_lora" / "internlm2_1_8b_qlora_alpaca_e3.py"
    options = ["--cfg-options", *common, "model.quantization=None"]
    tuner("convert", "pth_to_hf", cfg, tmp_path / "work_lora" / "iter_3.pth", tmp_path / "adapter", *options)
    tuner("convert", "merge", internlm2_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["model_type"] == "llama" and "auto_map" not in merged
    for model, extra in ((tmp_path / "merged", []), (internlm2_dir, ["--adapter", tmp_path / "adapter"]),
                         (internlm2_dir, ["--adapter", fx.xtuner_adapter(tmp_path / "xtuner", fx.config())])):
        chat = tuner("chat", model, *extra, "--prompt-template", "internlm2_chat", "--temperature", "0",
                     "--max-new-tokens", "4", stdin="Who are you?\n\nEXIT\n")
        assert chat.stdout.count(">>>") == 2, chat.stdout
    tuner("convert", "merge", internlm2_dir, tmp_path / "xtuner", tmp_path / "merged_xtuner")
    assert (tmp_path / "merged_xtuner" / "model.safetensors").exists()

    # full fine-tuning: pth_to_hf writes a plain Llama folder with the tokenizer and the template trained with
    work = tmp_path / "work_full"
    tuner("train", "internlm2_1_8b_full_alpaca_e3", "--work-dir", work, "--cfg-options", *common)
    tuner("convert", "pth_to_hf", work / "internlm2_1_8b_full_alpaca_e3.py", work / "iter_3.pth", tmp_path / "full",
          "--cfg-options", *common)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full", trust_remote_code=False)
    assert type(full).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "full")
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True) == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_llava_with_an_internlm2_llm_trains_and_exports(tmp_path, internlm2_dir):
    """The LLaVA-InternLM2 configs' shape on the tiny checkpoint: the LLM is the converted Llama
    (its head found as the output embeddings), the projector trains, the HF export loads."""
    import random

    from test_llava import colour_rows
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlavaForConditionalGeneration,
    )

    from tuner.config import load_config
    from tuner.convert.hf import pth_to_hf
    from tuner.engine.loop import Trainer

    random.seed(0)
    torch.manual_seed(0)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8, projection_dim=32)
    CLIPVisionModel(CLIPVisionConfig(**size)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(colour_rows(tmp_path, 8, seed=1)))
    config = tmp_path / "llava_internlm2.py"
    config.write_text(f"""from tuner.config import *
model = ModelConfig(path={str(internlm2_dir)!r}, dtype='float32')
llava = LlavaConfig(visual_encoder={str(tmp_path / 'clip')!r}, freeze_llm=True)
data = DataConfig(path={str(data)!r}, template='internlm2_chat', max_length=256, pack=True)
optim = OptimConfig(lr=1e-2)
train = TrainConfig(batch_size=4, accumulative_counts=1, max_epochs=3, warmup_ratio=0.0, dtype='fp32')
checkpoint = CheckpointConfig(save_steps=1000)
evaluate = EvaluateConfig(inputs=[])
""")
    cfg = load_config(config)
    trainer = Trainer(cfg, work_dir=tmp_path / "work")
    losses = trainer.train()
    assert losses[-1] < losses[0] and all(loss == loss for loss in losses), losses
    out = pth_to_hf(cfg, tmp_path / "work" / f"iter_{len(losses)}.pth", tmp_path / "llava_hf", save_format="hf")
    model = LlavaForConditionalGeneration.from_pretrained(out)  # plain transformers
    assert model.config.text_config.model_type == "llama"
    assert model.get_output_embeddings().weight.shape[0] == 92545  # InternLM2's 92,544 tokens + <image>


@pytest.mark.slow
def test_tuner_serve_internlm2_with_an_xtuner_adapter_to_the_openai_client(tmp_path, internlm2_dir):
    """`tuner serve` on the InternLM2 checkpoint plus an XTuner adapter: the official client gets the
    greedy reply that chat computes in-process from the same converted model and adapter."""
    import subprocess
    import sys

    import openai
    from test_serve import KEY, free_port, wait_for

    from tuner.generation.generate import Generator
    from tuner.generation.load import load_chat_model

    adapter = fx.xtuner_adapter(tmp_path / "xtuner", fx.config())
    model, tokenizer, compute = load_chat_model(str(internlm2_dir), str(adapter), "fp32")
    generator = Generator(model, tokenizer, "internlm2_chat", compute_dtype=compute)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tuner.cli", "serve", str(internlm2_dir), "--adapter",
                                str(adapter), "--prompt-template", "internlm2_chat", "--port", str(port),
                                "--api-key", KEY, "--torch-dtype", "fp32", "--served-model-name", "internlm2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, process)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model="internlm2", messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0, max_tokens=6).choices[0].message.content
    finally:
        process.terminate()
        process.wait(10)
    from tuner.generation.generate import GenerationSettings
    expected = generator.reply([{"role": "user", "content": "Hi"}], GenerationSettings(max_new_tokens=6))
    assert reply == expected and expected  # the same non-empty reply


def test_a_hub_id_of_internlm2_is_converted_from_the_hub_cache(tmp_path, internlm2_dir):
    """`tuner chat internlm/internlm2-chat-1_8b`: the hub id goes through huggingface_hub (offline, from a
    cache laid out as the hub writes one), the config says internlm2, and the converted Llama is what loads."""
    import os
    import subprocess
    import sys

    from tuner.model.internlm2 import converted_dir

    snapshot = tmp_path / "hub" / "models--internlm--internlm2-chat-1_8b" / "snapshots" / ("0" * 40)
    shutil.copytree(internlm2_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("from tuner.model.load import resolve_model_path, describe_conversion, load_causal_lm;"
            "p = resolve_model_path('internlm/internlm2-chat-1_8b'); print(p);"
            "print(describe_conversion('internlm/internlm2-chat-1_8b'));"
            "print(type(load_causal_lm('internlm/internlm2-chat-1_8b')).__name__)")
    try:
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        folder, described, loaded = run.stdout.strip().splitlines()
        assert folder == str(converted_dir(snapshot)) and loaded == "LlamaForCausalLM"
        assert "loaded as transformers' Llama (converted, no remote code)" in described
        chat = tuner("chat", "internlm/internlm2-chat-1_8b", "--prompt-template", "internlm2_chat", "--temperature",
                     "0", "--max-new-tokens", "4", stdin="Who are you?\n\nEXIT\n", env=env)
        assert chat.stdout.count(">>>") == 2 and "converted" in chat.stderr, chat.stderr
    finally:
        shutil.rmtree(converted_dir(snapshot), ignore_errors=True)


def test_a_tokenizer_folder_of_internlm2_loads_natively(tmp_path, internlm2_dir, capsys):
    """The official tokenizer files alone (tokenizer.model, a tokenizer_config.json naming InternLM2Tokenizer
    with an auto_map to remote code, no config.json), as in an XTuner adapter folder or a tokenizer download:
    the native tokenizer, equal to the model folder's; check-template takes it without --trust-remote-code."""
    from tuner.cli import main
    from tuner.model.load import load_tokenizer

    folder = tmp_path / "tokenizer_only"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(internlm2_dir / name, folder / name)
    alone, whole = load_tokenizer(str(folder)), load_tokenizer(str(internlm2_dir))
    assert type(alone).__module__.startswith("transformers.") and len(alone) == len(whole) == 92544
    for text in ["Hello <|im_start|> world", "你好，世界<|im_end|>\n  x"]:
        assert alone(text)["input_ids"] == whole(text)["input_ids"], text
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")
    assert main(["check-template", "internlm2_chat", "--tokenizer", str(folder), "--data", str(data)]) == 0
    assert "trust-remote-code" not in capsys.readouterr().err


@pytest.fixture(scope="module")
def xtuner_internlm2(tmp_path_factory):
    """InternLM2's own modeling code as the xtuner==0.2.0 wheel ships it (xtuner/_lite/modelings/internlm2): an
    implementation not written here, read from the wheel the tests fetch, imported as a package of its own."""
    import importlib
    import sys
    import zipfile

    from real_tokenizers import xtuner_wheel

    pytest.importorskip("einops")
    root = tmp_path_factory.mktemp("xtuner_internlm2")
    package = root / "xtuner_internlm2"
    package.mkdir()
    with zipfile.ZipFile(xtuner_wheel()) as wheel:
        for name in ("__init__.py", "configuration_internlm2.py", "modeling_internlm2.py"):
            (package / name).write_bytes(wheel.read(f"xtuner/_lite/modelings/internlm2/{name}"))
    sys.path.insert(0, str(root))
    try:
        return (importlib.import_module("xtuner_internlm2.configuration_internlm2").InternLM2Config,
                importlib.import_module("xtuner_internlm2.modeling_internlm2").InternLM2ForCausalLM)
    finally:
        sys.path.remove(str(root))


@pytest.mark.parametrize("config", [dict(), dict(heads=8, kv_heads=2), dict(heads=4, kv_heads=4), dict(bias=True),
                                    dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
                                    dict(rope_scaling={"type": "linear", "factor": 2.0})],
                         ids=["gqa2", "gqa4", "mha", "bias", "dynamic_ntk", "linear"])
def test_logits_equal_internlm2s_own_modeling_code(make_internlm2, xtuner_internlm2, config):
    """tuner's InternLM2-as-Llama conversion (wqkv split per key-value group) against InternLM2's own
    modeling code from the xtuner wheel, fed the same weights: not the repo's own reference forward."""
    config_class, model_class = xtuner_internlm2
    folder = make_internlm2(**config)
    cfg = fx.config(**config)
    theirs_config = config_class(**{k: v for k, v in cfg.items() if k not in ("auto_map", "architectures")})
    theirs_config.rope_scaling = cfg.get("rope_scaling")  # (transformers 5 rewrites it; their code reads 'type')
    theirs_config._attn_implementation = "eager"
    theirs = model_class(theirs_config).eval()
    assert not theirs.load_state_dict(fx.weights(cfg), strict=True).missing_keys
    ids = list(range(3, 300)) if "rope_scaling" in config else [1, 355, 369, 92543, 13, 415, 273, 92542]
    ours, _ = _logits(folder, ids)
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
    assert (ours - expected).abs().max() < 2e-5
