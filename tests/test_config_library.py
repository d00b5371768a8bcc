"""The generated config library (tools/config_library.py): the checked-in files are what the table makes,
each says in its name what it does, each family's architecture trains as a tiny random model with its
configs, and the named templates equal the families' real tokenizers' own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import scalars
from test_families import family_dirs  # noqa: F401 - the family matrix's tiny models (a fixture)

from tuner.config import load_config
from tuner.configs_index import builtin_configs

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import config_library as library  # noqa: E402


def test_the_checked_in_files_are_what_the_table_generates():
    run = subprocess.run([sys.executable, str(TOOLS / "config_library.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    files = library.library()
    assert len(files) >= 500
    for path, text in files.items():
        assert path.read_text(encoding="utf-8") == text, path


def test_the_check_fails_on_a_changed_or_stale_file(tmp_path, monkeypatch):
    monkeypatch.setattr(library, "ROOT", tmp_path)
    monkeypatch.setattr(library, "MODELS", library.MODELS[:2])
    monkeypatch.setattr(sys, "argv", ["config_library.py"])
    assert library.main() == 0
    monkeypatch.setattr(sys, "argv", ["config_library.py", "--check"])
    assert library.main() == 0
    one = next(tmp_path.rglob("*qlora_alpaca_e3.py"))
    one.write_text(one.read_text().replace("lr = 2e-4", "lr = 1e-4"))
    assert library.main() == 1
    monkeypatch.setattr(sys, "argv", ["config_library.py"])
    assert library.main() == 0 and "lr = 2e-4" in one.read_text()  # regenerated
    monkeypatch.setattr(library, "MODELS", library.MODELS[:1])  # the second model's files are now stale
    monkeypatch.setattr(sys, "argv", ["config_library.py", "--check"])
    assert library.main() == 1


def test_every_generated_config_says_what_its_name_says():
    configs = builtin_configs()
    families = set()
    for model in library.MODELS:
        for method, dataset in library.plan(model):
            name = library.config_name(model, method, dataset)
            assert name in configs, name
            cfg = load_config(name)
            if not cfg.source.startswith(library.GENERATED_MARK):
                continue  # a hand-written config of the same name
            families.add(model.family)
            long = method == library.LONG
            finetune = "qlora" if long else method.split("_")[-1]
            assert cfg.method == finetune and cfg.model.path == model.hub_id, name
            assert (cfg.train.sequence_parallel_size, cfg.data.max_length) == ((4, 32768) if long else (1, 2048)) \
                or method == "grpo_lora", name
            assert cfg.model.trust_remote_code == model.remote_code
            assert cfg.data.template == model.template
            preference = method.split("_")[0] if method.startswith(("dpo", "orpo")) else None
            assert (cfg.preference.method if cfg.preference else None) == preference, name
            source = cfg.data.source_list()[0]
            assert source.path == library.DATASETS[dataset].path
            if dataset == "code_alpaca":
                assert source.map_fn.__name__ == "code_alpaca_map_fn"
            else:
                assert source.format == library.DATASETS[dataset].form.split("'")[1], name
    for model in library.MODELS:
        if model.name not in library.LLAVA_LLMS:
            continue
        for stage in library.LLAVA_STAGES:
            cfg = load_config(library.llava_name(model, stage))
            pretrain = stage == "pretrain"
            assert cfg.model.path == model.hub_id and cfg.data.template == model.template
            assert cfg.llava.freeze_llm and cfg.llava.freeze_visual_encoder
            assert (cfg.llava.pretrained_pth is None) == pretrain and (cfg.method == "qlora") == (not pretrain)
            if not pretrain:  # the finetune stage starts from the pretrain stage's projector
                assert library.llava_name(model, "pretrain") in cfg.llava.pretrained_pth
        families.add("llava")
    assert families >= {"llava", "internlm2", "qwen2_5", "qwen3", "llama3", "mistral", "mixtral", "gemma", "phi", "deepseek",
                        "yi", "baichuan", "chatglm", "minicpm"}


# The family matrix's tiny models (tests/test_families.py), by the table's architecture names.
ARCH_FAMILY = {"LlamaConfig": "llama3", "Qwen2Config": "qwen2_5", "Qwen3Config": "qwen3", "Qwen3MoeConfig": "qwen3_moe",
               "MistralConfig": "mistral", "Gemma2Config": "gemma2", "Gemma3TextConfig": "gemma3", "Phi3Config": "phi3"}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tokenizer, family_dirs):  # noqa: F811 - pytest passes the fixture
    """A tiny random model folder per architecture of the table: the family matrix's, plus Mixtral and
    InternLM2 (as the hub ships it)."""
    import transformers
    from internlm2_fixture import sentencepiece_model, write_checkpoint
    from test_families import SMALL

    made = {}

    def make(arch):
        if arch in ARCH_FAMILY:
            return family_dirs(ARCH_FAMILY[arch])
        if arch not in made:
            folder = tmp_path_factory.mktemp(arch)
            if arch == "internlm2":
                write_checkpoint(folder, sentencepiece_model())
            else:  # MixtralConfig, with the SmolLM2 tokenizer
                config = transformers.MixtralConfig(**{**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2,
                                                       "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                                                       "bos_token_id": tokenizer.bos_token_id,
                                                       "eos_token_id": tokenizer.eos_token_id})
                torch.manual_seed(0)
                transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
                tokenizer.save_pretrained(folder)
            made[arch] = folder
        return made[arch]
    return make


ARCHS = sorted({m.arch for m in library.MODELS if m.arch != "remote"})


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_trains_with_its_generated_config(tmp_path, arch_dirs, arch):
    """The first generated custom-data config of each architecture, its model swapped for a tiny random one
    of that architecture: two optimizer steps whose loss is finite. (Baichuan2, ChatGLM3 and MiniCPM run
    their own remote code, which cannot be fetched here: not covered.)"""
    from tuner.engine.loop import Trainer

    model = next(m for m in library.MODELS if m.arch == arch)
    method = "lora" if model.size_b <= 14 else "qlora"
    cfg = load_config(library.config_name(model, method, "custom_sft"))
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = arch_dirs(arch)
    template_check = "off" if arch in ("Gemma2Config", "Phi3Config", "MixtralConfig") else "warn"
    cfg.apply_overrides([f"model.path={folder}", "model.dtype=float32", "model.quantization=None",
                         f"data.path={data}", "data.max_length=128", f"data.template_check={template_check}",
                         "train.max_steps=2", "train.accumulative_counts=1", "train.dtype=fp32",
                         "train.gradient_checkpointing=False", "evaluate.inputs=[]"])
    trainer = Trainer(cfg, work_dir=tmp_path / "work")
    trainer.train()
    steps = scalars(tmp_path / "work")
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)


@pytest.mark.slow
def test_long_context_configs_load_and_internlm2_trains_with_rows_split_over_two_processes(
        tmp_path, arch_dirs, monkeypatch):
    """The library's long-context configs (32k-token rows split over 4 GPUs) all load with N=4 and 32k; the
    InternLM2.5-7B one (the tutorials' model), its model swapped for a tiny random InternLM2 as the hub ships
    it (4 query / 2 key-value heads), rows of 512 tokens and N=2 on 2 processes: two steps with a finite loss.
    (The other families' attention is the same transformers code: Llama, which InternLM2 loads as, is what
    tests/test_seqpar.py checks against one process.)"""
    from test_cli import tuner

    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Count from {i} to {i + 40}."},
                          {"role": "assistant", "content": " ".join(map(str, range(i, i + 41)))}]} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    long = [m.name for m in library.MODELS if (library.LONG, "custom_sft") in library.plan(m)]
    assert len(long) == 4
    for name in long:
        config = load_config(f"{name}_{library.LONG}_custom_sft_e3")
        assert (config.train.sequence_parallel_size, config.data.max_length, config.method) == (4, 32768, "qlora")
    for port, (name, arch) in enumerate([("internlm2_5_chat_7b", "internlm2")]):
        config = load_config(f"{name}_{library.LONG}_custom_sft_e3")
        monkeypatch.setenv("PORT", str(29621 + 2 * port))
        run = tuner("train", config.path, "--work-dir", tmp_path / name, "--cfg-options", f"model.path={arch_dirs(arch)}",
                    "model.dtype=float32", "model.quantization=None", f"data.path={data}", "data.max_length=512",
                    "data.template_check=warn", "train.sequence_parallel_size=2", "train.max_steps=2",
                    "train.accumulative_counts=1", "train.dtype=fp32", "evaluate.inputs=[]")
        assert "2 processes" in run.stderr
        steps = scalars(tmp_path / name)
        assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps), name


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Qwen2Config", "Qwen3Config"])
def test_grpo_configs_train_two_steps_as_tiny_models(tmp_path, arch_dirs, arch):
    """The library's GRPO-on-GSM8K configs (Qwen2.5 0.5B-7B, Qwen3 0.6B-8B) all load; the first of each family,
    its model swapped for a tiny random one and GSM8K for a local file of its shape, trains two steps with
    the config's own rewards (math_accuracy, format) logged."""
    from tuner.engine.loop import Trainer

    models = [m for m in library.MODELS if m.arch == arch and ("grpo_lora", "gsm8k") in library.plan(m)]
    assert len(models) >= 4
    configs = [load_config(library.config_name(m, "grpo_lora", "gsm8k")) for m in models]
    assert all(c.rl is not None and c.data.sources[0].subset == "main" for c in configs)
    cfg = configs[0]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i} more. How many now?",
                                        "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}) + "\n" for i in range(8)))
    cfg.data.sources = [library.DatasetSource(path=str(data))]
    cfg.apply_overrides([f"model.path={arch_dirs(arch)}", "model.dtype=float32", "rl.max_completion_length=8",
                         "train.max_steps=2", "train.accumulative_counts=1", "train.dtype=fp32",
                         "train.gradient_checkpointing=False", "evaluate.inputs=[]"])
    Trainer(cfg, work_dir=tmp_path / "work").train()
    steps = scalars(tmp_path / "work")
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert {"rewards/math_accuracy", "rewards/format"} <= steps[0].keys()


def test_the_library_templates_equal_the_real_tokenizers():
    """A template the table names, where the family's real tokenizer can be fetched, renders a conversation
    as that tokenizer's own chat template does (token ids); the rest are XTuner's (test_templates.py)."""
    from real_tokenizers import CASES, PAIRS, real_tokenizer

    from tuner.data.template_check import compare_templates
    from tuner.data.templates import TEMPLATES, get_template

    used = {m.template for m in library.MODELS if m.template}
    assert used <= set(TEMPLATES)
    case = next(c for c in CASES.values() if any(m["role"] == "system" for m in c["messages"]))
    checked = 0
    for name in sorted(used & set(PAIRS)):
        tokenizer = real_tokenizer(PAIRS[name])
        report = compare_templates(get_template(name, tokenizer), tokenizer, [case])
        assert report.ok, (name, [d.describe() for d in report.differences])
        checked += 1
    assert checked >= 5
