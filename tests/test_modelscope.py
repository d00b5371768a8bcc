"""ModelScope: modelscope://ORG/NAME (or ORG/NAME with TUNER_HUB=modelscope) for models and datasets,
through the real `modelscope` package's snapshot functions (pointed here at local folders), and the
one-line errors offline or without the package."""

import json
import sys

import pytest

from tuner.errors import TunerError


@pytest.fixture
def snapshots(monkeypatch, tmp_path, tiny_model_dir):
    """The modelscope package's snapshot functions, answering from local folders (no network)."""
    snapshot = pytest.importorskip("modelscope.hub.snapshot_download")
    data = tmp_path / "ms_dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}."})
                                              + "\n" for i in range(6)))
    (data / "README.md").write_text("a dataset card")
    asked = []

    def model(repo, **kwargs):
        asked.append(("model", repo))
        return str(tiny_model_dir)

    def dataset(repo, **kwargs):
        asked.append(("dataset", repo))
        return str(data)

    monkeypatch.setattr(snapshot, "snapshot_download", model)
    monkeypatch.setattr(snapshot, "dataset_snapshot_download", dataset)
    return asked


def test_models_and_datasets_load_from_modelscope(snapshots, tokenizer, tiny_model_dir, monkeypatch):
    from tuner.config import DataConfig
    from tuner.data.dataset import build_sequences
    from tuner.generation.load import load_chat_model
    from tuner.model.load import resolve_model_path

    model, _, _ = load_chat_model("modelscope://Shanghai_AI_Laboratory/tiny")
    assert model.config.hidden_size == 64 and snapshots == [("model", "Shanghai_AI_Laboratory/tiny")]
    monkeypatch.setenv("TUNER_HUB", "modelscope")
    assert resolve_model_path("Shanghai_AI_Laboratory/other") == str(tiny_model_dir)
    assert snapshots[-1] == ("model", "Shanghai_AI_Laboratory/other")
    monkeypatch.delenv("TUNER_HUB")
    sequences, report = build_sequences(DataConfig(path="modelscope://AI-ModelScope/alpaca-tiny", format="alpaca",
                                                   cache=False), tokenizer, say=lambda _: None)
    assert report.stats.samples == 6 and ("dataset", "AI-ModelScope/alpaca-tiny") in snapshots


def test_offline_or_without_the_package_is_one_clear_line(monkeypatch, tmp_path):
    from tuner.model.load import resolve_model_path

    snapshot = pytest.importorskip("modelscope.hub.snapshot_download")

    def offline(repo, **kwargs):
        raise ConnectionError("Failed to resolve 'www.modelscope.cn'")

    monkeypatch.setattr(snapshot, "snapshot_download", offline)
    with pytest.raises(TunerError, match="could not download the model 'org/name' from ModelScope .*resolve"):
        resolve_model_path("modelscope://org/name")
    monkeypatch.setitem(sys.modules, "modelscope", None)
    monkeypatch.setitem(sys.modules, "modelscope.hub", None)
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)
    with pytest.raises(TunerError, match="needs the package modelscope") as e:
        resolve_model_path("modelscope://org/name")
    assert e.value.hint == "pip install modelscope"
    with pytest.raises(TunerError, match="modelscope://ORG/NAME"):
        resolve_model_path("modelscope://just-a-name")
