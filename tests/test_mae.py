"""MAE: masking, patchify, positions, the masked-patch loss and the visible-only encoder."""

import math

import pytest
import torch

from attnssl.config import load_config
from attnssl.functional.mae import (
    patchify,
    random_masking,
    reconstruction_loss,
    sincos_position_table,
    visible_count,
)
from attnssl.methods import build_method
from attnssl.nn.mae import encode_visible, gather_tokens
from attnssl.nn.vit import build_vit


@pytest.mark.parametrize("tokens,ratio", [(49, 0.75), (64, 0.75), (16, 0.5), (49, 0.9)])
def test_masking_masks_exactly_the_configured_share(tokens, ratio, generator):
    keep = visible_count(tokens, ratio)
    assert keep == int(tokens * (1 - ratio))
    noise = torch.rand(5, tokens, generator=generator)
    keep_idx, mask, restore_idx = random_masking(noise, keep)
    assert torch.all(mask.sum(1) == tokens - keep)
    for b in range(5):
        # the visible patches are those of smallest noise, and exactly those are unmasked
        assert set(keep_idx[b].tolist()) == set(noise[b].argsort()[:keep].tolist())
        assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(keep_idx[b].tolist())
    # restore_idx puts [visible, masked] back in patch order
    values = torch.arange(tokens).float().expand(5, -1).unsqueeze(-1)
    shuffled = gather_tokens(values, noise.argsort(1))
    assert torch.equal(gather_tokens(shuffled, restore_idx), values)


def test_a_ratio_that_leaves_nothing_visible_is_named():
    with pytest.raises(ValueError, match="leaves no visible patch"):
        visible_count(4, 0.8)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        visible_count(49, 1.0)


def test_patchify_orders_patches_row_major_and_pixels_as_row_column_channel(generator):
    images = torch.randn(2, 3, 8, 12, generator=generator)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    for i in range(2):
        for j in range(3):
            block = images[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4]  # (B, C, p, p)
            assert torch.equal(patches[:, i * 3 + j], block.permute(0, 2, 3, 1).reshape(2, -1))


def test_sincos_table_matches_its_formula():
    table = sincos_position_table(3, 4, 8)
    assert table.shape == (12, 8)
    for row in range(3):
        for col in range(4):
            expected = []
            for coordinate in (col, row):  # the official code puts the column first
                omegas = [1 / 10000 ** (k / 2) for k in range(2)]
                expected += [math.sin(coordinate * w) for w in omegas]
                expected += [math.cos(coordinate * w) for w in omegas]
            torch.testing.assert_close(table[row * 4 + col], torch.tensor(expected))


def test_loss_covers_only_masked_patches_and_matches_a_loop(generator):
    pred = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]],
                        dtype=torch.float64)
    for norm_pix in (True, False):
        loss = reconstruction_loss(pred, target, mask, norm_pix)
        total, count = 0.0, 0
        for b in range(3):
            for i in range(6):
                if not mask[b, i]:
                    continue
                t = target[b, i].tolist()
                if norm_pix:
                    mean = sum(t) / 5
                    var = sum((v - mean) ** 2 for v in t) / 4  # unbiased, as the official code
                    t = [(v - mean) / math.sqrt(var + 1e-6) for v in t]
                total += sum((p - v) ** 2 for p, v in zip(pred[b, i].tolist(), t, strict=True)) / 5
                count += 1
        assert abs(loss.item() - total / count) < 1e-12
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1].abs().sum(-1) > 0)


@torch.no_grad()
def test_encoder_on_visible_patches_is_the_vit_on_those_tokens():
    cfg = load_config(None, ["model.pos_embed=sincos"])
    torch.manual_seed(0)
    vit = build_vit(cfg.model, 28, 1).eval()
    images = torch.randn(2, 1, 28, 28)
    everything = torch.arange(49).expand(2, -1)
    torch.testing.assert_close(encode_visible(vit, images, everything),
                               vit.forward_features(images))
    keep = torch.stack([torch.randperm(49)[:12] for _ in range(2)])
    patches = vit.patch_embed(images).reshape(2, 49, -1) + vit.pos_embed[:, 1:]
    tokens = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1),
                        gather_tokens(patches, keep)], dim=1)
    torch.testing.assert_close(encode_visible(vit, images, keep), vit.norm(vit.blocks(tokens)))


def test_sincos_positions_are_fixed_and_zero_at_the_class_token():
    cfg = load_config(None, ["model.pos_embed=sincos"])
    vit = build_vit(cfg.model, 28, 1)
    assert not vit.pos_embed.requires_grad
    assert torch.all(vit.pos_embed[0, 0] == 0)
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_position_table(7, 7, 128))


@pytest.mark.parametrize("overrides", [[], ["model.class_tokens=2"],
                                       ["model.attention=cbsa", "model.cbsa_pool=4"],
                                       ["model.block=cbt", "model.attention=cbsa"]])
