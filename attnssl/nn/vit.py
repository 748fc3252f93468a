"""The ViT backbone: timm's ``VisionTransformer`` with our attention registry and presets."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

from attnssl.nn.attention import attention_layers, get_attention
from attnssl.nn.blocks import CBTBlock
from attnssl.nn.mae import sincos_pos_embed_, xavier_linears_


@dataclass(frozen=True)
class ViTSize:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


VIT_PRESETS = {
    # small images (28-32 px): 7x7 or 8x8 patch grids
    "vit_tiny_p4": ViTSize(4, 128, 4, 4),  # benchmark protocol B1
    "vit_small_p4": ViTSize(4, 192, 6, 3),
    "vit_base_p4": ViTSize(4, 384, 8, 6),
    # ImageNet-style sizes (224 px, 14x14 grid)
    "vit_tiny_p16": ViTSize(16, 192, 12, 3),
    "vit_small_p16": ViTSize(16, 384, 12, 6),
    "vit_base_p16": ViTSize(16, 768, 12, 12),
}


def resolve_size(model_cfg) -> ViTSize:
    """The preset's size with any explicitly set field of the config overriding it."""
    if model_cfg.preset is not None and model_cfg.preset not in VIT_PRESETS:
        raise ValueError(
            f"unknown model.preset {model_cfg.preset!r}; accepted: {', '.join(VIT_PRESETS)}"
        )
    base = VIT_PRESETS.get(model_cfg.preset)
    fields = {}
    for name in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        value = getattr(model_cfg, name)
        if value is None and base is None and name == "mlp_ratio":
            value = 4.0
        if value is None and base is None:
            raise ValueError(f"model.{name} must be set when model.preset is null")
        fields[name] = value if value is not None else getattr(base, name)
    if fields["embed_dim"] % fields["num_heads"]:
        raise ValueError(
            f"model.embed_dim={fields['embed_dim']} must be divisible by "
            f"model.num_heads={fields['num_heads']}"
        )
    return ViTSize(**fields)


def build_vit(model_cfg, img_size: int, in_chans: int) -> VisionTransformer:
    """A timm ViT without classifier (``num_classes=0``); positions interpolate to any crop size.

    A second class token (UDI's ``cls+``, ``model.class_tokens=2``) is timm's register token:
    a learned prefix token with its own position embedding, as the official UDI ViT has; both
    class tokens are then initialised truncated-normal (std 0.02), as there.

    ``model.freeze_patch_embed`` keeps the patch projection at its start (no gradient, so no
    update and no weight decay): MoCo v3's trick (Chen et al. 2021, section 4.1), which BAM's
    official ViT uses together with fixed sine-cosine positions (github.com/DanielShalam/BAM
    ``models/vit.py``; here ``model.pos_embed=sincos``). As there, the frozen projection keeps
    timm's initialisation (MoCo v3's own code gives it a uniform one of its own); with
    ``model.init_from`` it is the exported projection that stays.
    """
    size = resolve_size(model_cfg)
    if img_size % size.patch_size:
        raise ValueError(
            f"image size {img_size} is not a multiple of model.patch_size={size.patch_size}"
        )
    extra_tokens = (getattr(model_cfg, "class_tokens", None) or 1) - 1
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=size.patch_size,
        in_chans=in_chans,
        num_classes=0,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_ratio,
        qkv_bias=model_cfg.qkv_bias,
        drop_path_rate=model_cfg.drop_path,
        dynamic_img_size=True,
        attn_layer=get_attention(model_cfg.attention),
        weight_init="" if model_cfg.weight_init in ("timm", "mae") else model_cfg.weight_init,
        reg_tokens=extra_tokens,
        **_block_arguments(getattr(model_cfg, "block", "vit")),
    )
    if model_cfg.weight_init == "mae":
        mae_init_(vit)
    if extra_tokens:
        nn.init.trunc_normal_(vit.cls_token, std=0.02)
        nn.init.trunc_normal_(vit.reg_token, std=0.02)
    if getattr(model_cfg, "pos_embed", "learned") == "sincos":
        sincos_pos_embed_(vit)
    if getattr(model_cfg, "freeze_patch_embed", False):
        vit.patch_embed.proj.requires_grad_(False)
    for layer in attention_layers(vit):
        layer.num_prefix_tokens = vit.num_prefix_tokens
        if hasattr(layer, "representatives_std"):  # before pool_side, which makes them
            layer.representatives_std = getattr(model_cfg, "cbsa_learned_std", 0.02)
        if hasattr(layer, "pool_side"):
            layer.pool_side = getattr(model_cfg, "cbsa_pool", 8)
            layer.pool_small_grid = getattr(model_cfg, "cbsa_small_grid", "cap")
    return vit


