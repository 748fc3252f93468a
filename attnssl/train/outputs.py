"""What a finished (or stopped) run leaves in its folder besides checkpoints: the exported
backbone, ``metrics.json`` and the loss curve."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.nn as nn

from attnssl.config import Config
from attnssl.train.environment import machine_description


def write_run_outputs(run_dir: Path, config: Config, summary: dict, started: float,
                      backbone: nn.Module) -> dict:
    from safetensors.torch import save_file

    from attnssl.report import plot_loss_curve

    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()},
              str(run_dir / "backbone.safetensors"))
    metrics = {
        "method": config.method.name, "dataset": config.data.dataset,
        "precision": summary["precision"], "precision_requested": config.trainer.precision,
        "steps": summary["step"],
        "images_per_second": summary["images_per_second"],
        "train_seconds": summary["train_seconds"], "skipped_steps": summary["skipped_steps"],
        "wall_seconds": time.perf_counter() - started, "machine": machine_description(),
    }
    if "eval" in summary:
        metrics["eval"] = summary["eval"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_loss_curve(run_dir)
    return metrics
