"""Patch positions across views: where a patch of one crop lies in another (for UDI).

A view is a crop box ``(x0, y0, x1, y1)`` of the source image (pixels), possibly flipped
left-right, resized to a ``grid x grid`` patch grid. Inside a view we use unit coordinates
``(u, v)`` in [0, 1]^2 with (0, 0) the view's top-left corner; patch ``(r, c)`` (flat index
``r * grid + c``) has its centre at ``((c + 1/2) / grid, (r + 1/2) / grid)``, which is where
:func:`attnssl.data.views.crop_resize` samples it from, so a position mapped to another view
and back lands where it started.

The official UDI code (QingSuML/udi, ``udi_augmentation.py``) puts patch ``k`` at
``k / (grid - 1)`` of the crop (the first and last patches on the crop's edges), half a patch
off at the borders; we use the centres, which match our crops exactly.
"""

from __future__ import annotations

import torch


def patch_centres(grid: int) -> torch.Tensor:
    """``(grid * grid, 2)`` unit coordinates ``(u, v)`` of the patch centres, row-major."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1)], dim=-1)


def view_to_source(uv: torch.Tensor, boxes: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Source-pixel ``(x, y)`` of view positions ``uv (B, S, 2)``; ``boxes (B, 4)``, ``flipped (B,)``.

    ``x = x0 + u (x1 - x0)``, or ``x1 - u (x1 - x0)`` when the view is flipped; ``y = y0 + v (y1 - y0)``.
    """
    x0, y0, x1, y1 = (boxes[:, k, None] for k in range(4))
    u = torch.where(flipped[:, None], 1 - uv[..., 0], uv[..., 0])
    return torch.stack([x0 + u * (x1 - x0), y0 + uv[..., 1] * (y1 - y0)], dim=-1)


def source_to_view(xy: torch.Tensor, boxes: torch.Tensor,
                   flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`view_to_source`: ``(uv (B, S, 2), inside (B, S))``.

    ``inside`` is true where the point lies strictly inside the box (the official test).
    """
    x0, y0, x1, y1 = (boxes[:, k, None] for k in range(4))
    u = (xy[..., 0] - x0) / (x1 - x0)
    v = (xy[..., 1] - y0) / (y1 - y0)
    inside = (u > 0) & (u < 1) & (v > 0) & (v < 1)
    u = torch.where(flipped[:, None], 1 - u, u)
    return torch.stack([u, v], dim=-1), inside


def bilinear_weights(uv: torch.Tensor, grid: int) -> torch.Tensor:
    """Rows ``(B, S, grid * grid)`` that interpolate a patch grid bilinearly at ``uv (B, S, 2)``.

    The continuous grid coordinate of ``u`` is ``u * grid - 1/2`` (patch centres at integers),
    clamped to ``[0, grid - 1]``; each row has at most four non-zero weights and sums to 1.
    """
    coords = (uv * grid - 0.5).clamp(0, grid - 1)  # (B, S, 2) as (col, row)
    low = coords.floor().clamp(max=max(grid - 2, 0))
    frac = coords - low
    low = low.long()
    high = (low + 1).clamp(max=grid - 1)
    weights = uv.new_zeros(*uv.shape[:-1], grid * grid)
    for row, w_row in ((low[..., 1], 1 - frac[..., 1]), (high[..., 1], frac[..., 1])):
        for col, w_col in ((low[..., 0], 1 - frac[..., 0]), (high[..., 0], frac[..., 0])):
            weights.scatter_add_(-1, (row * grid + col).unsqueeze(-1), (w_row * w_col).unsqueeze(-1))
    return weights


def stratified_sample(batch: int, grid: int, window: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """UDI's stratified random sampling: flat patch indices ``(B, n * n)``, ``n = grid // window``.

    The grid's top-left ``n*window`` square of windows is tiled by ``n x n`` windows of
    ``window x window`` patches; one patch is drawn uniformly in each window. When the grid
    does not divide, the tiled square sits at one of the four corners, drawn per image (the
    official ``_sampling_mask``). Samples are listed window by window, row-major.
    """
    if not 1 <= window <= grid:
        raise ValueError(f"sampling window {window} must be between 1 and the patch grid size {grid}")
    n = grid // window
    span = n * window
    cell = torch.randint(0, window * window, (batch, n * n), generator=generator)
    corner = torch.randint(0, 4, (batch, 1), generator=generator)
    window_row = torch.arange(n).repeat_interleave(n)
    window_col = torch.arange(n).repeat(n)
    row = (corner // 2) * (grid - span) + window_row * window + cell // window
    col = (corner % 2) * (grid - span) + window_col * window + cell % window
    return row * grid + col


def map_samples(indices: torch.Tensor, grid_from: int, box_from: torch.Tensor,
                flipped_from: torch.Tensor, grid_to: int, box_to: torch.Tensor,
                flipped_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where sampled patches ``indices (B, S)`` of one view fall in another view.

    Returns the bilinear rows ``(B, S, grid_to**2)`` over the other view's patch grid (zero
    where the point falls outside it) and ``inside (B, S)``.
    """
    uv = patch_centres(grid_from).to(box_from.device)[indices]
    uv_to, inside = source_to_view(view_to_source(uv, box_from, flipped_from), box_to, flipped_to)
    return bilinear_weights(uv_to, grid_to) * inside.unsqueeze(-1), inside


def shift_to_overlap(boxes: torch.Tensor, reference: torch.Tensor,
                     image_size: float) -> torch.Tensor:
    """Move each box toward ``reference`` until, on each axis, they overlap by at least half
    of the shorter side (so by at least a quarter of the smaller box's area).

    The official ``RandomCropCoord.get_params_ref``, per axis with side ``a``, reference side
    ``r`` and union extent ``U``: shift by the gap ``max(U - a - r, 0)``, plus ``min(a, r) / 2``
    when the overlap is below that, toward the reference's centre; then clamp into the image.
    (The official code measures the union's width from ``min(i, rj)``, a row where a column is
    meant; we use the column. It also takes the reference's side as its last pixel index minus
    its first, ``r - 1`` for ``r`` pixels, against ``h`` pixels for the crop, so when the
    reference is the shorter it aims at ``(r - 1) / 2`` of overlap where we aim at ``r / 2``:
    the crops land about one pixel apart.)
    """
    out = boxes.clone()
    for lo, hi in ((0, 2), (1, 3)):
        side, ref_side = boxes[:, hi] - boxes[:, lo], reference[:, hi] - reference[:, lo]
        union = torch.maximum(boxes[:, hi], reference[:, hi]) - torch.minimum(boxes[:, lo],
                                                                               reference[:, lo])
        shorter = torch.minimum(side, ref_side)
        shift = (union - side - ref_side).clamp(min=0)
        shift = shift + torch.where(union >= side + ref_side - 0.5 * shorter, 0.5 * shorter, 0.0)
        direction = torch.sign((reference[:, lo] + reference[:, hi]) - (boxes[:, lo] + boxes[:, hi]))
        start = (boxes[:, lo] + direction * shift).clamp(min=0)
        start = torch.minimum(start, image_size - side)
        out[:, lo], out[:, hi] = start, start + side
    return out


def union_box(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest box holding both ``a`` and ``b`` (``(B, 4)`` each)."""
    return torch.cat([torch.minimum(a[:, :2], b[:, :2]), torch.maximum(a[:, 2:], b[:, 2:])], dim=1)
