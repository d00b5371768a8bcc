"""`tuner convert xtuner-config` against XTuner's own configs: every .py under xtuner/configs of the
xtuner==0.2.0 wheel from PyPI (fetched with pip once, not installed: neither xtuner nor mmengine is
importable here). At least 90% convert, every converted file loads and passes check-config's plan,
the rest are refused with a reason naming the file and line; a few are trained for real on CPU with
their model swapped for a tiny one."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path

import pytest
from real_tokenizers import xtuner_configs
from test_cli import tuner

from tuner.config import load_config
from tuner.convert.xtuner_config import Refused, convert_file
from tuner.data.formats import FORMATS, check_messages
from tuner.data.modelscope import modelscope_id
from tuner.data.sources import is_hub_dataset
from tuner.data.xtuner_map_fns import MAP_FNS
from tuner.engine.plan import describe_plan

# One row each format / XTuner map function reads: stand-ins for the configs' local data files.
ROWS = {
    "alpaca": {"instruction": "Add", "input": "1 and 2", "output": "3"},
    "alpaca_zh": {"instruction_zh": "加", "input_zh": "1 和 2", "output_zh": "3"},
    "oasst1": {"text": "### Human: Hi### Assistant: Hello"},
    "openai": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    "pretrain": {"text": "Paris is the capital of France."},
    "llava": {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                   {"from": "gpt", "value": "A cat."}]},
    "preference": {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    "auto": {"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello"}]},  # XTuner's own
    "code_alpaca_map_fn": {"prompt": "Sum in Python", "completion": "sum(xs)"},
    "tiny_codes_map_fn": {"prompt": "Reverse a list", "response": "xs[::-1]"},
    "colors_map_fn": {"description": "Medium blue: a calm, deep blue", "color": "#1b4f9c"},
    "crime_kg_assitant_map_fn": {"input": "盗窃罪如何量刑？", "output": "视情节而定。"},
    "law_reference_map_fn": {"question": "什么是合同？", "answer": "合同是协议。"},
    "medical_map_fn": {"instruction": "头痛怎么办？", "input": "", "output": "多休息。"},
    "sql_map_fn": {"context": "CREATE TABLE t (a INT)", "question": "How many rows?", "answer": "SELECT COUNT(*) FROM t"},
    "arxiv_map_fn": {"abstract": "We show that packing is fast.", "title": "Packing Is Fast"},
    "openorca_map_fn": {"system_prompt": "Be brief.", "question": "Hi", "response": "Hello"},
    "stack_exchange_map_fn": {"question": "Why?", "response": "Because."},
    "default_map_fn": {"input": "Hi", "output": "Hello"},
    "wizardlm_map_fn": {"conversations": [{"from": "gpt", "value": "skipped"}, {"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello"}]},
    "orpo_dpo_mix_40k_map_fn": {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]},
}


def test_every_xtuner_map_fn_reads_its_dataset_row():
    for name, fn in MAP_FNS.items():
        out = fn(ROWS[name])
        if name == "orpo_dpo_mix_40k_map_fn":
            assert out["messages"] == [{"role": "user", "content": "Hi"}]
            assert out["chosen"][0]["content"] == "Hello!" and out["rejected"][0]["content"] == "No."
            continue
        messages = check_messages(out["messages"])
        assert messages[-1]["role"] == "assistant" and messages[-1]["content"], name
    assert MAP_FNS["sql_map_fn"](ROWS["sql_map_fn"])["messages"][1]["content"] == \
        "CREATE TABLE t (a INT)\nHow many rows?"
    assert MAP_FNS["colors_map_fn"](ROWS["colors_map_fn"])["messages"][1]["content"] == "a calm, deep blue"
    assert [m["content"] for m in MAP_FNS["wizardlm_map_fn"](ROWS["wizardlm_map_fn"])["messages"]] == ["Hi", "Hello"]
    assert FORMATS["xtuner"](ROWS["auto"])["messages"][0] == {"role": "system", "content": "Be brief."}


def _stand_in(cfg, folder: Path):
    """The config with each local data file it names (missing here) replaced by a one-row stand-in."""
    def local(source) -> bool:
        return not (is_hub_dataset(source.path) or modelscope_id(source.path))

    def file_for(source) -> str:
        kind = getattr(source.map_fn, "__name__", None) or source.format
        path = folder / f"{kind}.jsonl"
        path.write_text(json.dumps(ROWS[kind]) + "\n", encoding="utf-8")
        return str(path)

    if cfg.data.sources:
        cfg.data.sources = [dataclasses.replace(s, path=file_for(s)) if local(s) else s for s in cfg.data.sources]
    else:
        paths = [file_for(s) if local(s) else s.path for s in cfg.data.source_list()]
        cfg.data.path = paths[0] if isinstance(cfg.data.path, str) else paths
    if cfg.llava is not None:
        cfg.llava.image_folder = ""
    return cfg


@pytest.mark.slow
def test_xtuner_wheel_configs_convert_and_pass_check_config(tmp_path):
    root = xtuner_configs()
    files = sorted(p for p in root.rglob("*.py") if p.name != "__init__.py")
    assert len(files) > 550, len(files)
    converted, reasons = [], collections.Counter()
    for src in files:
        dst = tmp_path / "out" / src.relative_to(root)
        try:
            convert_file(src, dst)
        except Refused as e:
            message = str(e)
            assert message.startswith(f"{src}:"), message  # file:line (or file:) then the reason
            reasons[re.sub(rf"^{re.escape(str(src))}:(\d+:|\?:)? ", "", message)] += 1
            continue
        converted.append(dst)
    share = len(converted) / len(files)
    print(f"\n{len(files)} XTuner configs: {len(converted)} converted ({share:.1%}), {sum(reasons.values())} refused")
    for reason, n in reasons.most_common(5):
        print(f"  {n:3d}  {reason}")
    assert share >= 0.90

    standins = tmp_path / "data"
    standins.mkdir()
    methods = collections.Counter()
    for dst in converted:
        cfg = load_config(dst)
        text = dst.read_text(encoding="utf-8")
        assert text.startswith("# Converted from the XTuner config "), dst
        plan = describe_plan(_stand_in(cfg, standins))
        assert "\nmodel " in plan and "\ntrain " in plan, (dst, plan)
        methods[(cfg.method, cfg.preference.method if cfg.preference else "sft", cfg.llava is not None)] += 1
    print("  converted by method:", dict(methods))
    # Every kind XTuner has made it through: SFT full / LoRA / QLoRA, DPO, ORPO, reward models, LLaVA.
    assert {m[:2] for m in methods} >= {("full", "sft"), ("lora", "sft"), ("qlora", "sft"), ("full", "dpo"),
                                        ("qlora", "dpo"), ("full", "orpo"), ("full", "reward")}
    assert any(m[2] for m in methods)


def test_the_cli_converts_notes_and_never_overwrites(tmp_path):
    src = xtuner_configs() / "internlm" / "internlm2_chat_7b" / "internlm2_chat_7b_qlora_oasst1_e3.py"
    dst = tmp_path / "internlm2_chat_7b_qlora_oasst1_e3.py"
    run = tuner("convert", "xtuner-config", src, dst)
    assert f"Wrote {dst}" in run.stdout
    assert "trust_remote_code=True dropped" in run.stderr and "line 74" in run.stderr
    text = dst.read_text()
    assert "line 74: trust_remote_code=True dropped" in text.replace("\n#     ", " ")
    cfg = load_config(dst)
    assert (cfg.model.path, cfg.model.quantization, cfg.method) == ("internlm/internlm2-chat-7b", "4bit", "qlora")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (64, 16, 0.1, "all-linear")
    assert (cfg.data.path, cfg.data.format, cfg.data.template) == ("timdettmers/openassistant-guanaco", "oasst1",
                                                                  "internlm2_chat")
    assert (cfg.data.max_length, cfg.data.pack, cfg.train.accumulative_counts, cfg.train.max_epochs) == (2048, True, 16, 3)
    assert (cfg.optim.lr, cfg.optim.max_norm, cfg.train.warmup_ratio, cfg.train.scheduler) == (2e-4, 1.0, 0.03, "cosine")
    assert cfg.evaluate.inputs == ["请给我介绍五个上海的景点", "Please tell me five scenic spots in Shanghai"]
    assert (cfg.checkpoint.save_steps, cfg.checkpoint.save_total_limit, cfg.evaluate.freq) == (500, 2, 500)
    check = tuner("check-config", dst)
    assert "internlm/internlm2-chat-7b (qlora)" in check.stdout and "from the Hugging Face hub" in check.stdout

    again = tuner("convert", "xtuner-config", src, dst, check=False)  # DST exists: refused, kept as it was
    assert again.returncode == 1 and "not overwriting" in again.stderr and dst.read_text() == text

    refused = xtuner_configs() / "internvl" / "v1_5" / "internvl_v1_5_internlm2_26b_lora_finetune.py"
    run = tuner("convert", "xtuner-config", refused, tmp_path / "internvl.py", check=False)
    assert run.returncode == 1 and "InternVL" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "internvl.py").exists()
    broken = tmp_path / "broken.py"
    broken.write_text("lr = 1e-4\nmax_epochs = undefined_name * 2\n")
    run = tuner("convert", "xtuner-config", broken, tmp_path / "out.py", check=False)
    assert run.returncode == 1 and f"{broken}:2:" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("relative, data_kind", [
    ("qwen/qwen1_5/qwen1_5_0_5b_chat/qwen1_5_0_5b_chat_full_alpaca_e3.py", "alpaca"),
    ("custom_dataset/pretrain/internlm/internlm2_7b_full_custom_pretrain_e1.py", "pretrain"),
    ("internlm/internlm2_chat_7b/internlm2_chat_7b_qlora_code_alpaca_e3.py", "code_alpaca_map_fn"),
    ("dpo/internlm/internlm2_chat_1_8b_dpo_full.py", "orpo_dpo_mix_40k_map_fn"),
])
def test_converted_configs_train_on_cpu_with_a_tiny_model(tmp_path, tiny_model_dir, relative, data_kind):
    """Converted, then trained by the real `tuner train` for 2 steps with the model swapped for a tiny
    one and the data for a local file of that dataset's shape."""
    dst = tmp_path / "converted.py"
    tuner("convert", "xtuner-config", xtuner_configs() / relative, dst)
    data = tmp_path / "data.jsonl"
    data.write_text((json.dumps(ROWS[data_kind]) + "\n") * 40, encoding="utf-8")
    options = [f"model.path={tiny_model_dir}", "model.dtype=float32", "model.quantization=None", f"data.path={data}",
               "data.max_length=128", "train.max_steps=2", "train.accumulative_counts=1", "train.dtype=fp32",
               "evaluate.inputs=[]"]
    run = tuner("train", dst, "--work-dir", tmp_path / "work", "--cfg-options", *options)
    assert "Training finished" in run.stderr
    assert (tmp_path / "work" / "last_checkpoint").read_text().strip().endswith("iter_2.pth")


