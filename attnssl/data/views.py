"""Multi-crop views made on whole batches of images at once.

Per-image PIL pipelines cost a Python call per image per view per operation; on 2 cores that
is slower than a small ViT's step. Here every random parameter is drawn for the whole batch
from one ``torch.Generator`` (saved in checkpoints, so a resumed run sees the same views) and
each operation is one tensor call over the batch:

- random resized crop + horizontal flip: one ``affine_grid`` / ``grid_sample`` per view
  (bilinear, or bicubic clamped to [0, 1] as PIL's uint8 result is; the crop box is drawn as
  in torchvision: area fraction ``s ~ U(scale)``, log aspect ratio ``~ U(log 3/4, log 4/3)``;
  sides longer than the image are clipped to it instead of torchvision's ten retries);
- colour jitter (SimCLR/DINO: brightness, contrast, saturation, hue, with probability
  ``color_jitter_prob``), random grayscale, Gaussian blur and solarisation, with DINO's
  per-view probabilities; gamma (``x ** g``) and random erasing (a rectangle set to black), which
  suit grayscale images too. Hue is rotated in YIQ space, a linear stand-in for torchvision's HSV
  shift; the four jitters are applied in a fixed order rather than a random one. Grayscale
  datasets get brightness and contrast only. Each effect is computed on the images drawn for
  it only (:func:`on_chosen`), its parameters drawn for every image as before.

Boxes are returned in pixel coordinates of the source image so later methods can map positions
between views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R 601 luma, the weights torchvision uses for grayscale.
LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class CropBoxes:
    """Per-image crop boxes ``(B, 4)`` as (x0, y0, x1, y1) in source pixels, and flips ``(B,)``."""

    boxes: torch.Tensor
    flipped: torch.Tensor


def sample_crop_boxes(
    batch: int, image_size: int, scale: tuple[float, float], generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Random resized crop boxes ``(B, 4)`` (x0, y0, x1, y1) in pixels of a square image."""
    area = torch.empty(batch).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                            generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    x0 = torch.rand(batch, generator=generator) * (1 - width)
    y0 = torch.rand(batch, generator=generator) * (1 - height)
    return torch.stack([x0, y0, x0 + width, y0 + height], dim=1) * image_size


