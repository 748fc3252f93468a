"""SimCLR's projector: the official code's output batch norm, and the scale-only global BN."""

import pytest
import torch


def test_simclr_output_batch_norm_is_the_official_head():
    """``method.projector_last_batchnorm=true``: the last linear map loses its bias and is
    followed by a batch norm that learns a scale and no shift; by hand, the training output is
    ``gamma * (x - mean) / sqrt(var + eps)`` of the last map's batch, so each channel's batch
    mean is zero and its spread is gamma. Without it the head is as before (bias, no BN)."""
    from attnssl.config import load_config
    from attnssl.methods import build_method
    from attnssl.nn.vit import build_vit

    config = load_config("simclr_synthetic", ["method.projector_last_batchnorm=true",
                                              "method.projector_hidden=16",
                                              "method.projector_out=8"])
    torch.manual_seed(0)
    method = build_method(config, build_vit(config.model, 32, 3))
    projector = method.projector.train()
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "ReLU", "Linear", "GlobalBatchNorm1d"]
    assert projector[3].bias is None and projector[4].bias is None
    assert "4.bias" not in projector.state_dict() and "4.weight" in projector.state_dict()
    h = torch.randn(64, method.backbone.embed_dim)
    with torch.no_grad():
        projector[4].weight.uniform_(0.5, 2.0)
        out = projector(h)
        before_last = projector[3](projector[2](projector[1](projector[0](h))))
        expected = ((before_last - before_last.mean(0))
                    / torch.sqrt(before_last.var(0, unbiased=False) + 1e-5) * projector[4].weight)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)
    loss = method([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])["loss"]
    loss.backward()
    assert projector[4].weight.grad is not None and projector[4].weight.grad.abs().sum() > 0

    plain = build_method(load_config("simclr_synthetic", []), build_vit(config.model, 32, 3))
    assert type(plain.projector[-1]).__name__ == "Linear" and plain.projector[-1].bias is not None


def test_a_shift_free_batch_norm_needs_an_affine_one():
    from attnssl.nn.global_batch_norm import GlobalBatchNorm1d

    with pytest.raises(ValueError, match="affine=False"):
        GlobalBatchNorm1d(4, affine=False, shift=False)
