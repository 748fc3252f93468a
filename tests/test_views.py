import pytest
import torch

from attnssl.config import ViewsSection
from attnssl.data.views import (
    MultiCropViews,
    adjust_contrast,
    adjust_gamma,
    adjust_saturation,
    crop_resize,
    erase_rectangles,
    gaussian_blur,
    grayscale,
    rotate_hue,
    sample_crop_boxes,
    sample_erasing_boxes,
)


def test_full_box_without_flip_is_identity(generator):
    images = torch.rand(3, 3, 12, 12, generator=generator)
    boxes = torch.tensor([[0.0, 0.0, 12.0, 12.0]]).repeat(3, 1)
    out = crop_resize(images, boxes, torch.zeros(3, dtype=torch.bool), 12)
    assert torch.allclose(out, images, atol=1e-5)


def test_flip_and_crop_select_the_box(generator):
    images = torch.rand(2, 1, 8, 8, generator=generator)
    boxes = torch.tensor([[4.0, 0.0, 8.0, 4.0], [0.0, 4.0, 4.0, 8.0]])
    flipped = torch.tensor([True, False])
    out = crop_resize(images, boxes, flipped, 4)
    assert torch.allclose(out[0, 0], images[0, 0, 0:4, 4:8].flip(-1), atol=1e-5)
    assert torch.allclose(out[1, 0], images[1, 0, 4:8, 0:4], atol=1e-5)


def test_bicubic_resize_matches_interpolate_and_stays_in_range(generator):
    images = torch.rand(2, 1, 8, 8, generator=generator)
    full = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(2, 1)
    flipped = torch.tensor([False, True])
    out = crop_resize(images, full, flipped, 16, mode="bicubic")
    expected = torch.nn.functional.interpolate(images, size=16, mode="bicubic",
                                               align_corners=False).clamp(0, 1)
    assert torch.allclose(out[0], expected[0], atol=1e-5)
    assert torch.allclose(out[1], expected[1].flip(-1), atol=1e-5)
    # the cubic kernel overshoots at a hard edge; the crop must not leave the pixel range
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1.0
    unclamped = torch.nn.functional.interpolate(edge, size=16, mode="bicubic", align_corners=False)
    assert unclamped.max() > 1.0
    sharp = crop_resize(edge, full[:1], flipped[:1], 16, mode="bicubic")
    assert sharp.min() >= 0.0 and sharp.max() <= 1.0
    with pytest.raises(ValueError, match="bilinear' or 'bicubic"):
        crop_resize(images, full, flipped, 16, mode="nearest")


def test_crop_boxes_respect_scale_and_image(generator):
    boxes = sample_crop_boxes(4000, 28, (0.4, 1.0), generator)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 28 + 1e-4).all()
    area = width * height / 28**2
    assert area.max() <= 1.0 + 1e-5 and area.min() >= 0.3  # clipping only shrinks boxes
    assert (area > 0.4).float().mean() > 0.9


def test_colour_operations_keep_their_invariants(generator):
    images = torch.rand(4, 3, 6, 6, generator=generator)
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert torch.allclose(rotate_hue(images, zeros), images, atol=1e-5)
    assert torch.allclose(adjust_saturation(images, ones), images, atol=1e-6)
    gray = adjust_saturation(images, zeros)
    assert torch.allclose(gray, grayscale(images).expand_as(images), atol=1e-6)
    flat = adjust_contrast(images, zeros)
    assert torch.allclose(flat.std(dim=(1, 2, 3)), zeros, atol=1e-6)
    # a hue rotation moves colour but not luma (away from the clamp at 0 and 1)
    mid = 0.25 + 0.5 * images
    rotated = rotate_hue(mid, torch.full((4,), 0.1))
    assert not torch.allclose(rotated, mid, atol=1e-3)
    assert torch.allclose(grayscale(rotated), grayscale(mid), atol=2e-3)


def test_blur_keeps_constant_images_and_smooths_noise(generator):
    constant = torch.full((2, 3, 10, 10), 0.3)
    assert torch.allclose(gaussian_blur(constant, torch.tensor([0.5, 2.0]), 5), constant, atol=1e-6)
    noise = torch.rand(2, 1, 16, 16, generator=generator)
    blurred = gaussian_blur(noise, torch.tensor([0.1, 2.0]), 5)
    assert torch.allclose(blurred[0], noise[0], atol=1e-3)  # tiny sigma: nearly identity
    assert blurred[1].std() < 0.6 * noise[1].std()


def make_views(seed: int = 0, **overrides):
    cfg = ViewsSection(global_crops=2, local_crops=3, **overrides)
    return MultiCropViews(cfg, 28, 3, (0.5,) * 3, (0.25,) * 3, seed=seed)


def test_multicrop_shapes_normalisation_and_boxes():
    images = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    views = make_views()
    out = views(images)
    assert [tuple(v.shape) for v in out] == [(5, 3, 28, 28)] * 2 + [(5, 3, 12, 12)] * 3
    assert len(views.last_boxes) == 5 and views.num_global == 2
    for v in out:
        assert v.min() >= (0 - 0.5) / 0.25 - 1e-5 and v.max() <= (1 - 0.5) / 0.25 + 1e-5