def crop_resize(
    images: torch.Tensor, boxes: torch.Tensor, flipped: torch.Tensor, size: int,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Crop each image to its box, flip it where ``flipped``, resize to ``size``.

    ``mode`` is ``"bilinear"`` or ``"bicubic"`` (Keys' cubic, a = -0.75, PyTorch's kernel; its
    overshoot at edges is clamped back to the [0, 1] pixel range).
    """
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"crop interpolation must be 'bilinear' or 'bicubic', got {mode!r}")
    batch, _, height, width = images.shape
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1]
    x0, y0, x1, y1 = (boxes.cpu() / torch.tensor([width, height, width, height])).unbind(1)
    scale_x = (x1 - x0) * torch.where(flipped, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = scale_x
    theta[:, 0, 2] = x0 + x1 - 1
    theta[:, 1, 1] = y1 - y0
    theta[:, 1, 2] = y0 + y1 - 1
    grid = F.affine_grid(theta.to(images.device, images.dtype),
                         [batch, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp(0.0, 1.0) if mode == "bicubic" else out


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per image, shaped to broadcast over ``like`` and on its device (parameters
    are drawn on the CPU, so a run draws the same ones whatever device makes its views)."""
    return values.to(like.device).view(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma ``(B, 1, H, W)`` of RGB or grayscale images in [0, 1]."""
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_sample(factor, images)).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma: ``(x - m) * factor + m``."""
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * _per_sample(factor, images) + mean).clamp(0, 1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    gray = grayscale(images)
    return ((images - gray) * _per_sample(factor, images) + gray).clamp(0, 1)


def rotate_hue(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of YIQ by ``2 pi * turns`` per image."""
    to_yiq = _RGB_TO_YIQ.to(images.dtype)
    from_yiq = torch.linalg.inv(to_yiq)
    angle = 2 * math.pi * turns.to(images.dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(turns.shape[0], 3, 3, dtype=images.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = (from_yiq @ rotation @ to_yiq).to(images.device)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, images).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per image, reflect padding."""
    batch, channels, height, width = images.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.view(-1, 1).to(images.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(images.device)  # (B, k)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B*C, k)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def solarize(images: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return torch.where(images >= threshold, 1 - images, images)


def adjust_gamma(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``x ** gamma`` per image (torchvision's ``adjust_gamma`` with gain 1) on [0, 1] pixels:
    gamma < 1 lifts the dark tones, > 1 deepens them; black and white stay."""
    return images.clamp(0, 1).pow(_per_sample(gamma, images))


def erase_rectangles(images: torch.Tensor, boxes: torch.Tensor, erase: torch.Tensor,
                     value: float = 0.0) -> torch.Tensor:
    """Set the pixels inside each image's box ``(x0, y0, x1, y1)`` (half-open, in pixels) to
    ``value`` where ``erase``; other images are returned unchanged."""
    height, width = images.shape[-2:]
    ys = torch.arange(height, dtype=boxes.dtype).view(1, height, 1)
    xs = torch.arange(width, dtype=boxes.dtype).view(1, 1, width)
    x0, y0, x1, y1 = (b.view(-1, 1, 1) for b in boxes.unbind(1))
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1) & erase.view(-1, 1, 1)
    return images.masked_fill(inside.unsqueeze(1).to(images.device), value)


def sample_erasing_boxes(batch: int, height: int, width: int, scale: tuple[float, float],
                         generator: torch.Generator, ratio: tuple[float, float] = (0.3, 3.3),
                         ) -> torch.Tensor:
    """Random erasing boxes ``(B, 4)`` in whole pixels (Zhong et al. 2020, torchvision's
    ``RandomErasing``): area ``s * H * W`` with ``s ~ U(scale)``, log aspect ratio
    ``~ U(log ratio)``, sides rounded and clipped to the image, position uniform. torchvision
    retries up to ten times when a box does not fit; here its sides are clipped instead."""
    area = torch.empty(batch).uniform_(*scale, generator=generator) * height * width
    aspect = torch.exp(torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                   generator=generator))
    h = torch.sqrt(area * aspect).round().clamp(1, height)
    w = torch.sqrt(area / aspect).round().clamp(1, width)
    y0 = (torch.rand(batch, generator=generator) * (height - h + 1)).floor()
    x0 = (torch.rand(batch, generator=generator) * (width - w + 1)).floor()
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def on_chosen(images: torch.Tensor, chosen: torch.Tensor, change, *per_image: torch.Tensor
              ) -> torch.Tensor:
    """``change(images, *per_image)`` on the images where ``chosen`` (bool, one per image) and
    the others left as they are, computing the change on the chosen images only; ``images`` is
    updated in place (the caller owns it). ``per_image`` are parameters drawn for every image,
    cut to the chosen ones, so the random stream does not depend on which were chosen.

    Elementwise changes give the same bits as changing the whole batch; a blur of a subset can
    differ from the whole batch's in the last bit (convolution kernels are picked by size)."""
    if bool(chosen.all()):
        return change(images, *per_image)
    index = chosen.nonzero().flatten()
    if index.numel() == 0:
        return images
    changed = change(images[index.to(images.device)], *(p[index] for p in per_image))
    return images.index_copy_(0, index.to(images.device), changed)


@dataclass(frozen=True)
class ViewSpec:
    """How one view is made: crop size and scale, and its probabilities of blur and solarise."""

    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float


class MultiCropViews:
    """G global and L local views of a batch of uint8 images, normalised for the backbone.

    ``views(images)`` returns a list of G + L float tensors ``(B, C, size, size)``;
    ``views.last_boxes`` holds each view's :class:`CropBoxes`.
    """

    def __init__(self, cfg, image_size: int, channels: int, mean, std, seed: int = 0):
        self.channels = channels
        self.image_size = image_size
        self.cfg = cfg
        global_size = cfg.global_size or image_size
        local_size = cfg.local_size or max(8, round(image_size * 3 / 7))
        self.specs = [
            ViewSpec(global_size, tuple(cfg.global_scale),
                     cfg.blur_prob[0] if g == 0 else cfg.blur_prob[1],
                     cfg.solarize_prob[0] if g == 0 else cfg.solarize_prob[1])
            for g in range(cfg.global_crops)
        ] + [
            ViewSpec(local_size, tuple(cfg.local_scale), cfg.local_blur_prob, 0.0)
            for _ in range(cfg.local_crops)
        ]
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.last_boxes: list[CropBoxes] = []

    @property
    def num_global(self) -> int:
        return self.cfg.global_crops

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _bernoulli(self, batch: int, prob: float) -> torch.Tensor:
        return torch.rand(batch, generator=self.generator) < prob

    def _uniform(self, batch: int, low: float, high: float) -> torch.Tensor:
        return torch.empty(batch).uniform_(low, high, generator=self.generator)

    def _colour(self, x: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
        cfg, batch = self.cfg, x.shape[0]
        if cfg.color_jitter_prob > 0:
            jitter = self._bernoulli(batch, cfg.color_jitter_prob)
            steps, params = [], []
            if cfg.brightness > 0:
                steps.append(adjust_brightness)
                params.append(self._uniform(batch, max(0.0, 1 - cfg.brightness),
                                            1 + cfg.brightness))
            if cfg.contrast > 0:
                steps.append(adjust_contrast)
                params.append(self._uniform(batch, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast))
            if self.channels == 3 and cfg.saturation > 0:
                steps.append(adjust_saturation)
                params.append(self._uniform(batch, max(0.0, 1 - cfg.saturation),
                                            1 + cfg.saturation))
            if self.channels == 3 and cfg.hue > 0:
                steps.append(rotate_hue)
                params.append(self._uniform(batch, -cfg.hue, cfg.hue))

            def jittered(y, *factors):
                for step, factor in zip(steps, factors, strict=True):
                    y = step(y, factor)
                return y

            x = on_chosen(x, jitter, jittered, *params)
        if cfg.gamma_prob > 0:
            gamma = self._bernoulli(batch, cfg.gamma_prob)
            x = on_chosen(x, gamma, adjust_gamma, self._uniform(batch, *cfg.gamma))
        if self.channels == 3 and cfg.grayscale_prob > 0:
            gray = self._bernoulli(batch, cfg.grayscale_prob)
            x = on_chosen(x, gray, lambda y: grayscale(y).expand_as(y).contiguous())
        if spec.blur_prob > 0:
            blur = self._bernoulli(batch, spec.blur_prob)
            sigma = self._uniform(batch, *cfg.blur_sigma)
            kernel = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
            x = on_chosen(x, blur, lambda y, s: gaussian_blur(y, s, kernel), sigma)
        if spec.solarize_prob > 0:
            x = on_chosen(x, self._bernoulli(batch, spec.solarize_prob), solarize)
        if cfg.erasing_prob > 0:
            erase = self._bernoulli(batch, cfg.erasing_prob)
            boxes = sample_erasing_boxes(batch, *x.shape[-2:], cfg.erasing_scale, self.generator)
            x = erase_rectangles(x, boxes, erase)
        return x

    def _crop_boxes(self, index: int, batch: int, image_size: int, spec: ViewSpec) -> torch.Tensor:
        """View ``index``'s crop boxes; earlier views' boxes are in ``self.last_boxes``."""
        return sample_crop_boxes(batch, image_size, spec.scale, self.generator)

    def extra_inputs(self) -> dict:
        """What the method needs besides the views, for the last batch (nothing here)."""
        return {}

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images (B, {self.channels}, H, W), got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        batch, size = x.shape[0], x.shape[-1]
        views, self.last_boxes = [], []
        for index, spec in enumerate(self.specs):
            boxes = self._crop_boxes(index, batch, size, spec)
            flipped = self._bernoulli(batch, self.cfg.hflip_prob)
            view = self._colour(crop_resize(x, boxes, flipped, spec.size, self.cfg.interpolation), spec)
            views.append((view - self.mean.to(view.device)) / self.std.to(view.device))
            self.last_boxes.append(CropBoxes(boxes, flipped))
        return views


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0, 1] images to the backbone's input scale (no augmentation; for evaluation)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
