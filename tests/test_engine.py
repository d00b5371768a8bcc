"""Engine behaviour: stopping safely on signals and bad losses, freezing, checkpointing activations."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tuner.config import load_config
from tuner.engine.loop import Trainer
from tuner.errors import TunerError

from conftest import CONVERSATIONS, scalars, write_config
from test_cli import tuner


def make(tmp_path, tiny_model_dir, data_file, work="work", options=(), **settings):
    return Trainer(load_config(write_config(tmp_path, tiny_model_dir, data_file, **settings), list(options)),
                   work_dir=tmp_path / work)


# The settings of the multi-process tests: 2 processes x batch 1 x accumulation 2 see the
# sequences one process sees with batch 2 x accumulation 2.
MULTI = dict(epochs=2, accum=2, save_steps=3, inputs=["Hi"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    """The one-process reference run of the multi-process tests (a real `tuner train`), run once
    per method for all of them: {lora: (its config, its work dir)}."""
    runs = {}

    def run(lora: bool):
        if lora not in runs:
            folder = tmp_path_factory.mktemp("one_process")
            data = folder / "data.jsonl"
            data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 4))
            cfg = write_config(folder, tiny_model_dir, data, lora=lora, batch_size=2, name="single", **MULTI)
            tuner("train", cfg, "--work-dir", folder / "one")
            runs[lora] = cfg, folder / "one"
        return runs[lora]
    return run


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_same_run(tmp_path, tiny_model_dir, data_file):
    stop_after_2 = ("\nimport os, signal\n\ndef stop(trainer, step, metrics):\n    if step == 2:\n"
                    "        os.kill(os.getpid(), signal.SIGTERM)\n\ncustom_hooks = [stop]\n")
    cfg = write_config(tmp_path, tiny_model_dir, data_file, epochs=2, save_steps=100, dropout=0.1, extra=stop_after_2)
    work = tmp_path / "work"
    stopped = tuner("train", cfg, "--work-dir", work, check=False)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "stopped by SIGTERM after step 2" in stopped.stderr and "--resume auto" in stopped.stderr
    assert (work / "iter_2.pth").exists() and (work / "last_checkpoint").read_text().endswith("iter_2.pth")

    resumed_cfg = write_config(tmp_path, tiny_model_dir, data_file, epochs=2, save_steps=100, dropout=0.1)
    tuner("train", resumed_cfg, "--work-dir", work, "--resume", "auto")
    straight = tmp_path / "straight"
    tuner("train", resumed_cfg, "--work-dir", straight)
    assert [s["loss"] for s in scalars(work)] == [s["loss"] for s in scalars(straight)]


class _CtrlCInWorkers(torch.utils.data.Dataset):
    """Each item is made after a SIGINT has reached the worker making it, as Ctrl-C reaches the whole
    process group."""

    def __getitem__(self, step):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGINT)
        return step * 10


def test_dataloader_workers_outlive_ctrl_c():
    """The training process decides when to stop (after the step, with a checkpoint) and ends its
    workers; a worker that died of the Ctrl-C would turn that stop into a DataLoader error."""
    from tuner.engine.batches import step_batches

    assert list(step_batches(_CtrlCInWorkers(), 0, 6, workers=2, pin=False)) == [0, 10, 20, 30, 40, 50]


def test_nan_loss_stops_naming_the_step_or_is_skipped(tmp_path, tiny_model_dir, data_file, monkeypatch):
    trainer = make(tmp_path, tiny_model_dir, data_file, epochs=1)
    real = Trainer.loss_sum
    calls = {"n": 0}

    def sometimes_nan(self, batch):
        calls["n"] += 1
        loss = real(self, batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(Trainer, "loss_sum", sometimes_nan)
    with pytest.raises(TunerError, match="the loss is nan at step 2; training stopped"):
        trainer.train()
    calls["n"] = 0
    skipping = make(tmp_path, tiny_model_dir, data_file, work="skip", epochs=1, options=["train.nan_policy=skip"])
    losses = skipping.train()
    assert math.isnan(losses[1]) and all(math.isfinite(x) for x in losses[:1] + losses[2:])
    assert all(torch.isfinite(p).all() for p in skipping.model.parameters())


def test_batches_made_in_worker_processes_train_the_same_run(tmp_path, tiny_model_dir, data_file):
    """train.dataloader_num_workers=2 makes each step's batches in forked DataLoader workers, ahead of
    the step: the losses equal those of batches made in the training process."""
    main = make(tmp_path, tiny_model_dir, data_file, epochs=2, options=["train.dataloader_num_workers=0"])
    workers = make(tmp_path, tiny_model_dir, data_file, work="workers", epochs=2,
                   options=["train.dataloader_num_workers=2"])
    losses = main.train()
    assert workers.train() == losses and len(losses) >= 2
    assert main.dataloader_workers == 0 and workers.dataloader_workers == 2


def test_freeze_patterns_keep_weights(tmp_path, tiny_model_dir, data_file):
    trainer = make(tmp_path, tiny_model_dir, data_file, lora=False, epochs=1,
                   options=["model.freeze=embed_tokens,layers\\.0\\."])
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        frozen = "embed_tokens" in name or "layers.0." in name
        assert torch.equal(param, before[name]) == frozen, name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model_dir, data_file, dropout):
    """With dropout too: the recomputed forward draws the same masks (the fused LoRA functions'
    included), as checkpointing restores the RNG state."""
    plain = make(tmp_path, tiny_model_dir, data_file, work="plain", epochs=1, dropout=dropout).train()
    checkpointed = make(tmp_path, tiny_model_dir, data_file, work="gc", epochs=1, dropout=dropout,
                        options=["train.gradient_checkpointing=true"]).train()
    assert checkpointed == pytest.approx(plain, rel=1e-5)


def test_disk_full_while_saving_names_the_intact_checkpoint(tmp_path, tiny_model_dir, data_file, monkeypatch):
    trainer = make(tmp_path, tiny_model_dir, data_file, epochs=1, save_steps=1)
    real_save, calls = torch.save, {"n": 0}

    def full_on_second(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_second)
    with pytest.raises(TunerError, match=r"could not write the checkpoint of step 2 .*No space left on device; "
                                         r"the last good checkpoint \(.*iter_1.pth\) is intact"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "work").glob("iter_*")) == ["iter_1.pth"]


def test_torchrun_command_and_slurm_environment(monkeypatch):
    from tuner.engine import dist

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    command = dist.torchrun_command(["cfg.py", "--work-dir", "w"])
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert command[-5:] == ["tuner.cli", "train", "cfg.py", "--work-dir", "w"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already launched: train here
    assert dist.torchrun_command(["cfg.py"]) is None
    env = dist.slurm_environment({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                  "SLURM_NODELIST": "gpu[03-04],cpu1", "SLURM_NTASKS_PER_NODE": "8(x2)"})
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu03", "MASTER_PORT": "29500"}
    with pytest.raises(TunerError, match="run under srun"):
        dist.slurm_environment({})


@pytest.mark.slow
@pytest.mark.parametrize("strategy,lora", [("ddp", False), ("fsdp", True)], ids=["ddp-full", "fsdp-lora"])
def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path, tiny_model_dir, data_file, lora,
                                                                  strategy, monkeypatch, one_process):
    """torchrun, 2 CPU processes on gloo, batch 1 x accumulation 2 each, against one process
    with batch 2 x accumulation 2: the same sequences per step, so the same losses."""
    single_cfg, one_work = one_process(lora)
    ddp_cfg = write_config(tmp_path, tiny_model_dir, data_file, lora=lora, batch_size=1, name="two_processes", **MULTI)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("PORT", str(29500 + 2 * lora + (strategy == "fsdp")))
    # Every all_reduce of tuner's is checked to be on the training device and counted (tests/collective_check)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent / "collective_check"),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TUNER_COLLECTIVE_LOG", str(tmp_path / "collectives"))
    # FSDP with model.dtype='auto' (the tiny model is float32 in its folder, so the same numbers): ranks >= 1
    # build it on the meta device, where 'auto' once crashed them
    flags = ["--fsdp", "--cfg-options", "model.dtype=auto"] if strategy == "fsdp" else []
    run = tuner("train", ddp_cfg, "--work-dir", tmp_path / "two", *flags)
    assert f"2 processes ({strategy.upper()})" in run.stderr
    reads = [tmp_path / f"collectives.{rank}.reads" for rank in (0, 1)]
    assert "model.safetensors" in reads[0].read_text()
    if strategy == "fsdp":  # rank 1 built the model on the meta device and got its shards from rank 0
        assert "build it on the meta device" in run.stderr
        assert not reads[1].exists() or "model.safetensors" not in reads[1].read_text()
    one, two = scalars(one_work), scalars(tmp_path / "two")
    assert len(one) == len(two) >= 4
    for rank in (0, 1):  # all on the device; tuner's: two float64 pairs per step (tokens + stop flag, loss + tokens)
        calls = (tmp_path / f"collectives.{rank}").read_text().splitlines()  # FSDP's grad-norm ones are float32
        assert all(c.startswith("cpu ") for c in calls)
        assert [c for c in calls if "float64" in c] == ["cpu torch.float64 2"] * (2 * len(two)), calls
    monkeypatch.delenv("TUNER_COLLECTIVE_LOG")
    # Same data per step; only the order of float additions differs (the all-reduce): 1e-4 is
    # far below what one step changes (several percent here) and far above float32 rounding.
    assert [s["loss"] for s in two] == pytest.approx([s["loss"] for s in one], rel=1e-4)
    assert [s["tokens"] for s in two] == [s["tokens"] for s in one]
    # evaluate-chat answered the same (greedy) in both
    last = max(int(p.stem.split("_")[-1]) for p in one_work.glob("eval_outputs_iter_*.txt"))
    assert ((tmp_path / "two" / f"eval_outputs_iter_{last}.txt").read_text() ==
            (one_work / f"eval_outputs_iter_{last}.txt").read_text())
    # the checkpoint holds full tensors: it resumes in one process and converts like any other
    from tuner.convert.hf import pth_to_hf
    from tuner.engine.checkpoint import checkpoints_in

    cfg = load_config(ddp_cfg)
    assert pth_to_hf(cfg, checkpoints_in(tmp_path / "two")[-1], tmp_path / "hf").exists()
    monkeypatch.delenv("NPROC_PER_NODE")
    tuner("train", single_cfg, "--work-dir", tmp_path / "two", "--resume", str(tmp_path / "two" / "iter_3.pth"))
    resumed = scalars(tmp_path / "two")[len(two):]
    assert [s["loss"] for s in resumed] == pytest.approx([s["loss"] for s in one[3:]], rel=1e-4)


@pytest.mark.slow
def test_two_process_resume_after_sigterm_is_exact(tmp_path, tiny_model_dir, data_file, monkeypatch):
    stop_after_2 = ("\nimport os, signal\n\ndef stop(trainer, step, metrics):\n    if step == 2:\n"
                    "        os.kill(os.getpid(), signal.SIGTERM)\n\ncustom_hooks = [stop]\n")
    settings = dict(epochs=2, batch_size=1, accum=2, save_steps=100, dropout=0.1)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("PORT", "29511")
    work = tmp_path / "work"
    stopped = tuner("train", write_config(tmp_path, tiny_model_dir, data_file, extra=stop_after_2, name="stopping",
                                          **settings), "--work-dir", work, check=False)
    assert stopped.returncode != 0 and "stopped by SIGTERM after step 2" in stopped.stderr
    cfg = write_config(tmp_path, tiny_model_dir, data_file, **settings)
    tuner("train", cfg, "--work-dir", work, "--resume", "auto")
    tuner("train", cfg, "--work-dir", tmp_path / "straight")
    assert [s["loss"] for s in scalars(work)] == [s["loss"] for s in scalars(tmp_path / "straight")]


def test_memory_estimate_mfu_and_every_tracker(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """One training reporting to TensorBoard, W&B (offline), SwanLab (no key: offline into the run folder) and
    MLflow (its default store, mlflow.db where tuner runs): each holds every step's loss as scalars.json
    does, under train/loss, and the resolved config as the run's parameters."""
    for module in ("tensorboard", "wandb", "swanlab", "mlflow"):
        pytest.importorskip(module)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("SWANLAB_MODE", "SWANLAB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    trainer = make(tmp_path, tiny_model_dir, data_file, epochs=1,
                   options=["train.report_to=tensorboard,wandb,swanlab,mlflow", "optim.lr=3e-4"])
    trainer.train()
    log = next((tmp_path / "work").glob("*/*.log")).read_text()
    assert "memory estimate" in log and "GiB available" in log and "MFU: against a matmul peak of " in log
    assert re.search(r"mfu: \d+\.\d% of [\d,]+ GFLOP/s", log)
    assert "SwanLab: no API key" in log and "MLflow: run " in log
    steps = scalars(tmp_path / "work")
    losses = [s["loss"] for s in steps]
    assert all(0 < s["mfu"] < 1 for s in steps) and len(losses) >= 3

    events = EventAccumulator(str(next((tmp_path / "work").glob("*/tensorboard")))).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert "lr = 3e-4" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tuner").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [s["step"] for s in steps]
    assert [m.value for m in history] == pytest.approx(losses)
    assert run.data.params["optim.lr"] == "0.0003" and run.data.params["lora.r"] == "8"
    assert run.info.run_name == "tiny_config" and run.info.status == "FINISHED"
    from tuner.engine.hooks import ReportHook

    crashing = ReportHook(["mlflow"])  # (a training that raises marks its tracker runs failed, not finished)
    crashing.before_train(trainer)
    crashing.after_crash(trainer)
    statuses = sorted(r.info.status for r in client.search_runs([run.info.experiment_id]))
    assert statuses == ["FAILED", "FINISHED"]

    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    reader = DataStoreReader()
    reader.open(next((tmp_path / "work").glob("*/swanlog/run-*/run-*.swanlab")))
    swan = {}
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.HasField("scalar") and record.scalar.key == "train/loss":
            swan[record.scalar.step] = record.scalar.value.number
    assert swan == pytest.approx({s["step"]: s["loss"] for s in steps}, rel=1e-6)
    swan_config = next((tmp_path / "work").glob("*/swanlog/run-*/files/config.yaml")).read_text()
    assert "optim.lr:" in swan_config and "value: 0.0003" in swan_config

    runs = list((tmp_path / "work").glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # wandb's own service process writes the file: on a loaded machine it can still be writing when finish()
    # returns (seen once, with the suite and other tests sharing 2 cores)
    deadline = time.time() + 30
    while b"train/mfu" not in runs[0].read_bytes() and time.time() < deadline:
        time.sleep(0.5)
    assert b"train/loss" in runs[0].read_bytes() and b"optim.lr" in runs[0].read_bytes()


def test_a_tracker_that_is_not_installed_says_what_to_install(tmp_path, tiny_model_dir, data_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "swanlab", None)  # (as if not installed: importing it fails)
    from tuner.engine.trackers import open_tracker

    cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file))
    with pytest.raises(TunerError) as e:
        open_tracker("swanlab", cfg, tmp_path, print)
    assert "needs the swanlab package" in str(e.value) and e.value.hint == "pip install swanlab"


