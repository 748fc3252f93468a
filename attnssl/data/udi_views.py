"""UDI's views: overlapping crops, tracked through flips, and stratified patch samples mapped
between them (Su & Ji 2024; official ``udi_augmentation.DataAugmentation``, QingSuML/udi).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from attnssl.data.positions import map_samples, shift_to_overlap, stratified_sample, union_box
from attnssl.data.views import MultiCropViews, ViewSpec, sample_crop_boxes


@dataclass  # not frozen: Fabric's precision plugins rebuild dataclass inputs field by field
class UDISampling:
    """Sampled patches of one batch and where they fall in the global views.

    With ``S`` samples per global view (one draw per image, the same grid positions in both
    global views), ``S_l`` per local view (one draw per image shared by the local views) and
    ``N`` patches in a global view:

    * ``student_maps (2, B, S, N)``: one-hot rows picking each global view's own samples;
    * ``valid (2, B, S)``: ``valid[v]`` is true where view v's sample lies inside the other
      global view (only those enter the patch loss and the multimodal target);
    * ``teacher_maps (2, B, S, N)``: ``teacher_maps[g]`` holds bilinear rows over global view
      g's patches at the positions of the *other* view's samples (zero rows where invalid);
    * ``local_maps (L, 2, B, S_l, N)`` and ``local_valid (L, 2, B, S_l)``: the same for local
      view l's samples in global view g.
    """

    student_maps: torch.Tensor
    valid: torch.Tensor
    teacher_maps: torch.Tensor
    local_maps: torch.Tensor
    local_valid: torch.Tensor

    def to(self, device) -> UDISampling:
        return UDISampling(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class UDIViews(MultiCropViews):
    """Multi-crop views for UDI: global view 2 is moved to overlap global view 1, local views
    to overlap the two globals' union box (``shift_to_overlap``); after the views,
    ``extra_inputs()`` gives the batch's :class:`UDISampling` (``{"sampling": ...}``).

    The official code moves the locals toward a box it calls the globals' "intersection": the
    minimum of their first corners and maximum of their second ones, taken after a flip has
    swapped a box's x-coordinates. Unflipped, that is the globals' union; with a flipped view
    it is a mixed box (both flipped: their intersection along x). We always use the union.
    """

    def __init__(self, cfg, image_size: int, channels: int, mean, std, patch_size: int,
                 window_global: int, window_local: int, seed: int = 0):
        super().__init__(cfg, image_size, channels, mean, std, seed)
        if cfg.global_crops != 2:
            raise ValueError(f"udi needs views.global_crops=2, got {cfg.global_crops}")
        self.patch_size = patch_size
        self.windows = (window_global, window_local)
        self.grids = (self.specs[0].size // patch_size, self.specs[-1].size // patch_size)
        checks = [("sampling_window_global", window_global, self.grids[0], "views.global_size")]
        if cfg.local_crops:
            checks.append(("sampling_window_local", window_local, self.grids[1], "views.local_size"))
        for key, window, grid, size_key in checks:
            if window > grid:
                raise ValueError(f"method.{key}={window} is larger than the {grid}x{grid} patch "
                                 f"grid of {size_key}; accepted: 1..{grid}")
        self.last_sampling: UDISampling | None = None

    def _crop_boxes(self, index: int, batch: int, image_size: int, spec: ViewSpec) -> torch.Tensor:
        boxes = sample_crop_boxes(batch, image_size, spec.scale, self.generator)
        if index == 0:
            return boxes
        first = self.last_boxes[0].boxes
        reference = first if index == 1 else union_box(first, self.last_boxes[1].boxes)
        return shift_to_overlap(boxes, reference, image_size)

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        views = super().__call__(images)
        self.last_sampling = self._sample(images.shape[0])
        return views

    def extra_inputs(self) -> dict:
        return {"sampling": self.last_sampling}

    def _sample(self, batch: int) -> UDISampling:
        grid, local_grid = self.grids
        crops = self.last_boxes
        samples = stratified_sample(batch, grid, self.windows[0], self.generator)
        into_1, valid_0 = map_samples(samples, grid, crops[0].boxes, crops[0].flipped,
                                      grid, crops[1].boxes, crops[1].flipped)
        into_0, valid_1 = map_samples(samples, grid, crops[1].boxes, crops[1].flipped,
                                      grid, crops[0].boxes, crops[0].flipped)
        one_hot = F.one_hot(samples, grid * grid).float()
        local_maps, local_valid = [], []
        if self.cfg.local_crops:
            local_samples = stratified_sample(batch, local_grid, self.windows[1], self.generator)
            for crop in crops[2:]:
                mapped = [map_samples(local_samples, local_grid, crop.boxes, crop.flipped,
                                      grid, crops[g].boxes, crops[g].flipped) for g in (0, 1)]
                local_maps.append(torch.stack([m for m, _ in mapped]))
                local_valid.append(torch.stack([v for _, v in mapped]))
        empty_maps = one_hot.new_zeros(0, 2, batch, 0, grid * grid)
        return UDISampling(
            student_maps=torch.stack([one_hot, one_hot]),
            valid=torch.stack([valid_0, valid_1]),
            teacher_maps=torch.stack([into_0, into_1]),
            local_maps=torch.stack(local_maps) if local_maps else empty_maps,
            local_valid=(torch.stack(local_valid) if local_valid
                         else torch.zeros(0, 2, batch, 0, dtype=torch.bool)),
        )
