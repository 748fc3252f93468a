"""MAE's maths (He et al. 2022; official code facebookresearch/mae, ``models_mae.py``).

Pure functions: random masking by sorting noise, patchify, the fixed 2-D sine-cosine
position table, and the reconstruction loss on masked patches.
"""

from __future__ import annotations

import functools
import math

import torch


def visible_count(tokens: int, mask_ratio: float) -> int:
    """Patches kept visible: ``int(N (1 - ratio))``, the official rounding (49 at 0.75 -> 12)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(tokens * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} leaves no visible patch of {tokens}; lower it below "
            f"{1 - 1 / tokens:.3f}"
        )
    return keep


def random_masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, keep the ``keep`` patches of smallest noise.

    ``noise`` is ``(B, N)`` (uniform in the official code). Returns ``keep_idx (B, keep)`` (the
    visible patches, in noise order), ``mask (B, N)`` (1 masked, 0 visible, in patch order) and
    ``restore_idx (B, N)``, with which ``gather`` puts ``[visible, masked]`` back in patch order.
    """
    shuffle = noise.argsort(dim=1)
    restore_idx = shuffle.argsort(dim=1)
    keep_idx = shuffle[:, :keep]
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    mask = mask.gather(1, restore_idx)
    return keep_idx, mask, restore_idx


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)``, patches in row-major order, pixels as ``(p, p, C)``
    (the official ``patchify``: ``nchpwq -> nhwpqc``)."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} does not tile into {patch}-pixel patches")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over the masked patches only.

    With ``norm_pix`` each target patch is standardised by its own pixels,
    ``t <- (t - mean(t)) / sqrt(var(t) + eps)`` (unbiased variance, as the official code), then

        loss = sum_i m_i * mean_j (pred_ij - t_ij)^2 / sum_i m_i

    over patches ``i`` with ``m_i = 1`` where masked.
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


@functools.lru_cache(maxsize=32)
def sincos_position_table(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """``(grid_h * grid_w, dim)`` fixed 2-D sine-cosine positions (MAE's ``get_2d_sincos_pos_embed``).

    Half the channels encode the row, half the column; each half is
    ``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 1 / 10000^(k / (dim/4))``,
    ``k = 0 .. dim/4 - 1``. The official code puts the ``w`` (column) coordinate first.
    Cached: callers must not modify the result in place.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def grid_side(tokens: int) -> int:
    """The side of a square patch grid of ``tokens`` patches."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} patches do not form a square grid")
    return side