def test_flops_per_token_counts_lora_as_two_passes():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuner.config import LoraConfig
    from tuner.engine.budget import flops_per_token
    from tuner.model.adapt import apply_lora

    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    full = flops_per_token(model, lora=False)
    n = sum(p.numel() for p in model.parameters()) - 1000 * 64 - 5 * 64  # not the embedding lookup, not norms
    assert full == pytest.approx(3 * 2 * n)  # weight matmuls only: attention scores are not counted
    lora = flops_per_token(apply_lora(model, LoraConfig(r=8)), lora=True)
    assert lora == pytest.approx(full * 2 / 3)


@pytest.mark.slow
@pytest.mark.parametrize("lora,presets", [
    (True, ["deepspeed_zero2"]), (False, ["deepspeed_zero3_offload"])], ids=["lora", "full"])
def test_deepspeed_zero_on_two_processes_matches_one_process(tmp_path, tiny_model_dir, data_file, lora, presets,
                                                             monkeypatch, one_process):
    """ZeRO-2 (LoRA) and ZeRO-3 with offloading (full) on 2 gloo processes give the losses of one
    process at the same global batch; each also resumes exactly from its own checkpoint (DeepSpeed's
    files read weights-only) and converts. (deepspeed_zero1, deepspeed_zero2_offload and ZeRO-3 with
    LoRA take the same paths in tuner, with another stage number or offload setting handed to
    DeepSpeed: left out to keep the suite's time down; each run here costs ~30 s on 2 cores.)"""
    pytest.importorskip("deepspeed")
    one = [s["loss"] for s in scalars(one_process(lora)[1])]
    ds_cfg = write_config(tmp_path, tiny_model_dir, data_file, lora=lora, batch_size=1, name="zero", **MULTI)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    for k, preset in enumerate(presets):
        monkeypatch.setenv("PORT", str(29530 + 10 * lora + k))
        work = tmp_path / preset
        run = tuner("train", ds_cfg, "--work-dir", work, "--deepspeed", preset)
        # ZeRO-3: built under deepspeed.zero.Init, each process holding only its partitions
        assert ("built partitioned over 2 processes (ZeRO-3)" in run.stderr) == ("zero3" in preset)
        two = [s["loss"] for s in scalars(work)]
        assert two == pytest.approx(one, rel=1e-4), preset
    first = tmp_path / presets[0]
    assert (first / "iter_3_deepspeed").is_dir()
    tuner("train", ds_cfg, "--work-dir", first, "--deepspeed", presets[0], "--resume", str(first / "iter_3.pth"))
    resumed = [s["loss"] for s in scalars(first)][len(one):]
    assert resumed == pytest.approx(one[3:], rel=1e-4)
    from tuner.convert.hf import pth_to_hf
    from tuner.engine.checkpoint import checkpoints_in

    assert pth_to_hf(load_config(ds_cfg), checkpoints_in(first)[-1], tmp_path / "hf").exists()


