import math

import pytest
import torch

from attnssl.config import ModelSection
from attnssl.nn.attention import attention_maps, get_attention
from attnssl.nn.vit import VIT_PRESETS, build_vit, pool_features


@pytest.mark.parametrize("preset", ["vit_tiny_p4", "vit_small_p4"])
def test_presets_build_and_embed(preset):
    model = build_vit(ModelSection(preset=preset), 28, 1)
    size = VIT_PRESETS[preset]
    tokens = model.forward_features(torch.randn(2, 1, 28, 28))
    assert tokens.shape == (2, 1 + (28 // size.patch_size) ** 2, size.embed_dim)
    assert len(model.blocks) == size.depth


def test_explicit_keys_override_preset_and_other_sizes_interpolate():
    model = build_vit(ModelSection(preset="vit_tiny_p4", depth=2, embed_dim=64, num_heads=2), 32, 3)
    assert len(model.blocks) == 2 and model.embed_dim == 64
    assert model.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 1 + 16, 64)


def test_attention_maps_are_row_stochastic_per_layer_and_head(generator):
    model = build_vit(ModelSection(preset="vit_tiny_p4"), 28, 1).eval()
    x = torch.randn(3, 1, 28, 28, generator=generator)
    maps = attention_maps(model, x)
    assert len(maps) == 4
    for m in maps:
        assert m.shape == (3, 4, 50, 50)
        assert torch.allclose(m.sum(-1), torch.ones(3, 4, 50), atol=1e-5)
        assert (m >= 0).all()


def test_explicit_path_equals_fused_path(generator):
    fused = build_vit(ModelSection(preset="vit_tiny_p4"), 28, 1).eval()
    explicit = build_vit(ModelSection(preset="vit_tiny_p4", attention="softmax_explicit"), 28, 1)
    explicit.load_state_dict(fused.state_dict())
    explicit.eval()
    x = torch.randn(2, 1, 28, 28, generator=generator)
    with torch.no_grad():
        assert torch.allclose(fused.forward_features(x), explicit.forward_features(x), atol=1e-5)
    # recording maps does not change the output
    maps = attention_maps(fused, x)
    with torch.no_grad():
        assert torch.allclose(fused.forward_features(x), explicit.forward_features(x), atol=1e-5)
    assert len(maps) == 4


def test_pool_features_kinds():
    tokens = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    assert torch.equal(pool_features(tokens, "cls"), tokens[:, 0])
    assert torch.equal(pool_features(tokens, "mean"), tokens[:, 1:].mean(1))
    assert pool_features(tokens, "cls+mean").shape == (2, 4)


def test_bad_model_settings_are_named():
    with pytest.raises(ValueError, match="unknown model.attention 'cbsa2'; accepted:"):
        get_attention("cbsa2")
    with pytest.raises(ValueError, match="unknown model.preset"):
        build_vit(ModelSection(preset="vit_huge"), 28, 1)
    with pytest.raises(ValueError, match="not a multiple of model.patch_size=8"):
        build_vit(ModelSection(preset="vit_tiny_p4", patch_size=8), 28, 1)
    with pytest.raises(ValueError, match="divisible by model.num_heads=3"):
        build_vit(ModelSection(preset="vit_tiny_p4", num_heads=3), 28, 1)


def test_moco_weight_init_is_selectable():
    """BAM's official ViT uses timm's MoCo v3 initialisation: qkv uniform per Q, K and V."""
    torch.manual_seed(0)
    default = build_vit(ModelSection(), 28, 1)
    torch.manual_seed(0)
    moco = build_vit(ModelSection(weight_init="moco"), 28, 1)
    qkv = moco.blocks[0].attn.qkv.weight
    bound = math.sqrt(6.0 / (qkv.shape[0] // 3 + qkv.shape[1]))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert default.blocks[0].attn.qkv.weight.std() < 0.03 < qkv.std()


def test_cpu_autocast_takes_the_explicit_path_with_the_same_result(generator):
    """Under bf16 autocast short sequences skip the fused kernel (slow backward on CPU); the
    output and gradients stay those of fp32 attention to bf16 accuracy."""
    from attnssl.nn.attention import explicit_is_faster

    layer = get_attention("softmax")(64, num_heads=4, qkv_bias=True)
    x = torch.randn(3, 50, 64, generator=generator)
    assert not explicit_is_faster(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert explicit_is_faster(x) and not explicit_is_faster(torch.randn(1, 1025, 64))
        x_bf16 = x.clone().requires_grad_(True)
        out_bf16 = layer(x_bf16)
    x_fp32 = x.clone().requires_grad_(True)
    out_fp32 = layer(x_fp32)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), out_fp32, atol=3e-2, rtol=3e-2)
    out_bf16.float().pow(2).sum().backward()
    out_fp32.pow(2).sum().backward()
    torch.testing.assert_close(x_bf16.grad, x_fp32.grad, atol=5e-2, rtol=5e-2)


def test_last_block_tokens_are_each_blocks_normalised_output(generator):
    from attnssl.data.datasets import DatasetSpec, load_dataset
    from attnssl.eval.features import extract_features
    from attnssl.nn.vit import last_block_tokens

    vit = build_vit(ModelSection(preset="vit_tiny_p4"), 28, 1).eval()
    images = torch.randn(3, 1, 28, 28, generator=generator)
    with torch.no_grad():
        expected, x = [], vit._pos_embed(vit.patch_embed(images))
        for block in vit.blocks:  # the loop of the equations: z_l = block_l(z_{l-1}), LN(z_l)
            x = block(x)
            expected.append(vit.norm(x))
        got = last_block_tokens(vit, images, 3)
        assert len(got) == 3
        for g, e in zip(got, expected[-3:], strict=True):
            assert torch.allclose(g, e, atol=1e-6)
        assert torch.allclose(last_block_tokens(vit, images, 1)[0], vit.forward_features(images))
    with pytest.raises(ValueError, match="eval.blocks=5 must be between 1 and .* depth \\(4\\)"):
        last_block_tokens(vit, images, 5)
    data = load_dataset(DatasetSpec("synthetic", synthetic_size=16), "train")
    vit = build_vit(ModelSection(preset="vit_tiny_p4"), data.image_size, data.channels)
    one, _ = extract_features(vit, data, kind="cls+mean", blocks=1)
    two, _ = extract_features(vit, data, kind="cls+mean", blocks=2)
    assert one.shape == (16, 256) and two.shape == (16, 512)
    assert torch.allclose(two[:, 256:], one, atol=1e-5)  # the last block's part is blocks=1


def test_a_frozen_patch_projection_stays_at_its_start_while_the_rest_trains(generator):
    """``model.freeze_patch_embed=true``: after real optimiser steps (AdamW with weight decay)
    the patch projection is bit-for-bit its random start, the blocks have moved, and the
    optimiser does not hold it; without the key it trains."""
    from attnssl.config import load_config
    from attnssl.methods import build_method
    from attnssl.train.optimisation import build_optimizer

    def train(*overrides):
        config = load_config("bam_synthetic", list(overrides))
        torch.manual_seed(0)
        method = build_method(config, build_vit(config.model, 32, 3))
        optimizer = build_optimizer(method, config.optim)
        backbone = method.backbone
        start = {k: v.clone() for k, v in backbone.state_dict().items()}
        images = torch.rand(8, 3, 32, 32, generator=generator)
        for _ in range(2):
            views = [images, images.flip(-1), images[..., ::2, ::2], images[..., 1::2, 1::2]]
            method(views)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        moved = {k for k, v in backbone.state_dict().items() if not torch.equal(v, start[k])}
        return backbone, held, moved

    frozen, held, moved = train("model.freeze_patch_embed=true")
    assert not frozen.patch_embed.proj.weight.requires_grad
    assert id(frozen.patch_embed.proj.weight) not in held
    assert not moved & {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert "blocks.0.attn.qkv.weight" in moved
    _, _, moved = train()
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias"} <= moved
