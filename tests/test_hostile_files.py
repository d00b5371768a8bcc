"""Files a careless user or an attacker hands tuner: a crafted checkpoint never runs code, a corrupt
peak_flops.json is measured again, an unwritable work dir is one line, checkpoints reach the disk."""

import json
import os

import pytest

from conftest import write_config
from test_cli import tuner


class _RunsCode:
    """Unpickling this calls open(...).write(...): what a crafted .pth does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_crafted_checkpoint_is_refused_and_never_runs(tmp_path, tiny_model_dir, data_file):
    import torch

    marker = tmp_path / "pwned"
    crafted = tmp_path / "iter_5.pth"
    torch.save({"step": 5, "method": "lora", "model": {}, "payload": _RunsCode(marker)}, crafted)
    cfg = write_config(tmp_path, tiny_model_dir, data_file)
    for command in (("convert", "pth_to_hf", cfg, crafted, tmp_path / "hf"),
                    ("train", cfg, "--work-dir", tmp_path / "work", "--resume", crafted)):
        run = tuner(*command, check=False)
        assert run.returncode != 0 and not marker.exists(), run.stderr
        assert "does not unpickle (loading it could run code)" in run.stderr and "Traceback" not in run.stderr
        assert "it refers to exec" in run.stderr
    assert not (tmp_path / "hf").exists()


def test_checkpoints_written_by_tuner_load_safely(tmp_path, tiny_model_dir, data_file):
    """What tuner writes (tensors, optimizer and scheduler states, RNG states) loads with weights_only."""
    from tuner.engine.checkpoint import checkpoints_in, load_checkpoint

    cfg = write_config(tmp_path, tiny_model_dir, data_file, epochs=1, save_steps=1)
    tuner("train", cfg, "--work-dir", tmp_path / "work", "--cfg-options", "train.max_steps=1")
    state = load_checkpoint(checkpoints_in(tmp_path / "work")[-1])
    assert state["step"] == 1 and state["optimizer"]["state"] and isinstance(state["rng"], list)
    assert all(not name.endswith(".tmp") for name in os.listdir(tmp_path / "work"))


@pytest.mark.parametrize("content", ["", "{", "[]", '"fast"', "0", "-5", "NaN", '{"cpu|torch.float32": -1}',
                                     '{"cpu|torch.float32": NaN}', '{"cpu|torch.float32": "x"}'])
def test_a_corrupt_peak_flops_file_is_measured_again(tmp_path, monkeypatch, content):
    import torch

    from tuner.engine import budget

    monkeypatch.setenv("TUNER_CACHE", str(tmp_path))
    path = budget.peak_flops_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    peak = budget.matmul_peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < peak < 1e15
    saved = json.loads(path.read_text())  # rewritten whole, with the new figure
    assert isinstance(saved, dict) and all(isinstance(v, float) and v > 0 for v in saved.values())
    assert budget.matmul_peak_flops(torch.device("cpu"), torch.float32) == peak  # read back, not measured


def test_an_unwritable_work_dir_is_one_line(tmp_path, tiny_model_dir, data_file):
    if os.geteuid() == 0:  # root writes anywhere: a path under a regular file cannot be created by anyone
        work = tmp_path / "a_file" / "work"
        (tmp_path / "a_file").write_text("not a folder")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        work = tmp_path / "locked" / "work"
    cfg = write_config(tmp_path, tiny_model_dir, data_file)
    run = tuner("train", cfg, "--work-dir", work, check=False)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert f"cannot write the work dir {work}" in run.stderr


def test_a_crafted_deepspeed_checkpoint_is_refused_and_never_runs(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """DeepSpeed unpickles its checkpoint files with weights_only=False; tuner has it read them with
    weights_only=True and an allow-list of DeepSpeed's own classes: its checkpoint resumes, and a crafted
    file in iter_N_deepspeed/ is refused without running."""
    import torch

    pytest.importorskip("deepspeed")
    from tuner.config import load_config
    from tuner.engine.loop import Trainer
    from tuner.errors import TunerError

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29532"}.items():
        monkeypatch.setenv(key, value)
    cfg = write_config(tmp_path, tiny_model_dir, data_file, epochs=1, save_steps=2)
    work = tmp_path / "work"
    Trainer(load_config(cfg, ["train.max_steps=2"]), work_dir=work, deepspeed="deepspeed_zero2").train()
    # (DeepSpeed's own files load with the allow-list: the 2-process ZeRO resume in test_engine.py)
    marker = tmp_path / "pwned"
    (optim,) = (work / "iter_2_deepspeed").rglob("*optim_states.pt")
    state = torch.load(optim, weights_only=False)
    state["payload"] = _RunsCode(marker)
    torch.save(state, optim)
    crafted = Trainer(load_config(cfg, ["train.max_steps=3"]), work_dir=work, resume="auto", deepspeed="deepspeed_zero2")
    with pytest.raises(TunerError, match="does not unpickle"):
        crafted.train()
    assert not marker.exists()
