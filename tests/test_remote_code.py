"""A model whose code lives in its folder (remote code), written by the tests: tuner runs it only
with --trust-remote-code, and refuses to pack rows for it (its attention ignores sample starts)."""

import json

import pytest

from conftest import write_config
from test_cli import tuner

CONFIG_CODE = '''
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
MODEL_CODE = '''
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''
TOKENIZER_CODE = '''
import jieba  # a package this environment lacks, as the CPM tokenizers' code needs it

from transformers import PreTrainedTokenizerFast


class TinyRemoteTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture(scope="session")
def remote_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama's weights and tokenizer behind remote code: config and model classes from the folder."""
    import shutil

    folder = tmp_path_factory.mktemp("remote") / "tiny-remote"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "configuration_tiny_remote.py").write_text(CONFIG_CODE)
    (folder / "modeling_tiny_remote.py").write_text(MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_remote_code_runs_only_when_trusted(remote_dir, tmp_path, data_file):
    refused = tuner("chat", remote_dir, "--max-new-tokens", "4", stdin="Hi\n\nEXIT\n", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "remote code" in refused.stderr and "--trust-remote-code" in refused.stderr
    chat = tuner("chat", remote_dir, "--trust-remote-code", "--temperature", "0", "--max-new-tokens", "4",
                 stdin="Hi\n\nEXIT\n")
    assert chat.stdout.count(">>>") == 2

    cfg = write_config(tmp_path, remote_dir, data_file, pack=False, epochs=1)
    untrusted = tuner("train", cfg, "--work-dir", tmp_path / "w0", check=False)
    assert untrusted.returncode == 1 and "--trust-remote-code" in untrusted.stderr
    trusted = ["--cfg-options", "model.trust_remote_code=True"]
    tuner("train", cfg, "--work-dir", tmp_path / "work", *trusted)
    last = (tmp_path / "work" / "last_checkpoint").read_text()
    tuner("convert", "pth_to_hf", cfg, last, tmp_path / "adapter", *trusted)
    refused = tuner("convert", "merge", remote_dir, tmp_path / "adapter", tmp_path / "merged", check=False)
    assert refused.returncode == 1 and "--trust-remote-code" in refused.stderr
    assert not (tmp_path / "merged").exists()
    tuner("convert", "merge", remote_dir, tmp_path / "adapter", tmp_path / "merged", "--trust-remote-code")
    assert (tmp_path / "merged" / "config.json").exists()


def test_packing_is_refused_for_remote_code(remote_dir, tmp_path, data_file):
    cfg = write_config(tmp_path, remote_dir, data_file, pack=True, epochs=1)
    run = tuner("train", cfg, "--work-dir", tmp_path / "work", "--cfg-options", "model.trust_remote_code=True",
                check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "data.pack=True" in run.stderr and "TinyRemoteForCausalLM runs its own code" in run.stderr
    assert "data.pack=False" in run.stderr  # what to set


def test_a_tokenizer_that_needs_a_missing_package_says_which(remote_dir, tmp_path):
    import shutil

    folder = tmp_path / "needs-jieba"
    shutil.copytree(remote_dir, folder)
    (folder / "tokenization_tiny_remote.py").write_text(TOKENIZER_CODE)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny_remote.TinyRemoteTokenizer"]}
    tokenizer_config["tokenizer_class"] = "TinyRemoteTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    run = tuner("chat", folder, "--trust-remote-code", stdin="Hi\n\n", check=False)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[0] == f"tuner chat: error: loading {folder} needs the package jieba"


def test_an_architecture_tuner_cannot_handle_is_one_line(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "foobar", "architectures": ["FoobarForCausalLM"]}))
    vision = tmp_path / "vision"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(vision)
    for folder, what in ((unknown, "is model type 'foobar'"), (vision, "is a CLIPVisionConfig (not a causal LM)")):
        run = tuner("chat", folder, stdin="Hi\n\n", check=False)
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert run.stderr.startswith(f"tuner chat: error: {folder} {what}, which tuner cannot train or run")
        assert "InternLM2 (loaded as Llama)" in run.stderr  # what is supported