HOSTILE = {  # a config file that would act if it were run; the marker file must never appear
    "shell": "import os\nos.system('touch {marker}')\n",
    "write": "open('{marker}', 'w').write('ran')\n",
    "import": "x = __import__('os').system('touch {marker}')\n",
    "subclasses": "x = ().__class__.__subclasses__()\n",
    "loop": "while True:\n    pass\n",
    "exit": "raise SystemExit(0)\n",
    "read_base": "from mmengine.config import read_base\nwith read_base():\n    import os\n    os.system('touch {marker}')\n",
    "read_base_file": "from mmengine.config import read_base\nwith read_base():\n    from .evil import *\n",
    "function": "def f():\n    open('{marker}', 'w')\nx = f()\n",
    "memory": "x = 'a' * 10 ** 10\n",
    "power": "x = 10 ** 10 ** 10\n",
    "format": "x = '{{:>999999999}}'.format(1)\n",
    "format_argument": "x = '{{:>{{}}}}'.format('a', 999999999)\n",
    "percent_star": "x = '%*d' % (999999999, 1)\n",
    "nested": "x = [[0] * 100000] * 100000\ny = str(x)\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_config_is_refused_without_running(tmp_path, case, capsys):
    """The converter reads the syntax tree and never runs the file: a command, a file write, __import__, the
    subclasses trick, an endless loop, SystemExit(0), code under read_base() (there and in the file it
    imports), the config's own function, and memory bombs all exit 1 within seconds, naming file and line,
    and leave no trace."""
    import time

    from tuner.cli import main

    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"import os\nos.system('touch {marker}')\n")
    src = tmp_path / "hostile.py"
    src.write_text("lr = 2e-4\n" + HOSTILE[case].format(marker=marker) +
                   "model = dict(type=SupervisedFinetune)\n")
    started = time.perf_counter()
    assert main(["convert", "xtuner-config", str(src), str(tmp_path / "out.py")]) == 1
    err = capsys.readouterr().err
    assert time.perf_counter() - started < 5 and not marker.exists() and not (tmp_path / "out.py").exists()
    assert re.search(rf"{re.escape(str(tmp_path))}/(hostile|evil)\.py:\d+: ", err) and "Traceback" not in err, err