def test_checkpoint_keys_are_worked_out_with_one_call_into_peft(tiny_model_dir, monkeypatch):
    """Saving a LoRA checkpoint named each weight with one call of get_peft_model_state_dict per parameter
    (420 calls, 2.5-6 s per save); now one per model, giving the same keys."""
    import peft
    from transformers import AutoModelForCausalLM

    from tuner.engine import strategy

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.LoraConfig(r=4, target_modules="all-linear"))
    one_by_one = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            converted = peft.get_peft_model_state_dict(model, state_dict={name: torch.empty(0)})
            one_by_one[name] = next(iter(converted)) if converted else name
    calls = []
    real = peft.get_peft_model_state_dict
    monkeypatch.setattr(peft, "get_peft_model_state_dict", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):  # three saves
        state = strategy.model_state(model, sharded=False)
    assert len(calls) == 1
    assert strategy._saved_key_map(model) == one_by_one and len(one_by_one) > 4
    assert set(state) == set(one_by_one.values()) and all(v.device.type == "cpu" for v in state.values())
    assert set(state) == set(real(model))  # the keys PEFT itself saves


class _InfiniteGradient(torch.autograd.Function):
    """The loss as it is, its gradient infinite: a finite loss whose update would be garbage."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("fault", ["nan_loss", "inf_gradient"])
@pytest.mark.parametrize("strategy", ["single", "deepspeed"])
def test_a_skipped_step_leaves_the_weights_as_they_were(tmp_path, tiny_model_dir, data_file, monkeypatch, fault,
                                                        strategy):
    """nan_policy='skip': a step whose loss is not finite, or whose gradient norm is not, changes no weight
    (DeepSpeed included: its update must not be applied before the check)."""
    from tuner.engine.hooks import FunctionHook

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "29531"}.items():
            monkeypatch.setenv(key, value)
    real_loss, real_train, calls, after_step = Trainer.loss_sum, Trainer._train, {"n": 0}, {}

    def faulty(self, batch):  # the second step's loss (one micro-batch a step)
        calls["n"] += 1
        loss = real_loss(self, batch)
        if calls["n"] != 2:
            return loss
        return loss * float("nan") if fault == "nan_loss" else _InfiniteGradient.apply(loss)

    def watched(self, stop):
        calls["n"] = 0
        after_step[0] = {n: p.detach().clone() for n, p in self.raw_model.named_parameters() if p.requires_grad}
        self.hooks.append(FunctionHook(lambda t, step, metrics: after_step.__setitem__(step, {
            n: p.detach().clone() for n, p in t.raw_model.named_parameters() if p.requires_grad})))
        return real_train(self, stop)

    monkeypatch.setattr(Trainer, "loss_sum", faulty)
    monkeypatch.setattr(Trainer, "_train", watched)
    trainer = Trainer(load_config(write_config(tmp_path, tiny_model_dir, data_file, epochs=1),
                                  ["train.nan_policy=skip", "train.max_steps=2"]), work_dir=tmp_path / "skip",
                      deepspeed="deepspeed_zero2" if strategy == "deepspeed" else None)
    losses = trainer.train()
    assert len(losses) == 2 and math.isfinite(losses[0]) and sorted(after_step) == [0, 1]  # step 2: no hook
    assert any(not torch.equal(after_step[0][n], after_step[1][n]) for n in after_step[0])  # step 1 trained
    final = {n: p.detach() for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    assert all(torch.equal(after_step[1][n], final[n]) for n in final), "the skipped step changed weights"


def test_fp16_scales_the_loss_and_skips_an_overflow(tmp_path, tiny_model_dir, data_file, monkeypatch):
    """train.dtype='fp16': the loss is scaled (a GradScaler), unscaled before clipping, an overflowing step
    is skipped with the scale halved, not stopped; the scaler's state is in the checkpoint and resumes."""
    from tuner.engine.checkpoint import load_checkpoint

    real_loss, calls = Trainer.loss_sum, {"n": 0}

    def overflow_on_second(self, batch):
        calls["n"] += 1
        loss = real_loss(self, batch)
        return _InfiniteGradient.apply(loss) if calls["n"] == 2 else loss

    monkeypatch.setattr(Trainer, "loss_sum", overflow_on_second)
    from tuner.engine.budget import Peak

    monkeypatch.setattr("tuner.engine.loop.matmul_peak", lambda *a, **k: Peak(1e11, "test"))  # fp16 matmuls are slow on CPUs
    trainer = make(tmp_path, tiny_model_dir, data_file, epochs=1, save_steps=3,
                   options=["train.dtype=fp16", "train.max_steps=3"])
    losses = trainer.train()
    assert trainer.scaler.is_enabled() and len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert trainer.scaler.get_scale() == 2.0**16 / 2  # halved once, at the overflow
    log = next((tmp_path / "work").glob("*/*.log")).read_text()
    assert "step 2: fp16 gradients overflowed; update skipped, loss scale now 32768" in log
    state = load_checkpoint(tmp_path / "work" / "iter_3.pth")
    assert state["scaler"]["scale"] == 32768.0
    resumed = make(tmp_path, tiny_model_dir, data_file, epochs=1, options=["train.dtype=fp16", "train.max_steps=4"])
    resumed.resume = str(tmp_path / "work" / "iter_3.pth")
    resumed.setup()
    assert resumed.scaler.get_scale() == 32768.0


