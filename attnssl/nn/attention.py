"""Attention layers in one registry, usable by any timm ``VisionTransformer`` via ``attn_layer``.

Every layer here takes timm's ``Attention`` constructor arguments and can record its attention
maps: set ``record_attention = True`` (or use :func:`recording_attention`) and the next forward
stores ``attention_maps`` of shape ``(B, heads, N, N)``. Recording takes the explicit path
``softmax(q k^T / sqrt(d)) v``; otherwise ``softmax`` uses the fused ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from timm.layers import Attention

ATTENTION_LAYERS: dict[str, type[nn.Module]] = {}


def register_attention(name: str):
    """Class decorator: make an attention layer selectable as ``model.attention=name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ATTENTION_LAYERS:
            raise ValueError(f"attention {name!r} is already registered")
        ATTENTION_LAYERS[name] = cls
        return cls

    return add


def get_attention(name: str) -> type[nn.Module]:
    if name not in ATTENTION_LAYERS:
        raise ValueError(
            f"unknown model.attention {name!r}; accepted: {', '.join(sorted(ATTENTION_LAYERS))}"
        )
    return ATTENTION_LAYERS[name]


@register_attention("softmax")
class SoftmaxAttention(Attention):
    """Multi-head softmax attention: fused SDPA by default, explicit when recording maps.

    ``A = softmax(Q K^T / sqrt(d_head))``, ``out = proj(concat_h A_h V_h)``.
    """

    always_explicit = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_attention = False
        self.attention_maps: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs):
        if not (self.record_attention or self.always_explicit):
            return super().forward(x, attn_mask=attn_mask, **kwargs)
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(
                ~attn_mask, torch.finfo(logits.dtype).min)
        attn = logits.softmax(dim=-1)
        if self.record_attention:
            self.attention_maps = attn.detach()
        out = self.attn_drop(attn) @ v
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))


@register_attention("softmax_explicit")
class ExplicitSoftmaxAttention(SoftmaxAttention):
    """The same softmax attention, always on the explicit (non-fused) path."""

    always_explicit = True


def attention_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "record_attention")]


@contextmanager
def recording_attention(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within the block, every attention layer of ``model`` stores its maps on forward."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError("model has no attention layers that can record maps")
    for layer in layers:
        layer.record_attention = True
    try:
        yield layers
    finally:
        for layer in layers:
            layer.record_attention = False


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention maps ``(B, heads, N, N)`` of ``model.forward_features(images)``."""
    with recording_attention(model) as layers:
        model.forward_features(images)
        maps = [layer.attention_maps for layer in layers]
        for layer in layers:
            layer.attention_maps = None
    return maps
