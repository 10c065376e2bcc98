"""Loss-curve plot of a training run."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curves(histories: dict[str, list[dict]], path) -> Path | None:
    """One PNG with the training loss of every stage (x: step within the stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for stage, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, marker=".", label=stage)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step (per stage)")
    ax.set_ylabel("training loss")
    ax.set_title("ProtLLM training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