def test_a_checkpoint_written_before_the_strategy_objects_resumes_exactly(tmp_path, tiny_model_dir, data_file):
    """tests/fixtures/lora_iter_2_before_strategy_objects.pth was written at step 2 by the loop as it was before
    the Strategy objects (commit f2cedaf), with this config and tiny model (dropout on, so the saved RNG
    states matter): resumed now, the remaining steps give the losses of a straight run."""
    import shutil

    settings = dict(epochs=2, save_steps=2, dropout=0.1)
    straight = make(tmp_path, tiny_model_dir, data_file, work="straight", **settings).train()
    work = tmp_path / "resumed"
    work.mkdir()
    old = work / "iter_2.pth"
    shutil.copyfile(Path(__file__).parent / "fixtures" / "lora_iter_2_before_strategy_objects.pth", old)
    trainer = Trainer(load_config(write_config(tmp_path, tiny_model_dir, data_file, **settings)), work_dir=work,
                      resume=str(old))
    resumed = trainer.train()
    assert trainer.start_step == 2 and len(resumed) == len(straight) - 2
    # The fixture's first two steps ran on the CPU that wrote it; another CPU's kernels round differently,
    # so 1e-4 (as the other cross-run tests): far below what one step changes (several percent).
    assert resumed == pytest.approx(straight[2:], rel=1e-4)


