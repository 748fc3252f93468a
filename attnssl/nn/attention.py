"""Attention layers in one registry, usable by any timm ``VisionTransformer`` via ``attn_layer``.

Every layer here takes timm's ``Attention`` constructor arguments and can record its attention
maps: set ``record_attention = True`` (or use :func:`recording_attention`) and the next forward
stores ``attention_maps`` of shape ``(B, heads, N, N)``. Recording takes the explicit path
``softmax(q k^T / sqrt(d)) v``; otherwise ``softmax`` uses the fused ``scaled_dot_product_attention``.

``softmax`` and ``softmax_explicit`` are standard multi-head attention; ``cbsa`` is
contract-and-broadcast self-attention, ``agent`` CBSA without its contraction and ``mssa``
CRATE's subspace attention (maths in :mod:`attnssl.functional.cbsa`). Layers that pool the
patch grid need to know it: by default the tokens after the class tokens form a square grid;
:func:`token_layout` tells them otherwise (a visible subset of the grid, as in MAE).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from timm.layers import Attention

from attnssl.functional.cbsa import cbsa_heads, pooling_weights, self_attention

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


# Under CPU autocast (bf16/fp16) torch's fused SDPA kernel has a slow backward: for the B1
# backbone (512 views, 50 tokens, 4 heads of 32) one layer's forward + backward took 391 ms in
# bf16 against 67 ms in fp32, and 51 ms on the explicit path (benchmarks/profile_step.py found
# it: 53-57 % of a bf16 step's self time). Up to this many tokens the explicit path is taken.
EXPLICIT_UNDER_CPU_AUTOCAST_MAX_TOKENS = 1024


def explicit_is_faster(x: torch.Tensor) -> bool:
    """Whether the explicit attention beats the fused kernel for ``x (B, N, D)`` here."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and x.shape[1] <= EXPLICIT_UNDER_CPU_AUTOCAST_MAX_TOKENS)


class QKVAttention(Attention):
    """Base of the layers that keep timm's projections (``qkv``, ``proj`` and their norms) and
    change only how queries meet keys: ``out = proj(concat_h attend(q_h, k_h, v_h))``. A
    subclass defines ``attend``, which returns the output and, when asked, the attention map;
    one that sets ``takes_mask`` also receives timm's ``attn_mask``."""

    takes_mask = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_attention = False
        self.attention_maps: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               want_map: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs):
        if attn_mask is not None and not self.takes_mask:
            raise ValueError(f"{type(self).__name__} does not take an attention mask")
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        masked = {} if attn_mask is None else {"attn_mask": attn_mask}
        out, attn = self.attend(q, k, v, self.record_attention, **masked)
        if self.record_attention:
            self.attention_maps = attn.detach()
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))


@register_attention("softmax")
class SoftmaxAttention(QKVAttention):
    """Multi-head softmax attention: fused SDPA by default; explicit when recording maps, and
    under CPU autocast for sequences up to ``EXPLICIT_UNDER_CPU_AUTOCAST_MAX_TOKENS``.

    ``A = softmax(Q K^T / sqrt(d_head))``, ``out = proj(concat_h A_h V_h)``.
    """

    always_explicit = False
    takes_mask = True

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs):
        if not (self.record_attention or self.always_explicit or explicit_is_faster(x)):
            return Attention.forward(self, x, attn_mask=attn_mask, **kwargs)
        return super().forward(x, attn_mask=attn_mask)

    def attend(self, q, k, v, want_map, attn_mask=None):
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            logits = logits + attn_mask if attn_mask.dtype != torch.bool else logits.masked_fill(
                ~attn_mask, torch.finfo(logits.dtype).min)
        attn = logits.softmax(dim=-1)
        return self.attn_drop(attn) @ v, attn


@register_attention("softmax_explicit")
class ExplicitSoftmaxAttention(SoftmaxAttention):
    """The same softmax attention, always on the explicit (non-fused) path."""

    always_explicit = True


class GridTokens:
    """Mixin of the layers that need the patch grid behind their tokens (CBSA's pooling,
    FLatten's depthwise convolution). ``num_prefix_tokens`` is set by ``build_vit``; by default
    the tokens after the class tokens form a square grid, and :func:`token_layout` says
    otherwise (a visible subset of the grid, as after MAE's masking)."""

    num_prefix_tokens: int = 1
    layout: tuple[tuple[int, int], torch.Tensor | None] | None = None

    def grid(self, tokens: int) -> tuple[tuple[int, int], torch.Tensor | None]:
        """The patch grid and the visible grid cells (None: all, in order)."""
        if self.layout is not None:
            return self.layout
        patches = tokens - self.num_prefix_tokens
        side = math.isqrt(max(patches, 0))
        if patches <= 0 or side * side != patches:
            raise ValueError(
                f"{type(self).__name__} needs a square patch grid, but {patches} patch tokens "
                f"(after {self.num_prefix_tokens} class tokens) are not one; pass the grid "
                f"with attnssl.nn.attention.token_layout"
            )
        return (side, side), None


