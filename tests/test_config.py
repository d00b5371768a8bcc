import pytest

from tuner.config import LoraConfig, TrainConfig, load_config
from tuner.configs_index import builtin_configs, copy_config
from tuner.errors import TunerError

REQUIRED = ["smollm2_135m_instruct_lora_personal_assistant_e3", "smollm2_135m_instruct_full_personal_assistant_e3",
            "internlm2_1_8b_qlora_alpaca_e3", "internlm2_1_8b_full_alpaca_e3", "internlm2_chat_7b_qlora_oasst1_e3"]


@pytest.mark.parametrize("name", REQUIRED)
def test_builtin_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.method == name.split("_")[-3] if "personal" not in name else cfg.method in ("lora", "full")
    assert cfg.data.max_length > 0 and cfg.optim.lr > 0


LLAVA = ["llava_smollm2_135m_instruct_clip_vit_base_p16_pretrain", "llava_smollm2_135m_instruct_clip_vit_base_p16_finetune",
         "llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain",
         "llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_finetune"]


def test_every_builtin_config_loads():
    assert set(REQUIRED + LLAVA) <= set(builtin_configs())
    for name in builtin_configs():
        assert load_config(name).name == name


@pytest.mark.parametrize("name", LLAVA)
def test_llava_configs_are_two_stages(name):
    cfg = load_config(name)
    pretrain = name.endswith("pretrain")
    assert cfg.llava.freeze_llm == pretrain and cfg.llava.freeze_visual_encoder
    assert (cfg.llava.pretrained_pth is None) == pretrain and (cfg.lora is None or not pretrain)


def test_method_follows_config():
    assert load_config("internlm2_1_8b_qlora_alpaca_e3").method == "qlora"
    assert load_config("internlm2_1_8b_full_alpaca_e3").method == "full"
    assert load_config("smollm2_135m_instruct_lora_personal_assistant_e3").method == "lora"


