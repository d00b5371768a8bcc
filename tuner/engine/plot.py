"""loss.png (and metrics.png for preference and RL runs) in the work dir at the end of training, drawn with
matplotlib from the run's steps (all its run folders: a resumed run is one curve, a dashed line where it
resumed), so a run on a remote machine can be judged from one file."""

from __future__ import annotations

from pathlib import Path

from tuner.engine.runstate import read_points

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s"))
# preference and RL metrics, in the order they are drawn when a run logs them
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "reward", "reward_std",
           "kl", "completions/mean_length")


def plot_run(work_dir: Path, title: str) -> list[Path]:
    """The figures written (none when the run has no steps)."""
    import matplotlib

    matplotlib.use("Agg")  # (no display: files only)
    import matplotlib.pyplot as plt

    points = read_points(work_dir)
    if not points.rows:
        return []
    written = [_figure(plt, points, PANELS, Path(work_dir) / "loss.png", title)]
    present = [(m, m) for m in METRICS if any(m in row for row in points.rows)]
    if present:
        written.append(_figure(plt, points, tuple(present), Path(work_dir) / "metrics.png", title))
    return written


def _figure(plt, points, panels, path: Path, title: str) -> Path:
    columns = 2 if len(panels) > 1 else 1
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        steps = [r["step"] for r in points.rows if isinstance(r.get(key), (int, float))]
        values = [r[key] for r in points.rows if isinstance(r.get(key), (int, float))]
        ax.plot(steps, values, linewidth=1)
        for step in points.resumed_at:
            ax.axvline(step, linestyle="--", linewidth=0.8, color="grey")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
    return path