def test_read_base_imports_other_config_files(tmp_path):
    """`with read_base(): from .base import *` (mmengine's way to share settings) brings the base file's
    names, which the config then changes; f-strings, os.path.join and arithmetic are computed."""
    from tuner.convert.xtuner_read import Call, Symbol, read_xtuner_config

    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "settings.py").write_text(
        "import os.path as osp\nlr = 2e-4\nroot = '/data'\ndata_path = osp.join(root, 'alpaca.json')\n"
        "_private = 1\n")
    child = tmp_path / "child.py"
    child.write_text("from mmengine.config import read_base\nfrom transformers import AutoModelForCausalLM\n"
                     "with read_base():\n    from ._base_.settings import *\n"
                     "lr *= 2\nname = f'run-{lr:g}'\nsize = int(2048 - (336 / 14) ** 2)\n"
                     "llm = dict(type=AutoModelForCausalLM.from_pretrained, path=data_path)\n")
    ns = read_xtuner_config(child)
    assert (ns["lr"], ns["name"], ns["size"], ns["data_path"]) == (4e-4, "run-0.0004", 1472, "/data/alpaca.json")
    assert "_private" not in ns and isinstance(ns["llm"]["type"], Symbol)
    assert ns["llm"]["type"].name == "transformers.AutoModelForCausalLM.from_pretrained"
    assert isinstance(read_xtuner_config(_write(tmp_path, "x = SYSTEM.format(bot='B')\n",
                                                "from xtuner.utils import SYSTEM\n"))["x"], Call)


