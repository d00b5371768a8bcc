"""The experiment trackers people already watch runs in (train.report_to / --report-to): TensorBoard, Weights &
Biases, SwanLab, MLflow. Each gets the same per-step scalars under the same names (train/loss, train/lr,
train/grad_norm, train/tokens_per_s, ...: what scalars.json holds) and the resolved config as the run's
parameters (section.field: value). Each is an optional package; asking for one that is not installed stops
before training with the line that installs it.

Where a tracker writes follows its own settings, as the HF Trainer's integrations do (WANDB_MODE, SWANLAB_MODE,
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME ...), with these defaults: TensorBoard in RUN_FOLDER/tensorboard;
wandb and SwanLab in the run folder (wandb/, swanlog/); MLflow at MLFLOW_TRACKING_URI, else mlflow's own
default (./mlruns or ./mlflow.db under the directory tuner runs in); SwanLab offline into the run folder when no
API key is set (it would otherwise ask for one on the terminal, and a training must not wait on a prompt).
"""

from __future__ import annotations

import dataclasses
import os

from tuner.config import TRACKERS
from tuner.errors import TunerError

INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb", "swanlab": "pip install swanlab",
           "mlflow": "pip install mlflow  (or mlflow-skinny: the tracking client alone)"}
PROJECT = "tuner"  # (wandb's project, SwanLab's project, MLflow's experiment, unless their settings say otherwise)


def config_params(cfg) -> dict:
    """The resolved config as flat parameters: {'optim.lr': 0.0002, 'lora.r': 16, 'data.path': '...', ...}.
    Values that are not plain (functions, lists, nested sections) as their text."""
    from tuner.config import SECTIONS

    params = {"config.name": cfg.name, "config.path": str(cfg.path)}
    for name in SECTIONS:
        section = getattr(cfg, name)
        if section is None:
            continue
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if callable(value):
                value = getattr(value, "__qualname__", repr(value))
            elif not (value is None or isinstance(value, (bool, int, float, str))):
                value = repr(value)
            params[f"{name}.{f.name}"] = value
    return params


def _need(module: str, name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TunerError(f"--report-to {name} needs the {name} package", hint=INSTALL[name]) from None


class Tracker:
    """log(step, metrics) every step; close(failed) at the end (failed: the training raised, so the tracker
    marks the run failed instead of finished)."""

    def __init__(self, log, close):
        self.log, self.close = log, close


def open_tracker(name: str, cfg, run_dir, say) -> Tracker:
    params = config_params(cfg)
    if name == "tensorboard":
        tensorboard = _need("torch.utils.tensorboard", name)
        writer = tensorboard.SummaryWriter(str(run_dir / "tensorboard"))
        writer.add_text("config", "```\n" + cfg.resolved_text() + "\n```")
        return Tracker(lambda step, m: [writer.add_scalar(f"train/{k}", v, step) for k, v in m.items()],
                       lambda failed: writer.close())
    if name == "wandb":
        wandb = _need("wandb", name)
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=cfg.name, dir=str(run_dir),
                         config=params)
        return Tracker(lambda step, m: run.log({f"train/{k}": v for k, v in m.items()}, step=step),
                       lambda failed: run.finish(exit_code=1 if failed else 0))
    if name == "swanlab":
        swanlab = _need("swanlab", name)
        mode = os.environ.get("SWANLAB_MODE")
        if mode is None and not os.environ.get("SWANLAB_API_KEY") and not _swanlab_logged_in():
            mode = "offline"
            say(f"SwanLab: no API key (SWANLAB_API_KEY or swanlab login): writing offline to {run_dir / 'swanlog'}; "
                "swanlab sync uploads it later")
        run = swanlab.init(project=os.environ.get("SWANLAB_PROJ_NAME", PROJECT), experiment_name=cfg.name,
                           logdir=str(run_dir / "swanlog"), mode=mode, config=params)
        return Tracker(lambda step, m: run.log({f"train/{k}": v for k, v in m.items()}, step=step),
                       lambda failed: run.finish(state="crashed" if failed else "success"))
    if name == "mlflow":
        mlflow = _need("mlflow", name)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        run = mlflow.start_run(run_name=cfg.name)
        mlflow.log_params({k: "None" if v is None else v for k, v in params.items()})
        say(f"MLflow: run {run.info.run_id} at {mlflow.get_tracking_uri()}")
        return Tracker(lambda step, m: mlflow.log_metrics({f"train/{k}": v for k, v in m.items()}, step=step),
                       lambda failed: mlflow.end_run(status="FAILED" if failed else "FINISHED"))
    raise TunerError(f"unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")


def _swanlab_logged_in() -> bool:
    """A key from `swanlab login` (its .netrc) or SwanLab's own settings. SwanLab has no public call for this:
    its settings object is read, and another version without it counts as not logged in (offline is safe)."""
    try:
        from swanlab.sdk.internal.settings import Settings

        return bool(Settings().api_key)
    except Exception:  # noqa: BLE001
        return False