def test_dtype_names_are_one_vocabulary_and_auto_picks_fp16_on_a_gpu_without_native_bf16(monkeypatch, tmp_path,
                                                                                           tiny_model_dir, data_file):
    """Every dtype field and flag takes the same names (auto, fp32/float32, bf16/bfloat16, fp16/float16);
    train.dtype='auto' on a GPU whose bf16 is only emulated (V100, T4) computes in fp16 (with the GradScaler)."""
    from tuner.cli import build_parser
    from tuner.dtypes import NAMES
    from tuner.model.device import resolve_compute_dtype

    for name in NAMES:
        cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file), [f"model.dtype={name}", f"train.dtype={name}"])
        assert cfg.model.dtype == cfg.train.dtype == name
        assert build_parser().parse_args(["chat", "x", "--torch-dtype", name]).torch_dtype == name
    assert resolve_compute_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_compute_dtype("bfloat16", torch.device("cpu")) == resolve_compute_dtype("bf16", torch.device("cpu"))
    native = {"bf16": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native["bf16"])
    assert resolve_compute_dtype("auto", torch.device("cuda")) == torch.float16  # emulated only: fp16
    native["bf16"] = True
    assert resolve_compute_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_sharded_strategies_refuse_qlora_and_deepspeed_refuses_fp16(tmp_path, tiny_model_dir, data_file, capsys):
    """QLoRA's quantized weights cannot be sharded (FSDP, ZeRO-3): refused naming what works; fp16 under
    DeepSpeed would have no loss scale: refused, with exit 1 from the CLI."""
    from tuner.cli import main
    from tuner.engine import strategy

    qlora = load_config(write_config(tmp_path, tiny_model_dir, data_file), ["model.quantization=4bit"])
    for chosen in (strategy.FSDP(), strategy.DeepSpeed("deepspeed_zero3")):
        with pytest.raises(TunerError, match="QLoRA.*cannot be sharded") as refused:
            chosen.configure(qlora, torch.float32, print)
        assert "deepspeed_zero2" in refused.value.hint
    strategy.DeepSpeed("deepspeed_zero2").configure(qlora, torch.float32, print)  # ZeRO-2 takes QLoRA
    cfg = write_config(tmp_path, tiny_model_dir, data_file)
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w"), "--deepspeed", "deepspeed_zero2",
                 "--cfg-options", "train.dtype=fp16"]) == 1
    err = capsys.readouterr().err
    assert "fp16 under --deepspeed" in err and "Traceback" not in err


