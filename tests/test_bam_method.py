"""The BAM method: multi-crop forward, EMA teacher, schedules, and one real step."""

import pytest
import torch

from attnssl.config import ConfigError, load_config
from attnssl.data.datasets import make_synthetic
from attnssl.data.views import MultiCropViews
from attnssl.functional.schedules import cosine, linear_ramp
from attnssl.methods import build_method, evaluation_backbone, evaluation_backbone_prefix
from attnssl.methods.multicrop import multicrop_forward
from attnssl.nn.vit import build_vit
from attnssl.runs.trained import backbone_from_method_state


def _bam(*overrides):
    config = load_config("bam_synthetic", list(overrides))
    torch.manual_seed(0)
    backbone = build_vit(config.model, 32, 3)
    return config, build_method(config, backbone)


def _views(config, batch=8):
    images, _, _ = make_synthetic(batch, 32, seed=1)
    views = MultiCropViews(config.views, 32, 3, [0.5] * 3, [0.25] * 3, seed=0)
    return views(images)


def test_multicrop_forward_equals_one_view_at_a_time():
    config, method = _bam()
    views = _views(config)
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]
    with torch.no_grad():
        joint = multicrop_forward(method.backbone, method.projector, views)
        single = torch.cat([method.projector(method.backbone(v)) for v in views])
    assert torch.allclose(joint, single, atol=1e-5)


def test_step_trains_the_student_and_not_the_teacher():
    config, method = _bam()
    out = method(_views(config))
    assert torch.isfinite(out["loss"])
    for key in ("source_entropy", "target_entropy", "embedding_std", "effective_rank"):
        assert torch.isfinite(out[key]), key
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in method.named_parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())


def test_teacher_follows_the_ema_formula():
    config, method = _bam("method.teacher_momentum=0.9")
    student = dict(method.backbone.named_parameters())
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in method.teacher["backbone"].named_parameters()}
    method.after_step(step=5, total_steps=20)
    m = cosine(5, 20, 0.9, 1.0)
    assert method.momentum == pytest.approx(m)
    for name, p in method.teacher["backbone"].named_parameters():
        assert torch.allclose(p, m * before[name] + (1 - m) * student[name], atol=1e-6)


def test_sinkhorn_eps_follows_its_schedule():
    _, method = _bam("method.sinkhorn_eps=0.1", "method.sinkhorn_eps_end=0.05",
                     "method.sinkhorn_eps_warmup_epochs=2")
    method.before_step(step=5, steps_per_epoch=10, total_steps=100)
    assert method.sinkhorn_eps == pytest.approx(0.1 - 0.05 * 5 / 20)
    method.before_step(step=50, steps_per_epoch=10, total_steps=100)
    assert method.sinkhorn_eps == pytest.approx(0.05)
    assert linear_ramp(0, 0, 1.0, 2.0) == 2.0


def test_without_teacher_the_student_is_evaluated():
    config, method = _bam("method.teacher=false")
    assert method.teacher is None
    out = method(_views(config))
    assert torch.isfinite(out["loss"])
    assert evaluation_backbone(method) is method.backbone
    assert evaluation_backbone_prefix(config.method) == "backbone."


def test_evaluated_backbone_is_the_teachers_and_loads_from_the_state_dict():
    config, method = _bam()
    assert evaluation_backbone(method) is method.teacher["backbone"]
    weights = backbone_from_method_state(method.state_dict(), evaluation_backbone_prefix(config.method))
    fresh = build_vit(config.model, 32, 3)
    fresh.load_state_dict(weights)
    student_cfg = load_config("bam_synthetic", ["method.eval_backbone=student"])
    assert evaluation_backbone_prefix(student_cfg.method) == "backbone."


def test_bad_bam_settings_are_named():
    with pytest.raises(ConfigError, match="eval_backbone=teacher needs teacher=true"):
        load_config("bam_synthetic", ["method.teacher=false", "method.eval_backbone=teacher"])
    with pytest.raises(ConfigError, match="sinkhorn_iter"):
        load_config("bam_synthetic", ["method.sinkhorn_iter=3"])
    with pytest.raises(ConfigError, match="normalization"):
        load_config("bam_synthetic", ["method.normalization=batch"])
    with pytest.raises(ConfigError, match="projector_last_batchnorm=true needs projector_batchnorm"):
        load_config("bam_synthetic", ["method.projector_last_batchnorm=true"])


def test_batch_normed_projector_is_the_official_layer_order():
    """With both batch norms: Linear, BN, GELU per hidden layer, then Linear and an affine-free
    BN, whose training output has zero mean and unit variance per channel; by hand: the same
    numbers from the layers' own weights and the batch's statistics."""
    _, method = _bam("method.projector_batchnorm=true", "method.projector_last_batchnorm=true",
                     "method.projector_layers=2", "method.projector_hidden=16",
                     "method.projector_out=8")
    projector = method.projector.train()
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "GELU", "Linear", "GlobalBatchNorm1d"]
    assert projector[1].affine and not projector[4].affine
    h = torch.randn(64, method.backbone.embed_dim)
    with torch.no_grad():
        projector[1].weight.uniform_(0.5, 2.0)
        projector[1].bias.uniform_(-1.0, 1.0)
        out = projector(h)

        def batch_norm(x, eps=1e-5):
            return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + eps)

        first = projector[0](h)
        hidden = torch.nn.functional.gelu(batch_norm(first) * projector[1].weight
                                          + projector[1].bias)
        before_last = projector[3](hidden)
        expected = batch_norm(before_last)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)
    spread = before_last.var(0, unbiased=False)  # unit variance, up to the eps of 1e-5
    assert torch.allclose(out.var(0, unbiased=False), spread / (spread + 1e-5), atol=1e-4)
    _, plain = _bam()
    assert not any("BatchNorm" in type(m).__name__ for m in plain.projector)


def test_partial_positive_masking_draws_each_image_from_torchs_generator():
    config, method = _bam("method.positive_masking_prob=0.5")
    views = _views(config)
    torch.manual_seed(7)
    drawn = method._masked_images(views)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(8) < 0.5) and 0 < drawn.sum() < 8
    torch.manual_seed(7)
    partial = method(views)["loss"]
    _, official = _bam()
    assert official._masked_images(views) is None
    assert torch.isfinite(partial) and partial.item() != pytest.approx(official(views)["loss"].item())


def test_positive_masking_prob_zero_is_positive_masking_off():
    _, never = _bam("method.positive_masking_prob=0")
    config, off = _bam("method.positive_masking=false")
    off.load_state_dict(never.state_dict())
    views = _views(config)
    torch.manual_seed(3)
    expected = off(views)["loss"]
    torch.manual_seed(3)
    assert never._masked_images(views) is None
    assert torch.equal(never(views)["loss"], expected)