def _block_arguments(block: str) -> dict:
    """timm's ``Block`` with timm's LayerNorm (eps 1e-6), or the CBT block with the official
    CBSA code's ``nn.LayerNorm`` (eps 1e-5) in its blocks and the final norm."""
    if block == "cbt":
        return {"block_fn": CBTBlock, "norm_layer": nn.LayerNorm}
    return {"block_fn": Block}


def compile_blocks(module: nn.Module) -> None:
    """``torch.compile`` every transformer block in ``module`` in place (regional compilation:
    blocks of one shape share their compiled code, so compiling costs seconds, not minutes;
    parameter names and checkpoints are unchanged)."""
    for block in [m for m in module.modules() if isinstance(m, (Block, CBTBlock))]:
        block.compile()


def run_eagerly() -> contextlib.AbstractContextManager:
    """A context in which compiled blocks run eagerly. Evaluation's new batch sizes and the
    attention-recording flag would otherwise recompile them, which costs more than it saves
    (``torch.compiler.set_stance("force_eager")``; torch < 2.6 lacks it and recompiles)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@torch.no_grad()
def mae_init_(vit: VisionTransformer) -> None:
    """MAE's ``initialize_weights`` (facebookresearch/mae): xavier-uniform on every linear
    (biases 0) and on the patch embedding seen as a matrix, LayerNorms (1, 0), class token
    N(0, 0.02). Positions are left to ``model.pos_embed``."""
    xavier_linears_(vit)
    weight = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.normal_(vit.cls_token, std=0.02)


FEATURE_KINDS = ("cls", "mean", "cls+mean", "cls_plus", "cls+cls_plus")


def last_block_tokens(vit: VisionTransformer, images: torch.Tensor, blocks: int = 1
                      ) -> list[torch.Tensor]:
    """The tokens ``(B, N, D)`` after each of the last ``blocks`` blocks, each through the final
    norm, oldest first (DINO's ``get_intermediate_layers``). ``blocks=1`` is
    ``vit.forward_features(images)``."""
    depth = len(vit.blocks)
    if not 1 <= blocks <= depth:
        raise ValueError(f"eval.blocks={blocks} must be between 1 and the backbone's depth "
                         f"({depth})")
    if blocks == 1:
        return [vit.forward_features(images)]
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    outputs = []
    for index, block in enumerate(vit.blocks):
        x = block(x)
        if index >= depth - blocks:
            outputs.append(vit.norm(x))
    return outputs


def pool_features(tokens: torch.Tensor, kind: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Image features from normalised tokens ``(B, N, D)``.

    ``cls`` the first class token; ``mean`` the mean patch token; ``cls_plus`` the second
    class token (UDI's ``cls+``); ``a+b`` the two concatenated.
    """
    if "+" in kind:
        first, _, second = kind.partition("+")
        return torch.cat([pool_features(tokens, first, num_prefix_tokens),
                          pool_features(tokens, second, num_prefix_tokens)], dim=-1)
    if kind == "cls":
        return tokens[:, 0]
    if kind == "mean":
        return tokens[:, num_prefix_tokens:].mean(dim=1)
    if kind == "cls_plus":
        if num_prefix_tokens < 2:
            raise ValueError("feature kind 'cls_plus' needs a backbone with two class tokens")
        return tokens[:, 1]
    raise ValueError(f"unknown feature kind {kind!r}; accepted: {', '.join(FEATURE_KINDS)}")


def takes_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Weight decay on weight matrices only: none on biases and norms (1-D), class tokens,
    positions (the rule of MAE's and timm's parameter groups) and CBSA's learned
    representatives (tokens of their own)."""
    return not (param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token",
                                                  "representatives")))