def test_deepspeed_config_holds_only_keys_older_deepspeed_knows(tmp_path, tiny_model_dir, data_file):
    """zero_optimization.compute_grad_norm exists from DeepSpeed 0.19.7 (default on; absent in 0.19.5 and
    older): tuner writes it only over a JSON that turned it off."""
    import json as _json

    from tuner.engine import zero

    cfg = load_config(write_config(tmp_path, tiny_model_dir, data_file))
    assert "compute_grad_norm" not in zero.ds_config("deepspeed_zero2", cfg, torch.float32, print)["zero_optimization"]
    custom = tmp_path / "ds.json"
    custom.write_text(_json.dumps({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}))
    said = []
    assert zero.ds_config(str(custom), cfg, torch.float32, said.append)["zero_optimization"]["compute_grad_norm"]
    assert any("compute_grad_norm=false" in s for s in said)


def test_resuming_with_another_number_of_processes_keeps_the_steps_or_refuses(tmp_path, tiny_model_dir, data_file):
    """A checkpoint written by 2 processes x batch 1 resumes in 1 process only at the same sequences per step
    (batch 2: the data order and step count are kept, said in the log); at batch 1 the steps would change:
    refused, naming the settings that work. (It used to log "the data order is kept" either way.)"""
    from tuner.engine.checkpoint import load_checkpoint

    make(tmp_path, tiny_model_dir, data_file, epochs=1, batch_size=2, save_steps=2,
         options=["train.max_steps=2"]).train()
    path = tmp_path / "work" / "iter_2.pth"
    state = load_checkpoint(path)
    assert state["sequences_per_step"] == 2
    state.update(world_size=2, rng=state["rng"] * 2, sequences_per_step=2)  # as 2 processes x batch 1 write it
    torch.save(state, tmp_path / "written_by_two.pth")
    os.replace(tmp_path / "written_by_two.pth", path)  # (the loaded one is memory-mapped: not written over)
    same = make(tmp_path, tiny_model_dir, data_file, epochs=1, batch_size=2, options=["train.max_steps=3"])
    same.resume = str(path)
    assert len(same.train()) == 1
    assert any("with the same 2 sequences per step: the data order and step count are kept" in p.read_text()
               for p in (tmp_path / "work").glob("*/*.log"))
    other = make(tmp_path, tiny_model_dir, data_file, epochs=1, batch_size=1, options=["train.max_steps=3"])
    other.resume = str(path)
    with pytest.raises(TunerError, match="written by 2 processes with 2 sequences per step") as refused:
        other.train()
    assert "NPROC_PER_NODE=2" in refused.value.hint


