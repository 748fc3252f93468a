"""``attnssl export``: a run's pretrained backbone as ``model.safetensors`` plus ``config.json``.

The folder follows timm's local-folder format: ``config.json`` holds ``architecture`` (a timm
ViT entry point), ``model_args`` (our size, patch, class tokens, image size) and
``pretrained_cfg`` (input size, normalisation), so

    timm.create_model("local-dir:EXPORT_DIR", pretrained=True)

rebuilds the backbone with timm alone when it uses timm's own parts: softmax attention and
the standard block (``timm_loadable`` in the file says so). Every export, CBSA and CBT
included, loads back with :func:`load_exported`, which rebuilds it from the ``attnssl``
section. Weights are safetensors (no pickle, so loading runs no code); files are written
atomically (:func:`attnssl.train.checkpoint.atomic_write`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from attnssl.train.checkpoint import atomic_write

TIMM_ARCHITECTURE = "vit_base_patch16_224"  # its size arguments are overridden by model_args
TIMM_ATTENTIONS = ("softmax", "softmax_explicit")


def timm_model_args(backbone: nn.Module, model_cfg) -> dict:
    """The keyword arguments that rebuild ``backbone`` with timm's ``VisionTransformer``."""
    from attnssl.nn.vit import resolve_size

    size = resolve_size(model_cfg)
    return {
        "img_size": backbone.patch_embed.img_size[0], "patch_size": size.patch_size,
        "in_chans": backbone.patch_embed.proj.in_channels, "num_classes": 0,
        "embed_dim": size.embed_dim, "depth": size.depth, "num_heads": size.num_heads,
        "mlp_ratio": size.mlp_ratio, "qkv_bias": model_cfg.qkv_bias, "dynamic_img_size": True,
        "reg_tokens": backbone.num_reg_tokens,
    }


def export_backbone(target: str | Path, out_dir: str | Path,
                    overrides: list[str] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` of a run's evaluated backbone."""
    from safetensors.torch import save_file

    from attnssl.config import config_to_dict
    from attnssl.eval.evaluate import load_trained_backbone

    loaded = load_trained_backbone(target, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, backbone = loaded.config, loaded.backbone
    mean, std = loaded.train.mean_std
    args = timm_model_args(backbone, config.model)
    description = {
        "architecture": TIMM_ARCHITECTURE,
        "num_classes": 0,
        "num_features": args["embed_dim"],
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [args["in_chans"], args["img_size"], args["img_size"]],
            "mean": list(mean), "std": list(std), "interpolation": "bicubic",
            "crop_pct": 1.0, "num_classes": 0, "classifier": "head",
        },
        "attnssl": {
            "timm_loadable": config.model.attention in TIMM_ATTENTIONS
            and config.model.block == "vit",
            "model": config_to_dict(config)["model"], "method": config.method.name,
            "dataset": config.data.dataset, "step": loaded.step,
            "checkpoint": str(loaded.checkpoint), "features": config.eval.features,
        },
    }
    weights = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    atomic_write(out / "model.safetensors",
                 lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    atomic_write(out / "config.json",
                 lambda tmp: tmp.write_text(json.dumps(description, indent=2)))
    return out


def load_exported(folder: str | Path) -> nn.Module:
    """The backbone of an ``attnssl export`` folder, any attention or block, weights checked
    key by key."""
    from safetensors.torch import load_file

    from attnssl.config import ModelSection
    from attnssl.nn.vit import build_vit

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: give a folder written by attnssl export")
    description = json.loads(config_path.read_text())
    if "attnssl" not in description:
        raise ValueError(f"{config_path} has no 'attnssl' section: not written by attnssl export")
    args = description["model_args"]
    backbone = build_vit(ModelSection.model_validate(description["attnssl"]["model"]),
                         args["img_size"], args["in_chans"])
    backbone.load_state_dict(load_file(str(weights_path)))
    return backbone
