"""UDI: stratified sampling, positions across views, the patch attention, the loss, a real run."""

import math

import pytest
import torch

from attnssl.config import load_config
from attnssl.data.positions import (
    bilinear_weights,
    map_samples,
    patch_centres,
    shift_to_overlap,
    source_to_view,
    stratified_sample,
    view_to_source,
)
from attnssl.data.udi_views import UDIViews
from attnssl.functional.udi import multimodal_logits
from attnssl.losses.udi import UDILoss
from attnssl.nn.udi import SampledPatchAttention, vit_tokens
from attnssl.nn.vit import build_vit, pool_features

# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("grid,window,count", [(14, 3, 16), (6, 2, 9), (7, 2, 9), (7, 3, 4),
                                               (4, 1, 16)])
def test_stratified_sampling_draws_one_patch_in_every_window(grid, window, count, generator):
    samples = stratified_sample(500, grid, window, generator)
    assert samples.shape == (500, count)
    n, span = grid // window, grid // window * window
    rows, cols = samples // grid, samples % grid
    offsets = [0, grid - span]
    for r, c in zip(rows, cols, strict=True):
        # the tiled square sits at one of the corners: for one of them, exactly one sample per
        # window, in window order
        fits = [((r - dr) // window * n + (c - dc) // window).tolist() == list(range(n * n))
                and bool((r >= dr).all() and (c >= dc).all())
                for dr in offsets for dc in offsets]
        assert any(fits)
    if span < grid:  # every corner is used: first and last rows and columns are all reached
        for lines in (rows, cols):
            assert (lines == 0).any(dim=1).any() and (lines == grid - 1).any(dim=1).any()
    else:  # every patch of every window is drawn at some point
        assert torch.unique(samples).numel() == grid * grid


def test_sampling_window_larger_than_the_grid_is_named():
    with pytest.raises(ValueError, match="window 5 .* grid size 4"):
        stratified_sample(2, 4, 5)


# --------------------------------------------------------------------------- positions


def _random_boxes(batch, size, generator):
    corner = torch.rand(batch, 2, generator=generator) * size * 0.5
    side = torch.rand(batch, 2, generator=generator) * size * 0.5 + 2
    return torch.cat([corner, corner + side], dim=1)


def test_a_position_mapped_to_another_view_and_back_lands_where_it_started(generator):
    batch = 64
    a, b = _random_boxes(batch, 28, generator), _random_boxes(batch, 28, generator)
    flip_a = torch.rand(batch, generator=generator) < 0.5
    flip_b = torch.rand(batch, generator=generator) < 0.5
    uv = torch.rand(batch, 9, 2, generator=generator, dtype=torch.float64)
    uv_b, _ = source_to_view(view_to_source(uv, a.double(), flip_a), b.double(), flip_b)
    back, inside = source_to_view(view_to_source(uv_b, b.double(), flip_b), a.double(), flip_a)
    assert torch.allclose(back, uv, atol=1e-9)
    assert inside.all()


def test_a_known_shift_moves_patches_by_one_column():
    # view a covers x in [0, 14), view b the same rows shifted right by 2 px = one patch of 2 px
    a = torch.tensor([[0.0, 0.0, 14.0, 14.0]])
    b = torch.tensor([[2.0, 0.0, 16.0, 14.0]])
    no_flip = torch.tensor([False])
    indices = torch.arange(49).view(1, 49)
    rows, inside = map_samples(indices, 7, a, no_flip, 7, b, no_flip)
    for k in range(49):
        r, c = divmod(k, 7)
        if c == 0:  # left of view b
            assert not inside[0, k] and rows[0, k].abs().sum() == 0
        else:
            assert inside[0, k]
            assert rows[0, k].argmax().item() == r * 7 + c - 1
            assert rows[0, k].max().item() == pytest.approx(1.0)
    # the same box seen flipped: column c lands on column 6 - c
    rows, inside = map_samples(indices, 7, a, no_flip, 7, a, torch.tensor([True]))
    assert inside.all()
    assert [rows[0, k].argmax().item() for k in range(7)] == [6 - c for c in range(7)]


def test_bilinear_rows_sum_to_one_and_reproduce_linear_functions(generator):
    grid = 5
    uv = torch.rand(3, 40, 2, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    weights = bilinear_weights(uv, grid)
    assert torch.allclose(weights.sum(-1), torch.ones(3, 40, dtype=torch.float64))
    assert (weights >= 0).all() and ((weights > 0).sum(-1) <= 4).all()
    # interpolating a function linear in the patch centres gives its value at uv
    centres = patch_centres(grid).double()
    values = 3 * centres[:, 0] - 2 * centres[:, 1] + 1
    inner = ((uv > 0.5 / grid) & (uv < 1 - 0.5 / grid)).all(-1)
    expected = 3 * uv[..., 0] - 2 * uv[..., 1] + 1
    assert torch.allclose((weights @ values)[inner], expected[inner], atol=1e-9)


def test_shifted_boxes_overlap_their_reference_and_stay_in_the_image(generator):
    size, batch = 28.0, 2000
    boxes, reference = _random_boxes(batch, size, generator), _random_boxes(batch, size, generator)
    moved = shift_to_overlap(boxes, reference, size)
    assert torch.allclose(moved[:, 2:] - moved[:, :2], boxes[:, 2:] - boxes[:, :2])
    assert (moved >= -1e-5).all() and (moved <= size + 1e-5).all()
    for lo, hi in ((0, 2), (1, 3)):
        overlap = torch.minimum(moved[:, hi], reference[:, hi]) - torch.maximum(moved[:, lo],
                                                                                 reference[:, lo])
        shorter = torch.minimum(moved[:, hi] - moved[:, lo], reference[:, hi] - reference[:, lo])
        assert (overlap >= 0.5 * shorter - 1e-4).all()


def test_udi_views_track_boxes_and_samples(generator):
    cfg = load_config(None, ["views.local_crops=3", "views.local_size=12", "views.global_size=28"])
    views = UDIViews(cfg.views, 28, 1, (0.5,), (0.5,), patch_size=4, window_global=2,
                     window_local=1, seed=1)
    images = (torch.rand(16, 1, 28, 28, generator=generator) * 255).to(torch.uint8)
    out = views(images)
    s = views.extra_inputs()["sampling"]
    assert [v.shape[-1] for v in out] == [28, 28, 12, 12, 12]
    assert s.student_maps.shape == (2, 16, 9, 49) and s.local_maps.shape == (3, 2, 16, 9, 49)
    assert torch.equal(s.student_maps.sum(-1), torch.ones(2, 16, 9))  # one-hot
    # teacher rows: a distribution where the sample is inside the other view, zero elsewhere
    sums = s.teacher_maps.sum(-1)
    assert torch.allclose(sums, s.valid.flip(0).float(), atol=1e-6)
    assert torch.allclose(s.local_maps.sum(-1), s.local_valid.float(), atol=1e-6)
    # global view 2 overlaps view 1 on each axis, so most samples map
    assert s.valid.float().mean() > 0.5
    # the map agrees with the geometry of the recorded boxes
    b0, b1 = views.last_boxes[0], views.last_boxes[1]
    idx = s.student_maps[0].argmax(-1)
    expected, inside = map_samples(idx, 7, b0.boxes, b0.flipped, 7, b1.boxes, b1.flipped)
    assert torch.equal(inside, s.valid[0]) and torch.allclose(expected, s.teacher_maps[1])


# --------------------------------------------------------------------------- network


def test_sampled_patch_attention_matches_its_equations(generator):
    torch.manual_seed(0)
    layer = SampledPatchAttention(8, 2).double()
    tokens = torch.randn(2, 5, 8, generator=generator, dtype=torch.float64)
    maps = torch.rand(3, 2, 4, 5, generator=generator, dtype=torch.float64)
    out = layer(tokens, maps)
    assert out.shape == (3, 2, 4, 8)
    w_qkv, b_qkv = layer.qkv.weight, layer.qkv.bias
    for m in range(3):
        for b in range(2):
            z = layer.norm1(tokens[b])  # (N, D)
            for i in range(4):
                row = maps[m, b, i]
                heads = []
                for h in range(2):
                    sl = slice(4 * h, 4 * h + 4)
                    q = row @ (z @ w_qkv[sl].T + b_qkv[sl])
                    k = z @ w_qkv[8:16][sl].T + b_qkv[8:16][sl]
                    v = z @ w_qkv[16:24][sl].T + b_qkv[16:24][sl]
                    a = torch.softmax(k @ q / math.sqrt(4), 0)
                    heads.append(a @ v)
                expected = layer.norm2(layer.proj(torch.cat(heads)) + row @ z)
                assert torch.allclose(out[m, b, i], expected, atol=1e-10)


def test_two_class_token_backbone_and_its_features():
    cfg = load_config(None, ["method.name=udi"])
    assert cfg.model.class_tokens == 2
    vit = build_vit(cfg.model, 28, 1)
    assert vit.num_prefix_tokens == 2
    x = torch.randn(3, 1, 28, 28)
    tokens, normed = vit_tokens(vit, x)
    assert torch.equal(normed, vit.forward_features(x))
    assert not torch.allclose(normed[:, 0], normed[:, 1])  # two different tokens
    assert torch.equal(pool_features(normed, "cls_plus", 2), normed[:, 1])
    both = pool_features(normed, "cls+cls_plus", 2)
    assert torch.equal(both, torch.cat([normed[:, 0], normed[:, 1]], -1))
    with pytest.raises(ValueError, match="two class tokens"):
        pool_features(normed[:, 1:], "cls_plus", 1)


def test_udi_with_one_class_token_is_refused():
    from attnssl.config import ConfigError

    with pytest.raises(ConfigError, match="class_tokens=2"):
        load_config(None, ["method.name=udi", "model.class_tokens=1"])
    with pytest.raises(ConfigError, match="second class token"):
        load_config(None, ["method.name=dino", "eval.features=cls_plus"])


# --------------------------------------------------------------------------- loss


def test_multimodal_target_on_hand_made_logits():
    patches = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # (1, S=3, K=2)
    valid = torch.tensor([[True, True, False]])
    cls = torch.tensor([[4.0, -4.0]])
    # alpha * mean of the valid rows (2, 1) + (1 - alpha) * cls, the official eps included
    got = multimodal_logits(patches, valid, cls, alpha=0.25)
    mean = torch.tensor([4.0, 2.0]) / (2 + 1e-5)
    assert torch.allclose(got[0], 0.25 * mean + 0.75 * cls[0])
    # no valid position: the patch term is 0
    assert torch.allclose(multimodal_logits(patches, torch.zeros_like(valid), cls, 0.25),
                          0.75 * cls)


def _softmax(row, temp):
    m = max(row)
    e = [math.exp((x - m) / temp) for x in row]
    return [x / sum(e) for x in e]


def _ce(p, logits, temp):
    q = _softmax(logits, temp)
    return -sum(pk * math.log(qk) for pk, qk in zip(p, q, strict=True))


def loop_udi_loss(s_cls, s_plus, s_patch, t_cls, t_patch, t_local, valid, local_valid, center,
                  alpha, t_s, t_t):
    """UDI's three levels written out pair by pair, image by image, sample by sample."""
    n_views, batch, dim = s_cls.shape
    tl = lambda x: x.tolist()  # noqa: E731

    def centred(row, c):
        return _softmax([x - y for x, y in zip(row, c, strict=True)], t_t)

    def mm(patch_rows, ok, cls_row):
        count = sum(ok)
        mean = [sum(r[k] for r, o in zip(patch_rows, ok, strict=True) if o) / (count + 1e-5)
                for k in range(dim)]
        return [alpha * m + (1 - alpha) * c for m, c in zip(mean, cls_row, strict=True)]

    cls_terms, plus_terms = [], []
    for g in range(2):
        for v in range(n_views):
            if v == g:
                continue
            cls_sum = plus_sum = 0.0
            for i in range(batch):
                cls_sum += _ce(centred(tl(t_cls[g, i]), tl(center[0, 0])), tl(s_cls[v, i]), t_s)
                if v < 2:  # the other global view: its samples mapped into view g
                    target = mm(tl(t_patch[g, i]), tl(valid[1 - g, i]), tl(t_cls[g, i]))
                else:
                    target = mm(tl(t_local[v - 2, g, i]), tl(local_valid[v - 2, g, i]),
                                tl(t_cls[g, i]))
                plus_sum += _ce(centred(target, tl(center[1, 0])), tl(s_plus[v, i]), t_s)
            cls_terms.append(cls_sum / batch)
            plus_terms.append(plus_sum / batch)
    patch_sum, patch_count = 0.0, 0
    for g in range(2):
        for i in range(batch):
            for s in range(valid.shape[-1]):
                if valid[1 - g, i, s]:
                    p = centred(tl(t_patch[g, i, s]), tl(center[2, 0]))
                    patch_sum += _ce(p, tl(s_patch[1 - g, i, s]), t_s)
                    patch_count += 1
    levels = (sum(cls_terms) / len(cls_terms), sum(plus_terms) / len(plus_terms),
              patch_sum / patch_count)
    return sum(levels) / 3, levels


def _udi_inputs(generator, n_local=2, batch=3, samples=4, local_samples=2, dim=5):
    r = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64) * 2  # noqa: E731
    n_views = 2 + n_local
    valid = torch.rand(2, batch, samples, generator=generator) < 0.7
    valid[:, 0, 0] = True
    local_valid = torch.rand(n_local, 2, batch, local_samples, generator=generator) < 0.7
    return dict(student_cls=r(n_views, batch, dim), student_cls_plus=r(n_views, batch, dim),
                student_patch=r(2, batch, samples, dim), teacher_cls=r(2, batch, dim),
                teacher_patch=r(2, batch, samples, dim),
                teacher_local_patch=r(n_local, 2, batch, local_samples, dim),
                valid=valid, local_valid=local_valid)


@pytest.mark.parametrize("n_local", [0, 2])
def test_udi_loss_matches_the_loop_and_moves_three_centres(n_local, generator):
    inputs = _udi_inputs(generator, n_local=n_local)
    criterion = UDILoss(5, alpha=0.5, student_temp=0.1, teacher_temp=0.06, center_momentum=0.8)
    center = torch.randn(3, 1, 5, generator=generator)
    criterion.center.copy_(center)
    out = criterion(**inputs)
    loss = out.loss
    expected, levels = loop_udi_loss(
        inputs["student_cls"], inputs["student_cls_plus"], inputs["student_patch"],
        inputs["teacher_cls"], inputs["teacher_patch"], inputs["teacher_local_patch"],
        inputs["valid"], inputs["local_valid"], center, 0.5, 0.1, 0.06)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    got = (out.cls.item(), out.cls_plus.item(), out.patch.item())
    assert got == pytest.approx(levels, rel=1e-10)
    # centres: cls from the teacher's cls rows; multimodal from every target; patch from every
    # valid teacher patch row (global and local)
    t_cls, t_patch, t_local = (inputs[k] for k in ("teacher_cls", "teacher_patch",
                                                   "teacher_local_patch"))
    other = inputs["valid"].flip(0)
    mm_rows = [multimodal_logits(t_patch, other, t_cls, 0.5).reshape(-1, 5)]
    mm_rows.append(multimodal_logits(t_local, inputs["local_valid"], t_cls[None], 0.5).reshape(-1, 5))
    patch_rows = torch.cat([t_patch[other], t_local[inputs["local_valid"]]])
    means = [t_cls.reshape(-1, 5).mean(0), torch.cat(mm_rows).mean(0), patch_rows.mean(0)]
    for j in range(3):
        expected_center = 0.8 * center[j, 0].double() + 0.2 * means[j]
        assert torch.allclose(criterion.center[j, 0].double(), expected_center, atol=1e-5), j


def test_udi_loss_gradients_reach_the_student_only(generator):
    inputs = _udi_inputs(generator)
    for key in ("student_cls", "student_cls_plus", "student_patch", "teacher_cls"):
        inputs[key].requires_grad_(True)
    UDILoss(5)(**inputs).loss.backward()
    for key in ("student_cls", "student_cls_plus", "student_patch"):
        assert inputs[key].grad.abs().sum() > 0, key
    assert inputs["teacher_cls"].grad is None
    # an invalid sample gets no patch gradient
    grad = inputs["student_patch"].grad
    invalid = ~inputs["valid"]
    assert grad[invalid].abs().sum() == 0


def _udi_step_inputs(*overrides):
    from attnssl.methods import build_method, build_views

    small = ["data.dataset=synthetic", "model.preset=null", "model.patch_size=4",
             "model.embed_dim=32", "model.depth=1", "model.num_heads=2", *overrides]
    config = load_config("udi_fashion_mnist", small)
    torch.manual_seed(0)
    method = build_method(config, build_vit(config.model, 32, 3)).double()
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                           dtype=torch.uint8)
    views_maker = build_views(config, 32, 3, (0.5,) * 3, (0.25,) * 3, 4, seed=2)
    views = [v.double() for v in views_maker(images)]
    return method, views, views_maker.extra_inputs()["sampling"]