def test_mae_step_trains_every_parameter(overrides):
    cfg = load_config(None, ["method.name=mae", "views.global_crops=1", *overrides])
    torch.manual_seed(0)
    method = build_method(cfg, build_vit(cfg.model, 28, 1))
    out = method([torch.randn(4, 1, 28, 28)])
    assert out["masked_share"].item() == pytest.approx(37 / 49)
    out["loss"].backward()
    for name, param in method.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_mae_refuses_local_crops():
    with pytest.raises(ValueError, match="views.local_crops=0"):
        cfg = load_config(None, ["method.name=mae", "views.local_crops=2"])
        build_method(cfg, build_vit(cfg.model, 28, 1))


def test_repeated_sampling_loss_is_the_mean_of_each_samples_loss(generator):
    """K views per image (repeated sampling): one loss over the K*B samples equals the mean of
    the K one-view losses under the same masks."""
    cfg = load_config(None, ["method.name=mae", "views.global_crops=2"])
    torch.manual_seed(0)
    method = build_method(cfg, build_vit(cfg.model, 28, 1))
    views = [torch.randn(3, 1, 28, 28, generator=generator) for _ in range(2)]
    noise = torch.rand(6, 49, generator=generator)
    both = method(views, noise=noise)["loss"]
    each = [method([views[k]], noise=noise[3 * k:3 * k + 3])["loss"] for k in range(2)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)
    with pytest.raises(ValueError, match=r"\(samples, patches\) = \(6, 49\)"):
        method(views, noise=noise[:3])


@torch.no_grad()
def test_decoder_puts_each_latent_and_the_mask_token_at_its_patch(generator):
    cfg = load_config(None, ["method.name=mae", "views.global_crops=1", "method.decoder_dim=16",
                             "method.decoder_heads=2", "model.class_tokens=2"])
    method = build_method(cfg, build_vit(cfg.model, 28, 1))
    decoder = method.decoder
    decoder.blocks = torch.nn.Sequential()  # no mixing: each output row is its own input row
    noise = torch.rand(2, 49, generator=generator)
    keep_idx, mask, restore_idx = random_masking(noise, 12)
    latent = torch.randn(2, 2 + 12, 128, generator=generator)
    pred = decoder(latent, restore_idx, (7, 7))
    pos = sincos_position_table(7, 7, 16)
    for b in range(2):
        for k, patch in enumerate(keep_idx[b].tolist()):
            expected = decoder.pred(decoder.norm(decoder.embed(latent[b, 2 + k]) + pos[patch]))
            torch.testing.assert_close(pred[b, patch], expected)
        for patch in torch.nonzero(mask[b]).flatten().tolist():
            expected = decoder.pred(decoder.norm(decoder.mask_token[0, 0] + pos[patch]))
            torch.testing.assert_close(pred[b, patch], expected)


def test_mae_initialisation_is_xavier_everywhere():
    cfg = load_config("mae_fashion_mnist", [])
    torch.manual_seed(0)
    vit = build_vit(cfg.model, 28, 1)

    def xavier_bound(fan_out, fan_in):
        return math.sqrt(6 / (fan_in + fan_out))

    qkv = vit.blocks[0].attn.qkv.weight  # one (3D, D) matrix, as MAE's qkv
    assert qkv.abs().max() <= xavier_bound(*qkv.shape) and qkv.abs().max() > 0.9 * xavier_bound(
        *qkv.shape)
    assert torch.all(vit.blocks[0].attn.qkv.bias == 0)
    patch = vit.patch_embed.proj.weight.flatten(1)  # (128, 16): the patch embedding as a matrix
    assert 0.9 * xavier_bound(*patch.shape) < patch.abs().max() <= xavier_bound(*patch.shape)
    assert 0.01 < vit.cls_token.std() < 0.04
    assert not vit.pos_embed.requires_grad


@pytest.mark.parametrize("io_init", ["xavier", "torch"])
def test_decoder_input_and_output_linears_follow_io_init(io_init):
    """Xavier-uniform bound sqrt(6 / (fan_in + fan_out)) with zero bias, or torch's nn.Linear
    default: weights and biases uniform within 1 / sqrt(fan_in)."""
    cfg = load_config("mae_fashion_mnist", [f"method.decoder_io_init={io_init}"])
    torch.manual_seed(0)
    decoder = build_method(cfg, build_vit(cfg.model, 28, 1)).decoder
    for linear in (decoder.embed, decoder.pred):
        fan_out, fan_in = linear.weight.shape
        bound = (math.sqrt(6 / (fan_in + fan_out)) if io_init == "xavier"
                 else 1 / math.sqrt(fan_in))
        assert 0.9 * bound < linear.weight.abs().max() <= bound
        if io_init == "xavier":
            assert torch.all(linear.bias == 0)
        else:
            assert 0 < linear.bias.abs().max() <= bound
    # the blocks between them stay xavier either way
    qkv = decoder.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / sum(qkv.shape))