def test_views_are_seeded_and_resume_from_state():
    images = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    a, b = make_views(seed=1), make_views(seed=1)
    first = a(images)
    assert all(torch.equal(x, y) for x, y in zip(first, b(images), strict=True))
    saved = a.state_dict()
    following = a(images)
    assert not torch.equal(following[0], first[0])
    c = make_views(seed=99)
    c.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(following, c(images), strict=True))


def test_grayscale_images_get_brightness_and_contrast_only():
    cfg = ViewsSection(color_jitter_prob=1.0, global_scale=(1.0, 1.0), hflip_prob=0.0,
                       blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))
    views = MultiCropViews(cfg, 8, 1, (0.0,), (1.0,), seed=0)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    out = views(images)[0]
    assert out.shape == (6, 1, 8, 8)
    assert not torch.allclose(out, images.float() / 255)  # jittered


def test_bad_image_shape_is_named():
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        make_views()(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_gamma_is_a_per_image_power_that_keeps_black_and_white(generator):
    images = torch.rand(4, 1, 6, 6, generator=generator)
    images[:, :, 0, 0], images[:, :, 0, 1] = 0.0, 1.0
    gamma = torch.tensor([0.5, 1.0, 1.5, 2.0])
    out = adjust_gamma(images, gamma)
    for i in range(4):  # the loop of the equation: y = x ** g_i
        assert torch.allclose(out[i], images[i] ** gamma[i].item())
    assert (out[:, :, 0, 0] == 0).all() and (out[:, :, 0, 1] == 1).all()
    assert (out[0] >= images[0]).all() and (out[3] <= images[3]).all()


def test_random_erasing_blanks_one_rectangle_of_the_asked_size(generator):
    height = width = 28
    boxes = sample_erasing_boxes(2000, height, width, (0.02, 0.33), generator)
    sides = boxes[:, 2:] - boxes[:, :2]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    share = sides.prod(1) / (height * width)
    assert share.min() > 0.005 and share.max() < 0.45  # the scale, give or take rounding and clips
    images = torch.rand(3, 1, height, width, generator=generator) + 0.1  # no black pixel yet
    box = torch.tensor([[2.0, 3.0, 10.0, 7.0]]).repeat(3, 1)
    out = erase_rectangles(images, box, torch.tensor([True, False, True]))
    expected = images.clone()
    for i in (0, 2):
        expected[i, :, 3:7, 2:10] = 0.0  # rows y0..y1-1, columns x0..x1-1
    assert torch.equal(out, expected)


def test_gamma_and_erasing_in_the_views_follow_their_probabilities():
    images = (torch.rand(512, 1, 28, 28) * 200 + 40).to(torch.uint8)  # no pixel is black
    plain = ViewsSection(global_crops=1, color_jitter_prob=0.0, blur_prob=(0.0, 0.0),
                         solarize_prob=(0.0, 0.0), hflip_prob=0.0, global_scale=(1.0, 1.0))
    erasing = plain.model_copy(update={"erasing_prob": 0.5})
    view = MultiCropViews(erasing, 28, 1, (0.0,), (1.0,), seed=0)(images)[0]
    erased = (view == 0).flatten(1).any(1).float().mean().item()
    assert 0.4 < erased < 0.6
    gamma = plain.model_copy(update={"gamma_prob": 1.0, "gamma": (2.0, 2.0)})
    view = MultiCropViews(gamma, 28, 1, (0.0,), (1.0,), seed=0)(images)[0]
    cropped = MultiCropViews(plain, 28, 1, (0.0,), (1.0,), seed=0)(images)[0]  # same crops
    assert torch.allclose(view, cropped ** 2, atol=1e-6)
    with pytest.raises(ValueError, match="erasing_scale upper bound must be <= 1"):
        ViewsSection(erasing_scale=(0.1, 1.5))


def test_an_effect_is_computed_on_the_chosen_images_only():
    from attnssl.data.views import adjust_brightness, on_chosen

    images = torch.rand(6, 3, 8, 8)
    factor = torch.linspace(0.5, 1.5, 6)
    chosen = torch.tensor([True, False, True, False, False, True])
    seen = []

    def brighten(batch, f):
        seen.append(batch.shape[0])
        return adjust_brightness(batch, f)

    expected = torch.where(chosen.view(-1, 1, 1, 1), adjust_brightness(images, factor), images)
    assert torch.equal(on_chosen(images.clone(), chosen, brighten, factor), expected)
    assert seen == [3]  # three images changed, three never computed
    untouched = images.clone()
    assert on_chosen(untouched, torch.zeros(6, dtype=torch.bool), brighten, factor) is untouched
    assert torch.equal(untouched, images) and seen == [3]


def test_grayscale_on_every_image_then_blur_on_some_keeps_gray_views():
    """An effect applied to every image leaves a tensor the next effect can update in place."""
    from attnssl.config import ViewsSection
    from attnssl.data.views import MultiCropViews

    cfg = ViewsSection(global_crops=2, color_jitter_prob=0.0, grayscale_prob=1.0,
                       blur_prob=(0.5, 0.5), solarize_prob=(0.0, 0.5))
    views = MultiCropViews(cfg, 16, 3, (0.5,) * 3, (0.25,) * 3, seed=0)
    for view in views(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)):
        assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 1], view[:, 2])
