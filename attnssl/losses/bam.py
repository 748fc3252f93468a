"""BAM's loss module: embeddings in, balanced self-attention matching loss out."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnssl.functional.bam import BAMOutput, BAMSpec, bam_loss, bam_loss_blockwise
from attnssl.functional.distributed import gather_with_grad, rank, world_size

# the full path holds about eight (V*B) x N matrices; above this many entries use blocks
BLOCKWISE_AUTO_ENTRIES = 2**22
BLOCK_ENTRIES = 2**20


def view_major_columns(local_globals: torch.Tensor, n_targets: int) -> torch.Tensor:
    """Gather every process's ``(G*B, D)`` global views as ``(G*B*W, D)``, view-major.

    The all-gather yields process-major blocks; reorder so that column ``g*B*W + r*B + i`` is
    global view g of image i on process r (the official ``gather_sort_tensors``). Gradients
    flow back to every process (see :func:`gather_with_grad`).
    """
    gathered = gather_with_grad(local_globals)
    world = gathered.shape[0] // local_globals.shape[0]
    dim = local_globals.shape[-1]
    return gathered.view(world, n_targets, -1, dim).transpose(0, 1).reshape(-1, dim)


class BAMLoss(nn.Module):
    """Balanced self-attention matching (Shalam & Korman, ECCV 2024).

    ``BAMLoss(n_views)(student, teacher=None, sinkhorn_eps=None).loss``; ``student`` and ``teacher`` are
    ``(n_views * B, D)`` embeddings stacked view-major, not normalised, the first
    ``n_global_views`` views being the global ones. The maths is in :mod:`attnssl.functional.bam`.

    * With a teacher (the official ``DistillBAMLoss``): the columns are the teacher's global
      views, the source is ``z C_t^T`` and the target is Sinkhorn over ``z_t C_t^T``.
    * Without (the official ``BAMLoss``): the columns are the student's own global views and
      carry gradient; the target is Sinkhorn over the same similarities, without gradient.
      (At the official HEAD this path cannot be built: ``build_from_args`` passes an unknown
      ``ot_reg`` argument; ours follows its ``compute_loss``.)

    ``normalization="global"`` (the paper's) gathers the columns from every process and
    all-reduces Sinkhorn's maximum and sums, so W processes compute exactly one process's loss
    on the global batch; ``"local"`` balances each process's batch alone (the ablation).
    ``blockwise`` ("auto", True, False) picks :func:`bam_loss_blockwise`, automatically once a
    ``(V*B) x N`` matrix exceeds ``BLOCKWISE_AUTO_ENTRIES`` entries. The loss is computed in
    float32 (autocast off) whatever the precision of the embeddings; the official code runs it
    under fp16 autocast, which rounds the similarities before they are divided by eps.
    ``"local"`` on a single process is the same as ``"global"`` (a warning says so).

    ``sinkhorn_eps`` is the method's scheduled value for this step (the constructor's when
    omitted); ``masked_images`` (bool, one per local image) limits positive masking to those
    images this step (partial masking); the call returns a
    :class:`attnssl.functional.bam.BAMOutput` (the loss and the source and target entropies).
    """

    def __init__(self, n_views: int, n_global_views: int = 2, temperature: float = 0.1,
                 sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3,
                 positive_masking: bool = True, top_k: int = 0,
                 normalization: Literal["global", "local"] = "global",
                 blockwise: bool | Literal["auto"] = "auto", block_images: int | None = None):
        super().__init__()
        if not 1 <= n_global_views <= n_views:
            raise ValueError(f"n_global_views must be in 1..n_views={n_views}, got {n_global_views}")
        if normalization not in ("global", "local"):
            raise ValueError(f"normalization must be 'global' or 'local', got {normalization!r}")
        if blockwise not in ("auto", True, False):
            raise ValueError(f"blockwise must be 'auto', true or false, got {blockwise!r}")
        if temperature <= 0 or sinkhorn_eps <= 0 or sinkhorn_iters < 0 or top_k < 0:
            raise ValueError("temperature and sinkhorn_eps must be > 0, sinkhorn_iters >= 0 "
                             "(0: no balancing), top_k >= 0")
        self.n_views, self.n_global_views = n_views, n_global_views
        self.temperature, self.sinkhorn_eps, self.sinkhorn_iters = (
            temperature, sinkhorn_eps, sinkhorn_iters)
        self.positive_masking, self.top_k = positive_masking, top_k
        self.normalization, self.blockwise, self.block_images = (
            normalization, blockwise, block_images)
        self._warned_local = False

    def spec(self, sinkhorn_eps: float | None = None,
             masked_images: torch.Tensor | None = None) -> BAMSpec:
        distributed = self.normalization == "global" and world_size() > 1
        return BAMSpec(
            n_views=self.n_views, n_targets=self.n_global_views, temperature=self.temperature,
            sinkhorn_eps=self.sinkhorn_eps if sinkhorn_eps is None else sinkhorn_eps,
            sinkhorn_iters=self.sinkhorn_iters,
            positive_masking=self.positive_masking, top_k=self.top_k,
            world=world_size() if distributed else 1, rank=rank() if distributed else 0,
            distributed=distributed, masked_images=masked_images,
        )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None = None,
                sinkhorn_eps: float | None = None,
                masked_images: torch.Tensor | None = None) -> BAMOutput:
        spec = self.spec(sinkhorn_eps, masked_images)
        if self.normalization == "local" and world_size() == 1 and not self._warned_local:
            warnings.warn("BAM normalization='local' with one process is the same as 'global'",
                          stacklevel=2)
            self._warned_local = True
        if student.shape[0] % self.n_views:
            raise ValueError(f"student has {student.shape[0]} rows, not a multiple of "
                             f"n_views={self.n_views}")
        if teacher is not None and teacher.shape != student.shape:
            raise ValueError(f"teacher {tuple(teacher.shape)} and student "
                             f"{tuple(student.shape)} differ in shape")
        batch = student.shape[0] // self.n_views
        if self.positive_masking and batch * spec.world < 2:
            raise ValueError("positive masking needs at least 2 images in the global batch")
        n_globals = self.n_global_views * batch
        dtype = torch.promote_types(student.dtype, torch.float32)
        with torch.autocast(device_type=student.device.type, enabled=False):
            z = F.normalize(student.to(dtype), dim=-1)
            if teacher is None:
                target_rows = z.detach()
                columns = self._columns(z[:n_globals], spec)
                target_columns = columns.detach()
            else:
                target_rows = F.normalize(teacher.detach().to(dtype), dim=-1)
                columns = target_columns = self._columns(target_rows[:n_globals], spec)
            n_cols = columns.shape[0]
            if self._use_blocks(z.shape[0] * n_cols):
                block = self.block_images or max(1, BLOCK_ENTRIES // (self.n_views * n_cols))
                out = bam_loss_blockwise(z, columns, target_rows, target_columns, spec, block)
            else:
                out = bam_loss(z, columns, target_rows, target_columns, spec)
        return out

    def _columns(self, local_globals: torch.Tensor, spec: BAMSpec) -> torch.Tensor:
        if not spec.distributed:
            return local_globals
        return view_major_columns(local_globals, self.n_global_views)

    def _use_blocks(self, entries: int) -> bool:
        if self.blockwise == "auto":
            return entries > BLOCKWISE_AUTO_ENTRIES
        return bool(self.blockwise)
