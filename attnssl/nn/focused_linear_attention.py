"""Focused linear attention (Han et al., ICCV 2023, "FLatten Transformer"), non-causal.

Queries and keys go through the focusing map, over the layer's whole width ``C`` (before the
split into heads, as the official code):

    phi(x) = ReLU(x) + 1e-6,   x' = phi(x) / softplus(s),   f(x) = ||x'|| x'^p / ||x'^p||

with ``s`` a learned per-channel scale (initialised 0) and focusing power ``p = 3``. Per head,
with ``n`` keys,

    out_i = f(q_i)^T (sum_j f(k_j) v_j^T / n) / (f(q_i)^T mean_j f(k_j) + 1e-6) + DWC(V)_i

where ``DWC`` is a depthwise ``5 x 5`` convolution of the values on the patch grid, its
weights shared by the heads (the paper's rank restoration). Follows the official code,
github.com/LeapLabTHU/FLatten-Transformer (``models/flatten_pvt.py`` and ``flatten_swin.py``,
``FocusedLinearAttention``), with three changes a ViT needs:

* the official layer adds a learned positional encoding of a fixed token count to the keys;
  the ViT already adds its position embeddings, and multi-crop feeds several token counts to
  one layer, so it is left out;
* class tokens attend and are attended like patches but get no convolution term (they have no
  place on the grid);
* with only some patches present (MAE's visible tokens, told by
  :func:`attnssl.nn.attention.token_layout`), the convolution runs on the grid with the absent
  patches at zero.

The recorded attention map is the linear part, ``A_ij = f(q_i).f(k_j) / sum_j' f(q_i).f(k_j')``;
the convolution adds a local term that is not a map. The layer keeps timm's ``qkv`` and
``proj``; a softmax backbone's weights load into it (the scale and the convolution start from
their own initialisation), and its ``qkv`` and ``proj`` load back into a softmax backbone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnssl.nn.attention import GridTokens, QKVAttention, register_attention

EPS = 1e-6


def focusing_map(x: torch.Tensor, scale: torch.Tensor, power: float) -> torch.Tensor:
    """``f(x) = ||x'|| x'^p / ||x'^p||`` with ``x' = (ReLU(x) + 1e-6) / softplus(scale)``,
    norms over the last axis."""
    x = (F.relu(x) + EPS) / F.softplus(scale)
    powered = x**power
    return powered * (x.norm(dim=-1, keepdim=True) / powered.norm(dim=-1, keepdim=True))


def focused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, d)`` focused queries and keys and values -> ``(B, h, N, d_v)``: the linear
    part of the module docstring's formula."""
    n = k.shape[2]
    kv = torch.einsum("bhnd,bhne->bhde", k, v) / n
    normaliser = torch.einsum("bhnd,bhd->bhn", q, k.mean(dim=2)) + EPS
    return torch.einsum("bhnd,bhde->bhne", q, kv) / normaliser.unsqueeze(-1)


def focused_linear_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``A = f(Q) f(K)^T`` with rows normalised, ``(B, h, N, N)``."""
    sim = q @ k.transpose(-2, -1)
    return sim / sim.sum(dim=-1, keepdim=True)


def grid_convolution(conv: nn.Conv2d, values: torch.Tensor, grid: tuple[int, int],
                     visible: torch.Tensor | None) -> torch.Tensor:
    """``conv`` over patch values ``(B, h, P, d)`` laid on ``grid``; heads share ``conv``.

    ``visible (B, P)`` gives each value's grid cell (absent cells are zero); None means all
    cells in row-major order.
    """
    batch, heads, patches, dim = values.shape
    height, width = grid
    if visible is None:
        canvas = values
    else:
        canvas = values.new_zeros(batch, heads, height * width, dim)
        canvas = canvas.scatter(2, visible[:, None, :, None].expand(-1, heads, -1, dim), values)
    images = canvas.reshape(batch * heads, height, width, dim).permute(0, 3, 1, 2)
    out = conv(images).permute(0, 2, 3, 1).reshape(batch, heads, height * width, dim)
    if visible is None:
        return out
    return out.gather(2, visible[:, None, :, None].expand(-1, heads, -1, dim))


@register_attention("focused_linear")
class FocusedLinearAttention(GridTokens, QKVAttention):
    """``model.attention=focused_linear``: FLatten's focused linear attention on timm's
    projections, focusing power 3 and a ``5 x 5`` depthwise convolution (the official
    defaults)."""

    focusing_power = 3.0
    kernel_size = 5

    def __init__(self, dim: int, num_heads: int = 8, **timm_kwargs):
        super().__init__(dim, num_heads, **timm_kwargs)
        self.feature_scale = nn.Parameter(torch.zeros(dim))
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, self.kernel_size,
                             padding=self.kernel_size // 2, groups=self.head_dim)

    def focus(self, x: torch.Tensor) -> torch.Tensor:
        """:func:`focusing_map` over the whole width of ``(B, h, N, d)`` heads."""
        batch, heads, tokens, dim = x.shape
        wide = x.transpose(1, 2).reshape(batch, tokens, heads * dim)
        wide = focusing_map(wide, self.feature_scale, self.focusing_power)
        return wide.reshape(batch, tokens, heads, dim).transpose(1, 2)

    def attend(self, q, k, v, want_map):
        wide = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):  # powers and a long sum
            q, k = self.focus(q.to(wide)), self.focus(k.to(wide))
            out = focused_linear_attention(q, k, v.to(wide)).to(v.dtype)
            attn = focused_linear_map(q, k) if want_map else None
        grid, visible = self.grid(v.shape[2])
        prefix = self.num_prefix_tokens
        local = grid_convolution(self.dwc, v[:, :, prefix:], grid, visible)
        return torch.cat([out[:, :, :prefix], out[:, :, prefix:] + local], dim=2), attn