def test_a_separate_patch_head_projects_only_the_patch_representations():
    shared, views, sampling = _udi_step_inputs()
    separate, _, _ = _udi_step_inputs("method.patch_head=separate")
    assert "patch_head.mlp.0.weight" in separate.state_dict()
    assert "teacher.patch_head.mlp.0.weight" in separate.state_dict()
    assert not any(k.startswith(("patch_head", "teacher.patch_head")) for k in shared.state_dict())
    # with the patch head a copy of the shared head, the step is the shared head's step
    copied = {**shared.state_dict(),
              **{"patch_head." + k[5:]: v for k, v in shared.state_dict().items()
                 if k.startswith("head.")},
              **{"teacher.patch_head." + k[13:]: v for k, v in shared.state_dict().items()
                 if k.startswith("teacher.head.")}}
    separate.load_state_dict(copied)
    torch.testing.assert_close(separate(views, sampling)["loss"], shared(views, sampling)["loss"],
                               rtol=0, atol=1e-12)
    # the shared head's gradient is the sum of the two heads' gradients: the image-level terms
    # reach only the head, the patch term only the patch head
    def trained(head):
        return [p for p in head.parameters() if p.requires_grad]

    shared_grads = torch.autograd.grad(shared(views, sampling)["loss"], trained(shared.head))
    head_grads = torch.autograd.grad(separate(views, sampling)["loss"],
                                     [*trained(separate.head), *trained(separate.patch_head)])
    count = len(shared_grads)
    assert any(g.abs().sum() > 0 for g in head_grads[count:])
    for total, image_level, patch_level in zip(shared_grads, head_grads[:count],
                                               head_grads[count:], strict=True):
        torch.testing.assert_close(total, image_level + patch_level, rtol=0, atol=1e-12)
    assert any((total - image_level).abs().sum() > 0 for total, image_level
               in zip(shared_grads, head_grads[:count], strict=True))
