"""Figures written into a run folder."""

from __future__ import annotations

from pathlib import Path

from attnssl.train.metrics_log import MetricsLog


def plot_loss_curve(run_dir: str | Path) -> Path | None:
    """``loss_curve.png``: training loss (and learning rate) against the optimiser step."""
    rows = [r for r in MetricsLog(Path(run_dir) / "metrics.csv").read() if r.get("loss")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(float(r["step"])) for r in rows]
    fig, loss_axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    loss_axis.plot(steps, [float(r["loss"]) for r in rows], color="tab:blue", label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    if rows[0].get("lr"):
        lr_axis = loss_axis.twinx()
        lr_axis.plot(steps, [float(r["lr"]) for r in rows], color="tab:orange", alpha=0.6)
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    loss_axis.set_title(Path(run_dir).name, fontsize=9)
    fig.tight_layout()
    out = Path(run_dir) / "loss_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out
