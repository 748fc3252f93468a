"""``attnssl export``: a run's pretrained backbone as ``model.safetensors`` plus ``config.json``.

The folder follows timm's local-folder format: ``config.json`` holds ``architecture`` (a timm
ViT entry point), ``model_args`` (our size, patch, class tokens, image size) and
``pretrained_cfg`` (input size, normalisation), so

    timm.create_model("local-dir:EXPORT_DIR", pretrained=True)

rebuilds the backbone with timm alone when it uses timm's own parts: softmax attention and
the standard block (``timm_loadable`` in the file says so). Every export, CBSA and CBT
included, loads back with :func:`load_exported`, which rebuilds it from the ``attnssl``
section. Weights are safetensors (no pickle, so loading runs no code); files are written
atomically (:func:`attnssl.runs.checkpoint.atomic_write`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from attnssl.runs.checkpoint import atomic_write

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


def _read_export(folder: str | Path) -> tuple[dict, dict]:
    """``config.json`` and the safetensors weights of an ``attnssl export`` folder; a missing,
    damaged or foreign file is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: give a folder written by attnssl export")
    try:
        description = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): export the run again") from err
    sections = ("model_args", "attnssl")
    if not isinstance(description, dict) or not all(k in description for k in sections) or \
            "model" not in description["attnssl"]:
        raise ValueError(f"{config_path} has no 'model_args' and 'attnssl.model' sections: not "
                         f"written by attnssl export")
    try:
        weights = load_file(str(weights_path))
    except SafetensorError as err:
        raise ValueError(f"{weights_path} is damaged ({err}): export the run again") from err
    return description, weights


def load_exported(folder: str | Path) -> nn.Module:
    """The backbone of an ``attnssl export`` folder, any attention or block, weights checked
    key by key. Parameters keep the trainability their run gave them: fixed sine-cosine
    positions and a frozen patch projection (``model.freeze_patch_embed``) come back without
    gradient; ``backbone.requires_grad_(True)`` trains them too (as fine-tuning,
    ``eval.finetune``, does)."""
    from attnssl.config import ModelSection
    from attnssl.nn.vit import build_vit

    description, weights = _read_export(folder)
    args = description["model_args"]
    backbone = build_vit(ModelSection.model_validate(description["attnssl"]["model"]),
                         args["img_size"], args["in_chans"])
    backbone.load_state_dict(weights)
    return backbone


# what must agree between an export and the backbone it initialises (the image size may not)
SHAPE_ARGS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
              "qkv_bias", "reg_tokens")
LAYER_KEYS = ("attention", "block", "pos_embed")
SAME_MATHS = {"softmax_explicit": "softmax"}  # one attention, two code paths
# how a user sets each: class tokens count timm's register token (UDI's cls+) plus the class token
SHAPE_ARG_NAMES = {"reg_tokens": "model.class_tokens", "in_chans": "image channels (the dataset)"}


def _shown(key: str, value):
    return value + 1 if key == "reg_tokens" and value is not None else repr(value)


def init_from_export(backbone: nn.Module, folder: str | Path, model_cfg) -> None:
    """Start ``backbone`` from an export's weights (``model.init_from``): continued or
    chained pretraining, e.g. BAM from a DINO backbone.

    The export's backbone must have this run's architecture (sizes, class tokens, attention,
    block, position kind); every difference is named. A different image size is allowed:
    learned positions are resampled bicubically to the new patch grid (timm's
    ``resample_abs_pos_embed``), fixed sine-cosine ones are rebuilt for it. So is another
    attention among those that keep timm's ``qkv`` and ``proj`` (:func:`swappable_attentions`):
    those carry over, and the parameters only one of the two layers has (Performer's random
    features, FLatten's scale and convolution) keep this run's initialisation.
    """
    from timm.layers import resample_abs_pos_embed

    try:
        description, weights = _read_export(folder)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.init_from={folder}: {err}") from err
    except ValueError as err:
        raise ValueError(f"model.init_from={folder}: {err}") from err
    theirs, ours = description["model_args"], timm_model_args(backbone, model_cfg)
    their_model = description["attnssl"]["model"]
    differences = [f"{SHAPE_ARG_NAMES.get(key, 'model.' + key)}: export "
                   f"{_shown(key, theirs.get(key))}, this run {_shown(key, ours[key])}"
                   for key in SHAPE_ARGS if theirs.get(key) != ours[key]]
    swap = swappable_attentions(their_model.get("attention"), model_cfg.attention)
    for key in LAYER_KEYS:
        export_value, run_value = their_model.get(key), getattr(model_cfg, key)
        if key == "attention" and swap:
            continue
        if SAME_MATHS.get(export_value, export_value) != SAME_MATHS.get(run_value, run_value):
            differences.append(f"model.{key}: export {export_value!r}, this run {run_value!r}")
    if model_cfg.attention not in TIMM_ATTENTIONS and their_model.get("cbsa_pool") != \
            model_cfg.cbsa_pool:
        differences.append(f"model.cbsa_pool: export {their_model.get('cbsa_pool')!r}, this run "
                           f"{model_cfg.cbsa_pool!r}")
    if differences:
        raise ValueError(
            f"model.init_from={folder}: the exported backbone differs from this run's model "
            f"section ({'; '.join(differences)}); use the export's values")
    if theirs["img_size"] != ours["img_size"]:
        if model_cfg.pos_embed == "sincos":
            weights["pos_embed"] = backbone.pos_embed.detach().clone()
        else:
            patch = ours["patch_size"]
            weights["pos_embed"] = resample_abs_pos_embed(
                weights["pos_embed"], new_size=[ours["img_size"] // patch] * 2,
                old_size=[theirs["img_size"] // patch] * 2,
                num_prefix_tokens=backbone.num_prefix_tokens)
    if not swap:
        backbone.load_state_dict(weights)
        return
    own = {key for key in backbone.state_dict() if ".attn." in key and key not in weights}
    backbone.load_state_dict({k: v for k, v in weights.items() if k in backbone.state_dict()},
                             strict=False)
    if own:
        print(f"model.init_from: {len(own)} tensors of {model_cfg.attention} attention that a "
              f"{their_model.get('attention')} backbone lacks keep their initialisation")


def swappable_attentions(export_attention: str | None, run_attention: str) -> bool:
    """Whether an export's attention can start a run's other attention: both keep timm's
    ``qkv`` and ``proj`` (softmax and the layers built on them, not CBSA, agent or MSSA)."""
    from timm.layers import Attention

    from attnssl.nn.attention import ATTENTION_LAYERS

    pair = (export_attention, run_attention)
    return (export_attention != run_attention and all(name in ATTENTION_LAYERS for name in pair)
            and all(issubclass(ATTENTION_LAYERS[name], Attention) for name in pair))
