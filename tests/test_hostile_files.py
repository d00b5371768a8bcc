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
                                     '{"cpu|torch.float32": NaN}', '{"cpu|torch.float32": "x"}', "KEY: 1e30",
                                     'KEY: {"flops": -1}', 'KEY: {"flops": NaN}', 'KEY: {"flops": true}'])
def test_a_corrupt_peak_flops_file_is_measured_again(tmp_path, monkeypatch, content):
    import torch

    from tuner.engine import budget

    monkeypatch.setenv("TUNER_CACHE", str(tmp_path))
    monkeypatch.setattr(budget, "CPU_PEAK_SHAPES", ((256, 256, 256),))  # (the file's handling is tested here)
    path = budget.peak_flops_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = budget.peak_key(torch.device("cpu"), torch.float32)
    path.write_text("{" + content.replace("KEY", json.dumps(key)) + "}" if content.startswith("KEY") else content)
    peak = budget.matmul_peak_flops(torch.device("cpu"), torch.float32)  # (a bare number: an older tuner's format)
    assert 1e8 < peak < 1e15
    saved = json.loads(path.read_text())  # rewritten whole, with the new figure
    assert isinstance(saved, dict) and isinstance(saved[key]["flops"], float) and saved[key]["flops"] == peak
    assert budget.matmul_peak_flops(torch.device("cpu"), torch.float32) == peak  # read back, not measured


def test_the_peak_is_kept_per_cpu_and_thread_count_and_raised_by_a_faster_step(tmp_path, monkeypatch):
    """MFU's peak: keyed by the CPU's model, the dtype and the threads (a figure measured with 1 thread is not
    used with 2); the best over several sizes; a step faster than the cached figure raises it, and the log says
    where each figure came from."""
    import torch

    from tuner.engine import budget

    monkeypatch.setenv("TUNER_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    first = budget.matmul_peak(cpu, torch.float32)
    assert first.source.startswith("measured now, best of up to 5 timings at 512x512x512/1024x1024x1024/2048x2048x2048/"
                                   "4096x1024x1024/")
    key = budget.peak_key(cpu, torch.float32)
    assert key.endswith(f":torch.float32:{threads} threads") and budget._device_name(cpu) in key
    again = budget.matmul_peak(cpu, torch.float32)
    assert again.flops == first.flops and again.source.startswith("measured 20")  # cached, with when
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert budget.peak_key(cpu, torch.float32) != key
    finally:
        torch.set_num_threads(threads)
    faster = budget.matmul_peak(cpu, torch.float32, at_least=first.flops * 100)  # (a step beat the cached figure)
    assert faster.flops == first.flops * 100 and faster.source.startswith("a training step's speed")
    assert budget.matmul_peak(cpu, torch.float32).flops == faster.flops  # kept


def test_a_peak_cached_at_other_shapes_is_measured_again(tmp_path, monkeypatch):
    """The figure depends on the shapes timed (squares alone read a 2-core Xeon's AMX bf16 peak 18% low): one
    cached at other shapes, as an older tuner wrote it, is measured again, and the shapes are kept with it."""
    import time

    import torch

    from tuner.engine import budget

    monkeypatch.setenv("TUNER_CACHE", str(tmp_path))
    monkeypatch.setattr(budget, "CPU_PEAK_SHAPES", ((256, 128, 512),))
    cpu = torch.device("cpu")
    key = budget.peak_key(cpu, torch.float32)
    path = budget.peak_flops_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({key: {"flops": 1e6, "measured": time.time(), "sizes": [512, 1024, 2048]}}))
    peak = budget.matmul_peak(cpu, torch.float32)
    assert peak.source.startswith("measured now, best of up to 5 timings at 256x128x512") and peak.flops > 1e8
    assert json.loads(path.read_text())[key]["shapes"] == [[256, 128, 512]]
    assert budget.matmul_peak(cpu, torch.float32).source.startswith("measured 20")  # read back now


def test_a_step_faster_than_the_cached_peak_measures_it_again(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """A cached peak far too low (measured while the machine was busy) would put MFU above 100%: the first step
    that beats it measures the peak again, the log says so, and no step reports more than 100%."""
    import time

    import torch

    from tuner.config import load_config
    from tuner.engine import budget
    from tuner.engine.loop import Trainer

    from conftest import scalars

    monkeypatch.setenv("TUNER_CACHE", str(tmp_path / "cache"))
    path = budget.peak_flops_file()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({budget.peak_key(torch.device("cpu"), torch.float32): {
        "flops": 1e6, "measured": time.time(), "shapes": [list(s) for s in budget.CPU_PEAK_SHAPES]}}))
    cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file), ["train.max_steps=3"])
    Trainer(cfg, work_dir=tmp_path / "work").train()
    log = next((tmp_path / "work").glob("*/*.log")).read_text()
    assert "MFU: against a matmul peak of 0 GFLOP/s (measured " in log
    assert "MFU: step 1 ran faster than the cached matmul peak; peak now " in log
    assert all(0 < s["mfu"] <= 1 for s in scalars(tmp_path / "work"))
    assert budget.matmul_peak_flops(torch.device("cpu"), torch.float32) > 1e9  # the new figure was kept


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
