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
