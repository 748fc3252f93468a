import math

import pytest
import torch

from attnssl.functional import nt_xent
from attnssl.losses import NTXentLoss


def nt_xent_loop(z: torch.Tensor, n_views: int, temperature: float) -> torch.Tensor:
    """SimCLR's equation, one anchor and one positive at a time."""
    rows = z.shape[0]
    batch = rows // n_views
    unit = [z[a] / z[a].norm() for a in range(rows)]
    total, count = 0.0, 0
    for a in range(rows):
        view, image = divmod(a, batch)
        sims = [float(unit[a] @ unit[k]) / temperature for k in range(rows)]
        denominator = sum(math.exp(sims[k]) for k in range(rows) if k != a)
        for other in range(n_views):
            if other == view:
                continue
            p = other * batch + image
            total += -math.log(math.exp(sims[p]) / denominator)
            count += 1
    return torch.tensor(total / count, dtype=torch.float64)


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_loop(n_views, temperature, generator):
    z = torch.randn(n_views * 5, 8, generator=generator, dtype=torch.float64)
    fast = nt_xent(z, z, n_views, temperature)
    assert torch.allclose(fast.double(), nt_xent_loop(z, n_views, temperature), atol=1e-5)


def test_nt_xent_gradients_match_autograd_of_loop_equation(generator):
    # the loop above in differentiable float64 form
    z = torch.randn(8, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    n_views, temperature, batch = 2, 0.2, 4
    unit = z / z.norm(dim=1, keepdim=True)
    terms = []
    for a in range(8):
        logits = torch.stack([unit[a] @ unit[k] / temperature for k in range(8) if k != a])
        p = (a + batch) % 8
        pos = unit[a] @ unit[p] / temperature
        terms.append(-(pos - torch.logsumexp(logits, 0)))
    (reference_grad,) = torch.autograd.grad(torch.stack(terms).mean(), z)
    (grad,) = torch.autograd.grad(nt_xent(z, z, n_views, temperature), z)
    assert torch.allclose(grad.double(), reference_grad, atol=1e-6)


def test_perfect_alignment_has_lower_loss_than_random(generator):
    base = torch.randn(16, 32, generator=generator)
    aligned = torch.cat([base, base + 0.01 * torch.randn(16, 32, generator=generator)])
    random = torch.randn(32, 32, generator=generator)
    loss = NTXentLoss(2, 0.1)
    assert loss(aligned) < loss(random) - 1.0


def test_rejects_single_view():
    with pytest.raises(ValueError, match="n_views >= 2"):
        NTXentLoss(n_views=1)


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
