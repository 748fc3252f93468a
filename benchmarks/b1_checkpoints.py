"""The protocol-B1 checkpoints ``b1_pretrain.py`` left behind, for benchmarks that read them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch.nn as nn

from attnssl.eval.evaluate import TrainedBackbone, load_trained_backbone, random_init_backbone
from benchmarks.helpers import ROOT

B1_JSON = ROOT / "benchmarks" / "results" / "b1.json"


def fp32_checkpoints(b1_json: Path = B1_JSON) -> Iterator[tuple[dict, TrainedBackbone]]:
    """Each fp32 row of ``b1.json`` whose run folder is still there, with its backbone."""
    for row in json.loads(Path(b1_json).read_text())["rows"]:
        run_dir = Path(row["run_dir"])
        if row["precision"] != "32":
            continue
        if not run_dir.is_dir():
            print(f"skipping {row['method']}: its run folder {run_dir} is gone")
            continue
        yield row, load_trained_backbone(run_dir)


def untrained_backbone(loaded: TrainedBackbone) -> nn.Module:
    """The backbone the run started from (same config and seed), untrained."""
    return random_init_backbone(loaded.config, loaded.backbone.patch_embed.img_size[0],
                                loaded.train.channels)