def _write(folder, body: str, head: str = "") -> Path:
    path = folder / "cfg.py"
    path.write_text(head + body)
    return path


def test_a_tree_of_configs_converts_in_one_process(tmp_path, capsys):
    """`tuner convert xtuner-config SRC_DIR DST_DIR`: XTuner's 593 files in one process (about 2 s; a
    process each took about 6 s of CPU), a line per file, the counts at the end; refusals are clean (exit 0);
    `tuner check-config` takes several files."""
    import time

    from tuner.cli import main

    started = time.perf_counter()
    assert main(["convert", "xtuner-config", str(xtuner_configs()), str(tmp_path / "out")]) == 0
    seconds = time.perf_counter() - started
    out = capsys.readouterr().out
    assert "593 files under" in out and "536 converted" in out and "57 refused" in out and "0 failed" in out, out[-400:]
    assert "converted  internlm/internlm2_chat_7b/internlm2_chat_7b_qlora_oasst1_e3.py (2 notes)" in out
    assert re.search(r"refused    internvl/.*InternVL", out) and seconds < 30, seconds
    pair = [str(tmp_path / "out" / "internlm" / "internlm2_chat_7b" / name) for name in
            ("internlm2_chat_7b_qlora_oasst1_e3.py", "internlm2_chat_7b_qlora_alpaca_e3.py")]
    assert main(["check-config", *pair]) == 0
    assert "2 of 2 configs checked; 0 failed" in capsys.readouterr().out
    assert main(["convert", "xtuner-config", str(xtuner_configs() / "dpo"), str(tmp_path / "out" / "dpo")]) == 1
    assert "FAILED" in capsys.readouterr().out  # (they exist there already: never overwritten without --force)


