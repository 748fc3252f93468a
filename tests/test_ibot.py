"""iBOT: the loss against a loop over the official equations, the block-wise masks against the
official generator's loop, the masked encoder, and the method's step."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from attnssl.config import ConfigError, load_config
from attnssl.losses.ibot import IBOTLoss
from attnssl.methods import build_method
from attnssl.methods.ibot import IBOTHead, block_mask, masked_tokens, prediction_ratio
from attnssl.nn.vit import build_vit

SMALL = ["method.name=ibot", "method.out_dim=64", "method.patch_out_dim=64",
         "method.head_hidden=32", "method.head_bottleneck=16"]


def official_loss(s_cls, s_patch, t_cls, t_patch, masks, center, center2, n_views, n_global,
                  student_temp, temp, temp2, lambda1, lambda2, momentum, momentum2):
    """main_ibot.iBOTLoss.forward and update_center, one image at a time."""
    batch = t_cls.shape[0] // n_global
    s_cls_c = (s_cls / student_temp).chunk(n_views)
    s_patch_c = (s_patch / student_temp).chunk(n_global)
    t_cls_c = F.softmax((t_cls - center) / temp, dim=-1).chunk(n_global)
    t_patch_c = F.softmax((t_patch - center2) / temp2, dim=-1).chunk(n_global)
    masks_c = masks.chunk(n_global)
    total1, n1, total2, n2 = 0.0, 0, 0.0, 0
    for q in range(n_global):
        for v in range(n_views):
            if v == q:
                per_image = []
                for b in range(batch):
                    log_q = F.log_softmax(s_patch_c[v][b], dim=-1)
                    ce = [-(t_patch_c[q][b, n] * log_q[n]).sum() for n in range(masks.shape[1])]
                    m = masks_c[v][b].double()
                    per_image.append(sum(c * w for c, w in zip(ce, m, strict=True))
                                     / max(float(m.sum()), 1.0))
                total2 += sum(per_image) / batch
                n2 += 1
            else:
                log_q = F.log_softmax(s_cls_c[v], dim=-1)
                total1 += sum(-(t_cls_c[q][b] * log_q[b]).sum() for b in range(batch)) / batch
                n1 += 1
    loss = total1 / n1 * lambda1 + total2 / n2 * lambda2
    new_center = center * momentum + t_cls.sum(0, keepdim=True) / len(t_cls) * (1 - momentum)
    new_center2 = center2 * momentum2 + (t_patch.mean(1).sum(0, keepdim=True) / len(t_patch)
                                         * (1 - momentum2))
    return loss, new_center, new_center2


def test_ibot_loss_matches_a_loop_over_the_official_equations(generator):
    n_views, n_global, batch, tokens, k = 4, 2, 3, 5, 7
    s_cls = torch.randn(n_views * batch, k, generator=generator, dtype=torch.float64)
    s_patch = torch.randn(n_global * batch, tokens, k, generator=generator, dtype=torch.float64)
    t_cls = torch.randn(n_global * batch, k, generator=generator, dtype=torch.float64)
    t_patch = torch.randn(n_global * batch, tokens, k, generator=generator, dtype=torch.float64)
    masks = torch.rand(n_global * batch, tokens, generator=generator) < 0.4
    masks[0] = False  # an image without masked patches counts 0 in its view's mean
    loss_fn = IBOTLoss(k, k, n_views, n_global, student_temp=0.1, teacher_temp=0.05,
                       teacher_patch_temp=0.06, center_momentum=0.8,
                       center_momentum_patch=0.7, lambda_cls=0.5, lambda_patch=2.0).double()
    loss_fn.center.normal_(generator=generator)
    loss_fn.center_patch.normal_(generator=generator)
    expected, center, center2 = official_loss(
        s_cls, s_patch, t_cls, t_patch, masks, loss_fn.center.clone(),
        loss_fn.center_patch.clone(), n_views, n_global, 0.1, 0.05, 0.06, 0.5, 2.0, 0.8, 0.7)
    # the module computes in float32 and reads the student's masked patches only
    out = loss_fn(s_cls, s_patch[masks], t_cls, t_patch, masks)
    loss = out.loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(loss_fn.center, center, atol=1e-6)
    assert torch.allclose(loss_fn.center_patch, center2, atol=1e-6)
    assert (0.5 * out.cls + 2.0 * out.patch).item() == pytest.approx(loss.item(), rel=1e-6)


def official_block_mask(height, width, high, log_aspect_ratio, rng):
    """loader.ImageFolderMask.__getitem__, pred_shape='block', cell by cell."""
    mask = [[False] * width for _ in range(height)]
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count
        delta = 0
        for _attempt in range(10):
            low = (min(height, width) // 3) ** 2
            target_area = rng.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h)
                                 for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if not mask[i][j]:
                                mask[i][j] = True
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        mask_count += delta
    return torch.tensor(mask)


@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (6, 9)])
def test_block_masks_follow_the_official_generator(grid):
    aspect = (0.3, 1 / 0.3)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for seed in range(100):
        ratio = prediction_ratio((0.0, 0.3), (0.0, 0.2), random.Random(seed))
        assert ratio == 0.0 or 0.1 <= ratio <= 0.5
        target = ratio * grid[0] * grid[1]
        ours = block_mask(*grid, target, aspect, random.Random(seed))
        assert torch.equal(ours, official_block_mask(*grid, target, log_aspect,
                                                     random.Random(seed)))
        assert ours.sum() <= target  # never more than asked
    shares = [block_mask(14, 14, 0.3 * 196, aspect, random.Random(s)).float().mean().item()
              for s in range(50)]
    assert 0.25 < sum(shares) / len(shares) <= 0.3


def test_masked_tokens_put_the_mask_token_in_place_of_the_patch_embedding(generator):
    cfg = load_config("dino_synthetic", SMALL)
    vit = build_vit(cfg.model, 32, 3).eval()
    images = torch.randn(2, 3, 32, 32, generator=generator)
    assert torch.allclose(masked_tokens(vit, images, None), vit.forward_features(images))
    grid = vit.patch_embed.grid_size
    masks = torch.rand(2, *grid, generator=generator) < 0.5
    token = torch.randn(1, vit.embed_dim, generator=generator)

    def replace(module, inputs, output):  # the same replacement, done by a hook
        out = output.clone()
        out[masks] = token[0]
        return out

    handle = vit.patch_embed.register_forward_hook(replace)
    expected = vit.forward_features(images)
    handle.remove()
    assert torch.allclose(masked_tokens(vit, images, masks, token), expected, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["method.shared_head=false", "method.patch_out_dim=48"],
                                   ["method.head_batchnorm=true"]])
def test_the_head_on_masked_patches_gives_the_rows_of_the_head_on_every_token(extra, generator):
    cfg = load_config("dino_synthetic", [*SMALL, *extra])
    head = IBOTHead(24, cfg.method).double()
    tokens = torch.randn(3, 1 + 10, 24, generator=generator, dtype=torch.float64)
    masks = torch.rand(3, 10, generator=generator) < 0.3
    cls_all, patch_all = head.class_and_patches(tokens)
    cls_masked, patch_masked = head.class_and_patches(tokens, masks)
    assert patch_all.shape == (3, 10, cfg.method.patch_out_dim)
    assert patch_masked.shape == (int(masks.sum()), cfg.method.patch_out_dim)
    assert torch.allclose(cls_masked, cls_all) and torch.allclose(patch_masked, patch_all[masks])
    # DINO's head on every token, written out: g(h) = W_last normalize(MLP(h))
    x = F.normalize(head.mlp(tokens.reshape(-1, 24)), dim=-1).reshape(3, 11, -1)
    patch_layer = head.last_layer if head.last_layer2 is None else head.last_layer2
    assert torch.allclose(cls_all, head.last_layer(x[:, 0]))
    assert torch.allclose(patch_all, patch_layer(x[:, 1:]))


@pytest.mark.parametrize("shared_head", [True, False])
def test_one_ibot_step_trains_the_student_and_its_mask_token(shared_head):
    cfg = load_config("dino_synthetic", [*SMALL, f"method.shared_head={shared_head}"])
    torch.manual_seed(0)
    method = build_method(cfg, build_vit(cfg.model, 32, 3))
    random.seed(0)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32),
             torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    method.before_step(0, 10, 100)  # epoch 0: the last layers are frozen
    out = method(views)
    out["loss"].backward()
    method.before_optimizer_step()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.parameters())
    assert out["loss_patch"] > 0 and 0 < out["masked_share"] < 0.5
    last_layers = [method.head.last_layer] + ([] if shared_head else [method.head.last_layer2])
    assert all(p.grad is None for layer in last_layers for p in layer.parameters())
    assert (method.head.last_layer2 is None) == shared_head


def test_ibot_settings_are_checked():
    with pytest.raises(ConfigError, match="pred_ratio .* and pred_ratio_var .* same length"):
        load_config("ibot_fashion_mnist", ["method.pred_ratio=[0.3]"])
    with pytest.raises(ConfigError, match="shared head needs patch_out_dim == out_dim"):
        load_config("ibot_fashion_mnist", ["method.patch_out_dim=128"])
    cfg = load_config("ibot_fashion_mnist", ["views.global_crops=1"])
    with pytest.raises(ValueError, match="ibot distils each global view"):
        build_method(cfg, build_vit(cfg.model, 28, 1))
