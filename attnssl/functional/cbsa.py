"""Contract-and-broadcast self-attention (Wen, Huang & Li, NeurIPS 2025; official code
QishuaiWen/CBSA, ``CBSA_image_classification/attn_layers.py``), and its special cases.

All functions work per head on ``(..., tokens, head_dim)`` tensors. With ``W`` the projected
tokens of one head (``N x p``), ``P`` a row-stochastic pooling matrix (``m x N``) and
``scale = p^-1/2``:

    R0 = P W                                   (representatives, pooled from the patch grid)
    A  = softmax_rows(R0 W^T scale)            (m x N: each representative over all tokens)
    R  = R0 + s_rep (A W)                      (extract)
    C  = softmax_rows(R R^T scale) R           (contract: attention among representatives)
    D  = A^T C                                 (broadcast back to the N tokens)
    out_head = s_x D

The layer then concatenates heads and applies ``to_out``. Without the contraction (``C = R``)
this is agent attention in CBSA's form; with ``P = I`` (every token its own representative)
and no extraction (``A = P``, ``R = R0``) it is MSSA (CRATE): ``softmax(W W^T scale) W``.
"""

from __future__ import annotations

import functools

import torch


def self_attention(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(x x^T scale) x`` and its weights: MSSA, and CBSA's contraction step."""
    weights = ((x @ x.transpose(-2, -1)) * scale).softmax(dim=-1)
    return weights @ x, weights


def cbsa_heads(w: torch.Tensor, pool: torch.Tensor, step_rep: torch.Tensor,
               step_x: torch.Tensor, scale: float, contract: bool = True,
               extract: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CBSA on per-head tokens ``w (B, h, N, p)`` with pooling ``pool (B or 1, m, N)``.

    ``step_rep`` and ``step_x`` broadcast against ``(B, h, m, p)`` (official: ``(h, 1, 1)``).
    Returns the per-head output ``s_x A^T C`` ``(B, h, N, p)`` and ``A`` ``(B, h, m, N)``.
    ``contract=False`` gives agent attention (``C = R``); ``extract=False`` takes ``A = P``
    and ``R = R0`` (with ``P = I``, MSSA).
    """
    rep = pool.unsqueeze(1) @ w  # (B, h, m, p)
    if not extract:
        extraction = pool.unsqueeze(1).expand(w.shape[0], w.shape[1], -1, -1)
        contracted = self_attention(rep, scale)[0] if contract else rep
        return step_x * (extraction.transpose(-2, -1) @ contracted), extraction
    return cbsa_from_representatives(w, rep, step_rep, step_x, scale, contract)


def cbsa_from_representatives(w: torch.Tensor, rep: torch.Tensor, step_rep: torch.Tensor,
                              step_x: torch.Tensor, scale: float,
                              contract: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CBSA from initial representatives ``R0 = rep`` (``(B or 1, h, m, p)``): ``A =
    softmax(R0 W^T scale)``, ``R = R0 + s_rep A W``, ``C = softmax(R R^T scale) R`` (``C = R``
    without ``contract``); returns ``s_x A^T C`` ``(B, h, N, p)`` and ``A`` ``(B, h, m, N)``."""
    extraction = ((rep @ w.transpose(-2, -1)) * scale).softmax(dim=-1)
    rep = rep + step_rep * (extraction @ w)
    contracted = self_attention(rep, scale)[0] if contract else rep
    return step_x * (extraction.transpose(-2, -1) @ contracted), extraction


@functools.lru_cache(maxsize=64)
def adaptive_pool_matrix(grid_h: int, grid_w: int, out_h: int, out_w: int) -> torch.Tensor:
    """``(out_h * out_w, grid_h * grid_w)`` float64: the averaging weights of ``AdaptiveAvgPool2d``.

    Output cell ``(i, j)`` averages input rows ``floor(i H / out_h) .. ceil((i+1) H / out_h) - 1``
    and likewise columns, so ``M @ x.flatten()`` equals torch's pool of a row-major grid.
    Cached: callers must not modify the result in place.
    """

    def axis(size: int, out: int) -> torch.Tensor:
        weights = torch.zeros(out, size, dtype=torch.float64)
        for i in range(out):
            start, end = (i * size) // out, -((-(i + 1) * size) // out)
            weights[i, start:end] = 1.0 / (end - start)
        return weights

    return torch.einsum("ab,cd->acbd", axis(grid_h, out_h), axis(grid_w, out_w)).reshape(
        out_h * out_w, grid_h * grid_w)


def pooling_weights(grid: tuple[int, int], side: int, prefix: int,
                    visible: torch.Tensor | None = None, cap: bool = True) -> torch.Tensor:
    """Row-stochastic pooling over the tokens ``[prefix tokens, patches]``: ``(B or 1, m, N)``.

    Representatives average patches on an ``min(side, H) x min(side, W)`` grid (``cap=False``:
    always ``side x side``; on a smaller grid patches then repeat, as the official layer's
    ``AdaptiveAvgPool2d`` does: on a 4 x 4 grid each patch is 4 of the 64 representatives,
    which scales the broadcast ``A^T C`` by 4; on 7 x 7 the repeats are uneven); class tokens
    (the first ``prefix``) get weight 0. The official layer pools ``w[:, :-1]``, as if the class
    token were last; with timm's class token first that pools the class token and drops the
    last patch, which we do not reproduce. ``visible (B, K)`` (grid indices of the tokens
    present, as after MAE's masking) restricts each cell to its visible patches; a cell with
    none takes the mean of all visible patches.
    """
    grid_h, grid_w = grid
    out_h, out_w = (min(side, grid_h), min(side, grid_w)) if cap else (side, side)
    matrix = adaptive_pool_matrix(grid_h, grid_w, out_h, out_w)
    if visible is None:
        weights = matrix.unsqueeze(0)
    else:
        matrix = matrix.to(visible.device)
        weights = matrix[:, visible].permute(1, 0, 2)  # (B, m, K)
        totals = weights.sum(dim=-1, keepdim=True)
        weights = torch.where(totals > 0, weights / totals.clamp_min(1e-12),
                              torch.full_like(weights, 1.0 / weights.shape[-1]))
    return torch.nn.functional.pad(weights, (prefix, 0))