class _SharedProjectionAttention(GridTokens, nn.Module):
    """Base of CBSA, agent and MSSA: one bias-free projection ``W = proj(x)`` split into heads
    (no separate queries, keys and values), scale ``p^-1/2``, output ``to_out`` (a linear)."""

    def __init__(self, dim: int, num_heads: int = 8, **_timm_kwargs):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.proj = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.record_attention = False
        self.attention_maps: torch.Tensor | None = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, tokens, _ = x.shape
        return x.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)


@register_attention("cbsa")
class CBSAAttention(_SharedProjectionAttention):
    """Contract-and-broadcast self-attention, linear in the number of tokens N.

    Per head: ``R0 = P W`` pools the projected patch tokens to ``m`` representatives
    (``pool_side x pool_side``, official 8 x 8; capped at the patch grid unless
    ``pool_small_grid="repeat"``, see :func:`pooling_weights`), ``A = softmax(R0 W^T
    scale)``, ``R = R0 + s_rep A W``, ``C = softmax(R R^T scale) R``, ``out = to_out(concat_h
    s_x A^T C)``; ``s_x`` and ``s_rep`` are learned per head, initialised N(0, 1). Class tokens
    are keys, values and receivers of the broadcast, but never pooled (the official layer pools
    ``w[:, :-1]``, which with the class token first pools it and drops the last patch). Maps:
    ``A^T A`` ``(B, h, N, N)``, as the official ``return_attn``. Cost ``O(N m p)`` per head.
    Follows QishuaiWen/CBSA ``attn_layers.CBSA``; unlike it, heads are pooled one by one, which
    is the same since pooling acts on each channel alone.
    """

    contract = True

    def __init__(self, dim: int, num_heads: int = 8, **timm_kwargs):
        super().__init__(dim, num_heads, **timm_kwargs)
        self.step_x = nn.Parameter(torch.randn(num_heads, 1, 1))
        self.step_rep = nn.Parameter(torch.randn(num_heads, 1, 1))
        self.pool_side = 8  # set by build_vit from model.cbsa_pool
        self.pool_small_grid = "cap"  # and model.cbsa_small_grid

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs):
        if attn_mask is not None:
            raise ValueError(f"{type(self).__name__} does not take an attention mask")
        w = self.split_heads(self.proj(x))
        grid, visible = self.grid(x.shape[1])
        pool = pooling_weights(grid, self.pool_side, self.num_prefix_tokens, visible,
                               cap=self.pool_small_grid == "cap")
        out, extraction = cbsa_heads(w, pool.to(w.device, w.dtype), self.step_rep, self.step_x,
                                     self.scale, contract=self.contract)
        if self.record_attention:
            self.attention_maps = (extraction.transpose(-2, -1) @ extraction).detach()
        return self.to_out(self.merge_heads(out))


@register_attention("agent")
class AgentAttention(CBSAAttention):
    """CBSA without the contraction: ``out = to_out(concat_h s_x A^T R)`` (agent attention in
    CBSA's form; the CBSA paper's ablation). Maps ``A^T A``."""

    contract = False


@register_attention("mssa")
class MSSAAttention(_SharedProjectionAttention):
    """Multi-head subspace self-attention (CRATE): ``out = to_out(concat_h softmax(W W^T scale) W)``
    with ``W = proj(x)`` per head; quadratic in N. Maps ``softmax(W W^T scale)``."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs):
        if attn_mask is not None:
            raise ValueError("MSSAAttention does not take an attention mask")
        out, weights = self_attention(self.split_heads(self.proj(x)), self.scale)
        if self.record_attention:
            self.attention_maps = weights.detach()
        return self.to_out(self.merge_heads(out))


@contextmanager
def token_layout(model: nn.Module, grid: tuple[int, int],
                 visible: torch.Tensor | None) -> Iterator[None]:
    """Within the block, grid-pooling layers of ``model`` take the patch tokens to be the cells
    ``visible (B, K)`` of a ``grid`` (all cells in order when ``visible`` is None)."""
    layers = [m for m in model.modules() if isinstance(m, GridTokens)]
    for layer in layers:
        layer.layout = (tuple(grid), visible)
    try:
        yield
    finally:
        for layer in layers:
            layer.layout = None


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
