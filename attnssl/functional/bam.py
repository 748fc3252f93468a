"""BAM's maths: balanced self-attention matching (Shalam & Korman, ECCV 2024).

Follows the official code, github.com/DanielShalam/BAM (``bam/bam_loss.py``, ``bam/masks.py``).
Notation: ``B`` images per process, ``V`` views per image (the first ``G`` global), ``W``
processes. Rows are stacked view-major (row ``v*B + i`` is view v of image i); the ``N = G*B*W``
columns are the global views of the whole batch, view-major over processes (column
``g*B*W + r*B + i`` is global view g of image i of process r). All inputs are L2-normalised.

* source attention ``log A = log_softmax(z C^T / tau)`` per row;
* target ``P = Sinkhorn(exp(z_t C_t^T / eps))``, no gradient, only the global views' rows kept;
* ``L = 1/G sum_g 1/(V-1) sum_{s != g} mean_i [ -sum_j P_g[i,j] log A_s[i,j] ]``.

Positive masking removes, in every row of image i, the G columns of image i's own views.

Two computations give the same loss and gradients: :func:`bam_loss` holds the whole
``(V*B) x N`` matrices; :func:`bam_loss_blockwise` walks the images in blocks, keeps only the
Sinkhorn scaling vectors, and recomputes each block in the backward pass (activation
checkpointing), so peak memory grows with the block, not with the batch squared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from attnssl.functional.collapse import mean_row_entropy
from attnssl.functional.distributed import world_size


def _all_reduce(tensor: torch.Tensor, op, distributed: bool) -> torch.Tensor:
    if distributed and world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def positive_mask_for_images(images: torch.Tensor, n_views: int, n_targets: int, batch: int,
                             world: int = 1, rank: int = 0,
                             masked_images: torch.Tensor | None = None) -> torch.Tensor:
    """Mask rows ``v*n + k`` (view v of local image ``images[k]``), shape ``(V*n, G*B*W)``.

    Row (v, i) is True at columns ``g*B*W + rank*B + i``, g < G: every global view of its own
    image (the official ``get_positive_mask``, cut to the target columns). ``masked_images``
    (bool, one per local image) leaves the rows of the images where it is False unmasked.
    """
    n = images.numel()
    mask = torch.zeros(n_views * n, n_targets * batch * world, dtype=torch.bool,
                       device=images.device)
    rows = torch.arange(n_views * n, device=images.device)
    image = images.repeat(n_views)
    for g in range(n_targets):
        mask[rows, g * batch * world + rank * batch + image] = True
    if masked_images is not None:
        mask &= masked_images.to(images.device)[image].unsqueeze(1)
    return mask


def positive_mask(batch: int, n_views: int, n_targets: int, world: int = 1, rank: int = 0,
                  device=None, masked_images: torch.Tensor | None = None) -> torch.Tensor:
    """The ``(V*B, G*B*W)`` positive mask of a whole local batch (see above)."""
    images = torch.arange(batch, device=device)
    return positive_mask_for_images(images, n_views, n_targets, batch, world, rank,
                                    masked_images)


def _masked_logits(scores: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    logits = scores / scale
    if mask is not None:
        logits = logits.masked_fill(mask, torch.finfo(logits.dtype).min)
    return logits


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float, iters: int, mask: torch.Tensor | None = None,
             n_masked: int = 0, distributed: bool = False) -> torch.Tensor:
    """Balanced targets from similarities ``scores`` ``(n, N)``; every returned row sums to 1.

    The official ``distributed_sinkhorn`` (written there on the transposed matrix):

    1. ``K = exp(scores/eps - M)``, masked entries 0, ``M`` the maximum over all processes;
    2. ``Q = K / sum(K)`` (sum over all processes);
    3. ``iters`` times: scale each column to sum ``1/(N - n_masked)`` (column sums over all
       processes), then each row to sum ``1/(W*n)``;
    4. ``P = Q / rowsum(Q)``.

    With ``iters = 0`` nothing is balanced: ``P`` is the row softmax of ``scores / eps`` (masked
    entries 0), the target without Sinkhorn (BAM's ablation of the balancing).

    ``distributed`` all-reduces the maximum and the sums (global normalisation, the paper's);
    without it each process balances its own rows alone.

    The two marginals are not consistent (each column has V masked entries, not G); as in the
    official code this is harmless: a constant factor on either marginal scales the column
    vector ``b`` of ``Q = diag(a) K diag(b)`` and cancels in the final row normalisation.
    """
    world = world_size() if distributed else 1
    logits = _masked_logits(scores, eps, mask)
    shift = _all_reduce(logits.max().clone(), dist.ReduceOp.MAX, distributed)
    q = torch.exp(logits - shift)
    q /= _all_reduce(q.sum(), dist.ReduceOp.SUM, distributed)
    n_rows, n_cols = q.shape
    column_mass, row_mass = 1.0 / (n_cols - n_masked), 1.0 / (world * n_rows)
    for _ in range(iters):
        q *= column_mass / _all_reduce(q.sum(dim=0), dist.ReduceOp.SUM, distributed)
        q *= row_mass / q.sum(dim=1, keepdim=True)
    return q / q.sum(dim=1, keepdim=True)


def keep_top_k(targets: torch.Tensor, n_targets: int, k: int) -> torch.Tensor:
    """Keep, for each image, the k columns largest in the mean of its G target rows; rows sum 1.

    The official ``keep_top_values`` (``--top_k_sink``, 128 in the ViT scripts). At the
    official HEAD the loss tests an attribute ``masking_fn`` that its constructor no longer sets
    (so every call fails); we follow the earlier code's evident intent: top-k when ``k > 0``.
    ``targets`` is ``(G*B, N)`` view-major.
    """
    batch = targets.shape[0] // n_targets
    mean_rows = targets.view(n_targets, batch, -1).mean(dim=0)
    index = mean_rows.topk(k, dim=-1).indices.repeat(n_targets, 1)
    kept = torch.zeros_like(targets).scatter_(-1, index, targets.gather(-1, index))
    return kept / kept.sum(dim=-1, keepdim=True)


def log_attention(sources: torch.Tensor, columns: torch.Tensor, temperature: float,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """``log A = log_softmax(z C^T / tau)`` per row, masked entries at the dtype's minimum."""
    return _masked_logits(sources @ columns.T, temperature, mask).log_softmax(dim=-1)


def matching_loss(log_attn: torch.Tensor, targets: torch.Tensor, n_views: int, n_targets: int,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``1/G sum_g 1/|S_g| sum_{s in S_g} mean_i [ -sum_j P_g[i,j] log A_s[i,j] ]``.

    ``log_attn`` is ``(V*B, N)``, ``targets`` ``(G*B, N)``, ``mask`` ``(V*B, N)`` (masked
    entries contribute 0). ``S_g`` is every view but g (or g itself when V = 1, as officially).
    """
    batch, n_cols = targets.shape[0] // n_targets, targets.shape[1]
    log_a = log_attn.view(n_views, batch, n_cols)
    p = targets.view(n_targets, batch, n_cols)
    if mask is not None:
        p = p.masked_fill(mask[:batch].view(1, batch, n_cols), 0.0)
    loss = log_attn.new_zeros(())
    for g in range(n_targets):
        sources = [s for s in range(n_views) if s != g] or [g]
        cross = -(p[g].unsqueeze(0) * log_a[sources]).sum(dim=-1)  # (|S_g|, B)
        loss = loss + cross.mean()
    return loss / n_targets


@dataclass(frozen=True)
class BAMSpec:
    """Everything that defines the loss besides the embeddings.

    The official code's ``n_tgt_crops`` (views whose rows are targets) is tied to the number of
    global views here: its scripts set both to 2.
    """

    n_views: int
    n_targets: int
    temperature: float = 0.1
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    positive_masking: bool = True
    top_k: int = 0
    world: int = 1
    rank: int = 0
    distributed: bool = False
    # this step's draw of partial positive masking: which local images have their own columns
    # masked (None: every image, the official rule); the Sinkhorn marginals need no change, a
    # constant column mass cancels in the final row normalisation
    masked_images: torch.Tensor | None = None

    @property
    def n_masked(self) -> int:
        return self.n_targets if self.positive_masking else 0


@dataclass
class BAMOutput:
    loss: torch.Tensor
    source_entropy: torch.Tensor
    target_entropy: torch.Tensor


def _check_shapes(spec: BAMSpec, sources, columns, target_rows, target_columns) -> int:
    if sources.shape[0] % spec.n_views:
        raise ValueError(f"{sources.shape[0]} rows are not a multiple of n_views={spec.n_views}")
    batch = sources.shape[0] // spec.n_views
    n_cols = spec.n_targets * batch * spec.world
    if columns.shape[0] != n_cols or target_columns.shape[0] != n_cols:
        raise ValueError(f"expected {n_cols} columns (G*B*W), got {columns.shape[0]} and "
                         f"{target_columns.shape[0]}")
    if target_rows.shape != sources.shape:
        raise ValueError(f"target rows {tuple(target_rows.shape)} differ from sources "
                         f"{tuple(sources.shape)}")
    if spec.top_k > n_cols:
        raise ValueError(f"top_k={spec.top_k} exceeds the {n_cols} target columns")
    return batch


def _targets_from_matrix(spec: BAMSpec, target_rows, target_columns, mask, batch):
    scores = target_rows @ target_columns.T
    p = sinkhorn(scores, spec.sinkhorn_eps, spec.sinkhorn_iters, mask, spec.n_masked,
                 spec.distributed)[: spec.n_targets * batch]
    if spec.top_k > 0:
        p = keep_top_k(p, spec.n_targets, spec.top_k)
    return p


def bam_loss(sources: torch.Tensor, columns: torch.Tensor, target_rows: torch.Tensor,
             target_columns: torch.Tensor, spec: BAMSpec) -> BAMOutput:
    """BAM with the whole ``(V*B) x N`` matrices in memory (the official computation).

    ``sources`` ``(V*B, D)`` carries the gradient; ``columns`` ``(N, D)`` does too when it is
    the student's own (no teacher). ``target_rows``/``target_columns`` give the target's
    similarities and receive no gradient.
    """
    batch = _check_shapes(spec, sources, columns, target_rows, target_columns)
    mask = (positive_mask(batch, spec.n_views, spec.n_targets, spec.world, spec.rank,
                          sources.device, spec.masked_images) if spec.positive_masking else None)
    with torch.no_grad():
        targets = _targets_from_matrix(spec, target_rows.detach(), target_columns.detach(),
                                       mask, batch)
    log_attn = log_attention(sources, columns, spec.temperature, mask)
    loss = matching_loss(log_attn, targets, spec.n_views, spec.n_targets, mask)
    with torch.no_grad():
        source_entropy = mean_row_entropy(log_attn.exp(), log_attn)
        target_entropy = mean_row_entropy(targets)
    return BAMOutput(loss, source_entropy, target_entropy)


# --------------------------------------------------------------------------- blockwise


def _image_blocks(batch: int, block_images: int, device) -> list[torch.Tensor]:
    return list(torch.arange(batch, device=device).split(block_images))


def _block_rows(images: torch.Tensor, batch: int, n_views: int) -> torch.Tensor:
    """Row indices of every view of ``images``, view-major: ``v*B + images``."""
    views = torch.arange(n_views, device=images.device).unsqueeze(1)
    return (views * batch + images.unsqueeze(0)).reshape(-1)


def _block_kernel(spec: BAMSpec, rows: torch.Tensor, target_columns: torch.Tensor,
                  mask: torch.Tensor | None, shift: torch.Tensor | None = None) -> torch.Tensor:
    logits = _masked_logits(rows @ target_columns.T, spec.sinkhorn_eps, mask)
    return logits if shift is None else torch.exp(logits - shift)


def _block_mask(spec: BAMSpec, images: torch.Tensor, batch: int, n_views: int):
    if not spec.positive_masking:
        return None
    return positive_mask_for_images(images, n_views, spec.n_targets, batch, spec.world, spec.rank,
                                    spec.masked_images)


@torch.no_grad()
def sinkhorn_column_scaling(target_rows: torch.Tensor, target_columns: torch.Tensor,
                            spec: BAMSpec, block_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sinkhorn` as scaling vectors, walking the rows in blocks; returns ``(b, M)``.

    Sinkhorn keeps ``Q = diag(a) K diag(b)``; the final row normalisation cancels ``a``, so the
    targets are ``P_i = K_i * b / (K_i . b)``. With ``a = 1/sum(K)`` to start, each iteration is
    ``b = r / (K^T a)`` (all-reduced over processes), then ``a = c / (K b)``; the last ``a`` is
    never used. Only ``b`` (length N), ``a`` per block and the column accumulator are held.
    """
    batch = target_rows.shape[0] // spec.n_views
    world = world_size() if spec.distributed else 1
    blocks = _image_blocks(batch, block_images, target_rows.device)

    def rows_and_mask(images):
        rows = target_rows[_block_rows(images, batch, spec.n_views)]
        return rows, _block_mask(spec, images, batch, spec.n_views)

    shift = target_rows.new_full((), float("-inf"))
    for images in blocks:
        rows, mask = rows_and_mask(images)
        shift = torch.maximum(shift, _block_kernel(spec, rows, target_columns, mask).max())
    shift = _all_reduce(shift, dist.ReduceOp.MAX, spec.distributed)

    n_cols = target_columns.shape[0]
    if spec.sinkhorn_iters == 0:  # no balancing: each row is the plain softmax of its kernel
        return target_columns.new_ones(n_cols), shift
    column_mass = 1.0 / (n_cols - spec.n_masked)
    row_mass = 1.0 / (world * spec.n_views * batch)
    column_sums = target_columns.new_zeros(n_cols)
    for images in blocks:
        rows, mask = rows_and_mask(images)
        column_sums += _block_kernel(spec, rows, target_columns, mask, shift).sum(dim=0)
    column_sums = _all_reduce(column_sums, dist.ReduceOp.SUM, spec.distributed)
    weighted = column_sums / column_sums.sum()  # K^T a with a = 1/sum(K)
    scale = column_mass / weighted
    for _ in range(spec.sinkhorn_iters - 1):
        weighted = torch.zeros_like(weighted)
        for images in blocks:
            rows, mask = rows_and_mask(images)
            kernel = _block_kernel(spec, rows, target_columns, mask, shift)
            row_scale = row_mass / (kernel @ scale)
            weighted += kernel.T @ row_scale
        weighted = _all_reduce(weighted, dist.ReduceOp.SUM, spec.distributed)
        scale = column_mass / weighted
    return scale, shift


def _block_loss(sources, columns, target_rows, target_columns, scale, shift, images,
                spec: BAMSpec, batch: int):
    """Loss of one block of images (already weighted by its share of the batch) and entropies."""
    rows = _block_rows(images, batch, spec.n_views)
    mask = _block_mask(spec, images, batch, spec.n_views)
    n = images.numel()
    with torch.no_grad():
        global_rows = rows[: spec.n_targets * n]
        global_mask = None if mask is None else mask[: spec.n_targets * n]
        kernel = _block_kernel(spec, target_rows[global_rows], target_columns, global_mask, shift)
        targets = kernel * scale
        targets = targets / targets.sum(dim=1, keepdim=True)
        if spec.top_k > 0:
            targets = keep_top_k(targets, spec.n_targets, spec.top_k)
    log_attn = log_attention(sources[rows], columns, spec.temperature, mask)
    loss = matching_loss(log_attn, targets, spec.n_views, spec.n_targets, mask) * (n / batch)
    with torch.no_grad():
        source_entropy = mean_row_entropy(log_attn.exp(), log_attn) * (n / batch)
        target_entropy = mean_row_entropy(targets) * (n / batch)
    return loss, source_entropy, target_entropy


def bam_loss_blockwise(sources: torch.Tensor, columns: torch.Tensor, target_rows: torch.Tensor,
                       target_columns: torch.Tensor, spec: BAMSpec,
                       block_images: int = 64) -> BAMOutput:
    """:func:`bam_loss` computed ``block_images`` images (all their views) at a time.

    Same loss and gradients; the largest matrices held are ``(V*block) x N`` instead of
    ``(V*B) x N``. Costs ``iters + 1`` extra passes of the target similarities (Sinkhorn's
    maximum, column sums and ``iters - 1`` scaling rounds) and one recomputation in backward.
    """
    batch = _check_shapes(spec, sources, columns, target_rows, target_columns)
    if block_images <= 0:
        raise ValueError(f"block_images must be positive, got {block_images}")
    target_rows, target_columns = target_rows.detach(), target_columns.detach()
    scale, shift = sinkhorn_column_scaling(target_rows, target_columns, spec, block_images)
    loss = sources.new_zeros(())
    source_entropy = target_entropy = 0.0
    for images in _image_blocks(batch, block_images, sources.device):
        block_loss, block_src_h, block_tgt_h = checkpoint(
            _block_loss, sources, columns, target_rows, target_columns, scale, shift, images,
            spec, batch, use_reentrant=False,
        )
        loss = loss + block_loss
        source_entropy = source_entropy + block_src_h.detach()
        target_entropy = target_entropy + block_tgt_h.detach()
    return BAMOutput(loss, source_entropy, target_entropy)
