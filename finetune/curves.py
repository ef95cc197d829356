"""The loss-curve plot of a training run (PNG beside metrics.json, so the tracker logs it as an artifact)."""

from __future__ import annotations

from pathlib import Path

from .train import TrainResult


def plot_curve(result: TrainResult, path: Path, title: str = "") -> Path:
    """Train loss per step and the periodic eval loss against wall-clock seconds of the loop."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.step_elapsed, result.step_losses, label="train", lw=1)
    times = {i + 1: t for i, t in enumerate(result.step_elapsed)}
    evals = [(times.get(s, 0.0), v) for s, v in result.eval_history]
    ax.plot([t for t, _ in evals], [v for _, v in evals], "o-", label="eval (held-out windows)")
    ax.set_xlabel("seconds of training")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss curve")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