def test_deepspeed_older_than_the_one_that_skips_non_finite_updates_is_refused(monkeypatch):
    """DeepSpeed 0.16.0-0.19.7 apply an fp32 update whose gradient norm is not finite (measured with the
    skipped-step test above): refused with the version to install."""
    deepspeed = pytest.importorskip("deepspeed")
    from tuner.engine import zero

    monkeypatch.setattr(deepspeed, "__version__", "0.19.7")
    with pytest.raises(TunerError, match="DeepSpeed 0.19.7 applies an update") as refused:
        zero._deepspeed()
    assert "deepspeed>=0.19.8" in refused.value.hint


@pytest.mark.parametrize("case", ["lora", "full", "own conf", "no jemalloc", "own glibc", "gpu", "gpu full",
                                  "system"])
def test_allocator_settings_of_the_restart(monkeypatch, case):
    """What `tuner train` restarts itself with (os.execve caught): jemalloc with freed memory kept for
    LoRA, glibc's settings for full fine-tuning on a CPU even where jemalloc is installed (measured faster
    than jemalloc as it comes or kept), a MALLOC_CONF of the user's untouched, glibc's heap kept where no
    library is installed unless the user set glibc's own settings, jemalloc as it comes on a GPU machine
    (LoRA or full), and no restart with TUNER_MALLOC=system."""
    from pathlib import Path as P

    from tuner.engine import allocator

    for name in ("TUNER_MALLOC", "MALLOC_CONF", "LD_PRELOAD", allocator.SWITCHED, "GLIBC_TUNABLES",
                 *allocator.GLIBC_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "in_use", lambda: "glibc")
    library = None if case in ("no jemalloc", "own glibc") else ("jemalloc", P("/x/libjemalloc.so.2"))
    monkeypatch.setattr(allocator, "find_library", lambda: library)
    monkeypatch.setattr(allocator, "has_gpu", lambda: case.startswith("gpu"))
    env_of = {"own conf": {"MALLOC_CONF": "narenas:2"}, "own glibc": {"MALLOC_MMAP_THRESHOLD_": "65536"},
              "system": {"TUNER_MALLOC": "system"}}
    for name, value in env_of.get(case, {}).items():
        monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setattr(allocator.os, "execve", lambda exe, argv, env: started.append(env))
    allocator.restart_with_faster_allocator(["train", "cfg.py"], lora=not case.endswith("full"))
    if case in ("own glibc", "system"):
        assert started == []
        return
    env = started[0]
    if library is None or case == "full":
        assert {k: env[k] for k in allocator.GLIBC_SETTINGS} == allocator.GLIBC_SETTINGS and "LD_PRELOAD" not in env
        return
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so.2" and env[allocator.SWITCHED] == "jemalloc"
    assert env.get("MALLOC_CONF") == {"lora": allocator.JEMALLOC_CONF, "own conf": "narenas:2"}.get(case)