FIELDS = {  # XTuner file -> what its PART 1 and its dicts say, read by hand from the file
    "llava/internlm2_chat_7b_clip_vit_large_p14_336/finetune/"
    "llava_internlm2_chat_7b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune.py": {
        "model.path": "internlm/internlm2-chat-7b", "model.quantization": "4bit", "lora.r": 512, "lora.alpha": 256,
        "lora.dropout": 0.05, "data.format": "llava", "data.template": "internlm2_chat",
        "data.path": "./data/llava_data/LLaVA-Instruct-150K/llava_v1_5_mix665k.json",
        "data.max_length": 1472,  # int(2048 - (336 / 14) ** 2)
        "train.batch_size": 16, "train.accumulative_counts": 1, "optim.lr": 2e-4, "train.max_epochs": 1,
        "llava.visual_encoder": "openai/clip-vit-large-patch14-336", "llava.freeze_llm": True,
        "llava.image_folder": "./data/llava_data/llava_images", "llava.pad_image_to_square": True,
        "llava.visual_encoder_lora.r": 64, "llava.visual_encoder_lora.alpha": 16,
        "evaluate.image": "https://llava-vl.github.io/static/images/view.jpg"},
    "dpo/internlm/internlm2_chat_1_8b_dpo_full.py": {
        "model.path": "internlm/internlm2-chat-1_8b-sft", "lora": None, "preference.method": "dpo",
        "preference.loss": "sigmoid", "preference.beta": 0.1, "preference.label_smoothing": 0.0,
        "data.map_fn.__name__": "orpo_dpo_mix_40k_map_fn", "data.template": None, "data.max_length": 2048,
        "train.batch_size": 1, "train.accumulative_counts": 16, "train.max_epochs": 3, "optim.lr": 5e-7,
        "train.warmup_ratio": 0.03, "train.scheduler": "cosine"},
    "orpo/internlm/internlm2_chat_7b_orpo_qlora_varlenattn_ultrafeedback_e5.py": {
        "preference.method": "orpo", "preference.beta": 0.1, "model.quantization": "4bit", "lora.r": 64,
        "lora.alpha": 16, "data.pack": True, "train.max_epochs": 5, "optim.lr": 5e-6, "train.warmup_ratio": 0.01},
    "reward_model/internlm/internlm2_chat_1_8b_reward_qlora_varlenattn_ultrafeedback.py": {
        "preference.method": "reward", "optim.lr": 1e-4, "lora.r": 64, "train.accumulative_counts": 16},
    "llama/llama_7b/llama_7b_qlora_alpaca_enzh_e3.py": {  # ConcatDataset
        "data.sources": [("tatsu-lab/alpaca", "alpaca"), ("silk-road/alpaca-data-gpt4-chinese", "alpaca_zh")],
        "data.template": "default", "data.pack": True, "train.max_epochs": 3, "optim.lr": 2e-4},
    "minicpm/minicpm3_4b/minicpm3_4b_dpo_qlora.py": {  # train_cfg max_iters=max_steps (3); warmup 0.03 of it
        "train.max_steps": 3, "train.warmup_ratio": 0.03, "optim.lr": 5e-7, "preference.method": "dpo"},
    "cohere/cohere_104b/cohere_100b_128k_sp32.py": {  # max_iters=16, eta_min=lr * 0.15, sequence_parallel 32
        "train.max_steps": 16, "train.warmup_ratio": 0.0, "train.accumulative_counts": 32,
        "data.max_length": 131072, "data.template": "cohere_chat", "optim.lr": 2e-5, "train.sequence_parallel_size": 32,
        "notes": ["eta_min=3e-06: tuner's cosine decays to 0", "sequence_parallel_size=32"]},
    "internlm/internlm2_7b/internlm2_7b_full_finetune_custom_dataset_e1_sequence_parallel_4.py": {
        "train.accumulative_counts": 4, "optim.lr": 4e-5, "optim.betas": (0.9, 0.95), "optim.weight_decay": 0.01,
        "train.sequence_parallel_size": 4,
        "train.warmup_ratio": 0.025,  # type="LinearLR" as a string, end=warm_up_ratio * max_epochs
        "data.max_length": 32768, "data.pack": True, "data.template": "internlm2_chat",
        "notes": ["/path/to/json/file.json is XTuner's placeholder", "sequence_parallel_size=4"]},
    "llama/llama2_70b/llama2_70b_qlora_open_platypus_e1.py": {
        "data.path": "garage-bAInd/Open-Platypus", "data.format": "alpaca", "data.template": "llama2_chat",
        "optim.lr": 3e-4, "train.max_epochs": 1, "train.warmup_ratio": 0.03},
}


def _field(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("relative", sorted(FIELDS))
def test_converted_configs_say_what_the_xtuner_file_says(tmp_path, relative):
    """Ten diverse files (LLaVA, DPO, ORPO, a reward model, ConcatDataset, max_iters, eta_min, sequence parallel,
    a string-typed scheduler), field by field against the XTuner file."""
    dst = tmp_path / "converted.py"
    converted = convert_file(xtuner_configs() / relative, dst)
    cfg, expected = load_config(dst), dict(FIELDS[relative])
    for name, section in converted.sections.items():  # the mapping's typed sections are what the file builds
        assert getattr(cfg, name) == section, name
    header = dst.read_text().split("from tuner.config")[0].replace("\n#     ", " ")
    for note in expected.pop("notes", []):
        assert note in header, (note, header)
    for dotted, value in expected.items():
        if dotted == "data.sources":
            assert [(s.path, s.format) for s in cfg.data.sources] == value
        else:
            assert _field(cfg, dotted) == (pytest.approx(value) if isinstance(value, float) else value), dotted


def test_an_already_tokenized_dataset_is_refused():
    """XTuner's pg_books configs read input_ids rows (do_dataset_tokenization=False): tuner tokenizes text, so
    it refuses them (they converted to a config that would have trained on nothing the file meant)."""
    with pytest.raises(Refused, match="do_dataset_tokenization=False"):
        convert_file(xtuner_configs() / "llama/llama2_7b/llama2_7b_full_pgbooks_400iters_sp4.py", Path("/nonexistent/x.py"))