def test_map_fn_written_in_config_works(tmp_path):
    from pathlib import Path

    import configs

    source = Path(configs.__file__).parent / "smollm2" / "smollm2_135m_instruct_lora_personal_assistant_e3.py"
    cfg_file = tmp_path / "my_config.py"
    cfg_file.write_text(source.read_text() + "\n\ndef qa_map_fn(row):\n    return {'messages': [{'role': 'user', "
                        "'content': row['q']}, {'role': 'assistant', 'content': row['a']}]}\n\n\n"
                        "data = DataConfig(path='qa.jsonl', map_fn=qa_map_fn)\n")
    cfg = load_config(str(cfg_file))
    assert cfg.data.map_fn({"q": "Hi", "a": "Hello"})["messages"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_the_oasst1_config_reads_guanaco_rows_with_the_built_in_format():
    from tuner.data.formats import FORMATS

    cfg = load_config("internlm2_chat_7b_qlora_oasst1_e3")
    row = {"text": "### Human: Hi there### Assistant: Hello! How can I help?### Human: Bye### Assistant: Bye!"}
    assert cfg.data.map_fn is None and cfg.data.format == "oasst1"
    assert FORMATS[cfg.data.format](row)["messages"] == [
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]


def test_cfg_options_convert_types():
    cfg = load_config("smollm2_135m_instruct_lora_personal_assistant_e3",
                      ["optim.lr=1e-4", "data.max_length=256", "data.pack=false", "lora.target_modules=q_proj,v_proj",
                       "optim.max_norm=None", "data.template=chatml"])
    assert cfg.optim.lr == 1e-4 and cfg.data.max_length == 256 and cfg.data.pack is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.optim.max_norm is None
    assert cfg.data.template == "chatml"


def test_cfg_options_unknown_key_lists_valid_names():
    with pytest.raises(TunerError, match=r"no field 'lrate'.*valid fields: name, lr, weight_decay"):
        load_config("smollm2_135m_instruct_lora_personal_assistant_e3", ["optim.lrate=1"])
    with pytest.raises(TunerError, match="unknown section 'optimizer'.*valid sections: model, lora"):
        load_config("smollm2_135m_instruct_lora_personal_assistant_e3", ["optimizer.lr=1"])
    with pytest.raises(TunerError, match="train.batch_size=two"):
        load_config("smollm2_135m_instruct_lora_personal_assistant_e3", ["train.batch_size=two"])


def test_wrong_key_or_type_in_config_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from tuner.config import *\n\ndata = DataConfig(path='x.jsonl', max_len=5)\n")
    with pytest.raises(TunerError, match=r"bad.py:3: DataConfig has no field 'max_len'; valid fields: path, format"):
        load_config(bad)
    bad.write_text("from tuner.config import *\ntrain = TrainConfig(batch_size='8')\n")
    with pytest.raises(TunerError, match=r"bad.py:2: TrainConfig.batch_size must be int, got '8'"):
        load_config(bad)
    bad.write_text("from tuner.config import *\ndata = DataConfig(path='x'\n")
    with pytest.raises(TunerError, match=r"bad.py:2: syntax error"):
        load_config(bad)


def test_field_checks():
    with pytest.raises(TunerError, match="scheduler must be"):
        TrainConfig(scheduler="step")
    with pytest.raises(TunerError, match="r must be positive"):
        LoraConfig(r=0)


def test_unknown_config_name_suggests():
    with pytest.raises(TunerError) as e:
        load_config("smollm2_lora")
    assert "no config file or built-in config" in str(e.value)
    with pytest.raises(TunerError, match="config file not found"):
        load_config("missing/config.py")


def test_copy_cfg_never_overwrites(tmp_path):
    dest = copy_config("internlm2_1_8b_qlora_alpaca_e3", tmp_path)
    assert dest.name == "internlm2_1_8b_qlora_alpaca_e3_copy.py"
    assert dest.read_text() == builtin_configs()["internlm2_1_8b_qlora_alpaca_e3"].read_text()
    dest.write_text("# my edits")
    with pytest.raises(TunerError, match="already exists"):
        copy_config("internlm2_1_8b_qlora_alpaca_e3", tmp_path)
    assert dest.read_text() == "# my edits"


def test_the_one_writer_writes_every_builtin_config_back_as_itself(tmp_path):
    """config_writer.xtuner_text (what the converter, the config library and resolved_config.py write with):
    every built-in config's sections, written in XTuner's shape and loaded again, are the same sections."""
    from tuner.config import SECTIONS
    from tuner.config_writer import xtuner_text

    for name, path in builtin_configs().items():
        cfg = load_config(path)
        sections = {section: getattr(cfg, section) for section in SECTIONS}
        written = tmp_path / f"{name}.py"
        written.write_text(xtuner_text(["# " + name], sections, config_path=path))  # (its own reward functions)
        again = load_config(written)
        assert all(comparable(getattr(again, section)) == comparable(value) for section, value in sections.items()), name


def comparable(value):
    """A section with its functions as their names (a function written in a config file is made again when the
    file runs again: the same code, another object)."""
    import dataclasses

    if dataclasses.is_dataclass(value):
        return {f.name: comparable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    return value.__name__ if callable(value) else value


def test_settings_are_written_as_xtuner_writes_them():
    from tuner.config_writer import float_text

    assert [float_text(x) for x in (2e-4, 5e-7, 1e-3, 0.03, 0.1, 1.0, 2.5e-05, 0.0, 1e-10)] == \
        ["2e-4", "5e-7", "1e-3", "0.03", "0.1", "1.0", "2.5e-5", "0.0", "1e-10"]
    assert all(float(float_text(x)) == x for x in (1 / 3, 2 / 3 * 1e-4, 123456.789, 3e-3))


def test_resolved_config_reloads(tmp_path):
    cfg = load_config("smollm2_135m_instruct_lora_personal_assistant_e3", ["optim.lr=3e-4"])
    resolved = tmp_path / "resolved.py"
    resolved.write_text(cfg.resolved_text())
    again = load_config(resolved)
    assert again.optim == cfg.optim and again.lora == cfg.lora and again.data == cfg.data


def test_config_docs_are_up_to_date():
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "config_docs.py"
    result = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


PREFERENCE = {"smollm2_135m_instruct_lora_dpo_signoff_e2": ("dpo", "lora"),
              "smollm2_135m_instruct_lora_orpo_signoff_e2": ("orpo", "lora"),
              "smollm2_135m_instruct_lora_reward_signoff_e1": ("reward", "lora"),
              "smollm2_135m_instruct_lora_kto_signoff_e2": ("kto", "lora"),
              "internlm2_chat_1_8b_dpo_full_ultrafeedback_e1": ("dpo", "full"),
              "internlm2_chat_7b_dpo_qlora_ultrafeedback_e1": ("dpo", "qlora"),
              "internlm2_chat_1_8b_reward_lora_ultrafeedback_e1": ("reward", "lora"),
              "qwen2_5_7b_instruct_dpo_qlora_ultrafeedback_e1": ("dpo", "qlora"),
              "qwen2_5_1_5b_instruct_orpo_lora_ultrafeedback_e1": ("orpo", "lora"),
              "llama3_8b_instruct_orpo_qlora_ultrafeedback_e1": ("orpo", "qlora"),
              "llama3_8b_instruct_reward_qlora_ultrafeedback_e1": ("reward", "qlora")}


@pytest.mark.parametrize("name", PREFERENCE)
def test_preference_configs_say_what_their_names_say(name):
    """XTuner-style names: the family, the method (dpo / orpo / reward) and full / lora / qlora match the config;
    a reward model has a scalar head and no evaluate-chat."""
    cfg = load_config(name)
    method, finetune = PREFERENCE[name]
    assert cfg.preference.method == method and cfg.method == finetune
    assert cfg.head == ("reward" if method == "reward" else "lm")
    assert (not cfg.evaluate.inputs) == (method == "reward")
    family = name.split("_")[0]
    assert {"smollm2": None, "internlm2": "internlm2_chat", "qwen2": "qwen2_5_chat", "llama3": "llama3_chat"}[
        family] == cfg.data.template


def test_the_resolved_config_loads_back_as_the_same_config(tmp_path, tiny_model_dir, data_file):
    """work_dir/resolved_config.py (the sections after --cfg-options) is a config of its own: loaded, it
    gives the same sections; a map function and a hook written in the config come from the config file,
    an importable one by import. (It named functions it never imported, so it did not load.)"""
    import dataclasses

    from conftest import write_config

    from tuner.config import load_config
    from tuner.engine.loop import Trainer

    extra = ("from tuner.data.xtuner_map_fns import sql_map_fn\n\n"
             "def my_map_fn(row):\n    return row\n\n"
             "def every_step(trainer, step, metrics):\n    pass\n\n"
             "data.map_fn = my_map_fn\n"
             "data.sources = [DatasetSource(path=data.path, map_fn=sql_map_fn, repeats=0.5), "
             "DatasetSource(path=data.path, format='openai')]\n"
             "custom_hooks = [every_step]\n")
    cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file, extra=extra),
                      ["optim.lr=3e-4", "train.max_steps=1", "train.dtype=bfloat16"])
    with pytest.raises(TunerError, match="field 'context'"):  # (sql_map_fn does not read these rows)
        Trainer(cfg, work_dir=tmp_path / "work").setup()  # the resolved config is written before the data
    again = load_config(tmp_path / "work" / "resolved_config.py")
    for name in ("model", "lora", "optim", "train", "checkpoint", "evaluate", "llava", "preference"):
        assert getattr(again, name) == getattr(cfg, name), name
    data, original = dataclasses.asdict(again.data), dataclasses.asdict(cfg.data)
    assert again.data.map_fn.__name__ == "my_map_fn" and again.data.sources[0].map_fn.__name__ == "sql_map_fn"
    assert [h.__name__ for h in again.custom_hooks] == ["every_step"]
    for d in (data, original):
        d["map_fn"] = d["map_fn"].__name__
        d["sources"] = [{**s, "map_fn": s["map_fn"] and s["map_fn"].__name__} for s in d["sources"]]
    assert data == original and again.optim.lr == 3e-4