GLIBC_CACHES_PROBE = """
import ctypes
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes, libc.mallinfo2.restype = ctypes.c_void_p, [ctypes.c_void_p], Info
pairs = [(libc.malloc(40), libc.malloc(40)) for _ in range(7)]  # each freed block has a live one beside it
before = libc.mallinfo2()
for block, _ in pairs:
    libc.free(block)
after = libc.mallinfo2()
print(before.uordblks - after.uordblks, after.fsmblks)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_glibc_honours_the_cache_settings_of_the_restart():
    """GLIBC_TUNABLES names glibc ignores without a word when misspelt: run a process with the
    environment `tuner train` restarts with (no jemalloc installed) and see that small freed blocks go
    back to the heap, neither held in the per-thread cache (counted as in use) nor in a fast bin."""
    from tuner.engine import allocator

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    given = {**env, **allocator.GLIBC_SETTINGS}
    freed = {}
    for name, environment in (("as started", env), ("restart", given)):
        out = subprocess.run([sys.executable, "-c", GLIBC_CACHES_PROBE], env=environment, capture_output=True,
                             text=True, check=True).stdout.split()
        freed[name] = (int(out[0]), int(out[1]))
    assert freed["as started"][0] == 0  # (the probe can fail: glibc's own cache holds all 7)
    assert freed["restart"] == (7 * 48, 0), freed
    loader = next((p for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1") if Path(p).exists()), None)
    if loader:  # the tunables glibc lists as set, which shows those above zero spelt right
        listed = subprocess.run([loader, "--list-tunables"], env=given, capture_output=True, text=True).stdout
        for tunable in given["GLIBC_TUNABLES"].split(":"):
            name, value = tunable.split("=")
            assert f"{name}: {int(value):#x} " in listed, (tunable, listed)


def test_weights_left_in_the_mapped_checkpoint_get_their_own_memory(tmp_path, tiny_model_dir, data_file):
    """transformers' tensors are views of the memory-mapped .safetensors file, which then stays mapped
    (and counted in the process's memory) while one of them lives; own_memory copies them out, the same
    values and ties, and the file is unmapped. A CPU training run's model holds no such view."""
    import gc
    import shutil

    from tuner.config import ModelConfig
    from tuner.model.load import load_model, own_memory

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)  # a file this test alone maps
    checkpoint = str((folder / "model.safetensors").resolve())
    mapped = lambda: checkpoint in Path("/proc/self/maps").read_text()  # noqa: E731
    model = load_model(ModelConfig(path=str(folder)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert mapped() and any(not p.untyped_storage().resizable() for p in model.parameters())
    assert own_memory(model) >= sum(p.numel() * 4 for p in model.parameters())
    gc.collect()
    assert not mapped()
    assert all(p.untyped_storage().resizable() for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert own_memory(model) == 0

    trainer = make(tmp_path, folder, data_file, epochs=1)
    trainer.setup()
    assert all(p.untyped_storage().resizable() for p in trainer.raw_model.parameters() if p.dtype.is_floating_point)


def test_adamw_on_cpu_is_the_fused_kernel_and_steps_as_the_plain_one():
    """optim.name='adamw' takes PyTorch's fused AdamW on a CPU too (4-5x faster a step there): the same
    parameters as the foreach implementation after steps with weight decay, to fp32 rounding."""
    from tuner.config import OptimConfig
    from tuner.engine.optim import build_optimizer

    torch.manual_seed(0)
    start = [torch.randn(16, 576), torch.randn(1536, 16), torch.randn(576)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(4)]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
        optimizer = (build_optimizer(params, cfg, torch.device("cpu")) if fused else
                     torch.optim.AdamW(params, lr=1e-2, betas=cfg.betas, weight_decay=0.1, foreach=True))
        assert optimizer.defaults["fused"] is (True if fused else None)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    for fused, plain, first in zip(*results, start):
        assert not torch.equal(fused, first)
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
