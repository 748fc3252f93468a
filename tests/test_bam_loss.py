"""BAM's loss against a slow loop of the paper's equations, Sinkhorn's properties, blocks."""

import math

import pytest
import torch

from attnssl.functional.bam import (
    BAMSpec,
    bam_loss,
    keep_top_k,
    positive_mask,
    sinkhorn,
)
from attnssl.losses import BAMLoss


def _unit(v):
    return v / torch.sqrt(sum(x * x for x in v))


def reference_bam(student, teacher, n_views, n_targets, tau, eps, iters, masking, top_k,
                  masked_images=None):
    """Scalar loops over rows and columns, float64, no shift: the equations as written.
    ``masked_images``: the images whose own columns are masked (all, with ``masking``)."""
    rows = [_unit(r) for r in student]
    t_rows = rows if teacher is None else [_unit(r.detach()) for r in teacher]
    batch = len(rows) // n_views
    columns = [t_rows[g * batch + j] for g in range(n_targets) for j in range(batch)]
    n_cols = len(columns)

    def masked(r, c):
        chosen = masked_images is None or bool(masked_images[r % batch])
        return masking and chosen and (c % batch) == (r % batch)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    # source attention: log-softmax over the unmasked columns
    log_a = []
    for r, z in enumerate(rows):
        logits = [dot(z, columns[c]) / tau for c in range(n_cols)]
        norm = torch.logsumexp(torch.stack([logits[c] for c in range(n_cols) if not masked(r, c)]), 0)
        log_a.append([None if masked(r, c) else logits[c] - norm for c in range(n_cols)])

    # target: Sinkhorn with plain Python sums
    with torch.no_grad():
        q = [[0.0 if masked(r, c) else math.exp(float(dot(t_rows[r], columns[c])) / eps)
              for c in range(n_cols)] for r in range(len(rows))]
        total = sum(map(sum, q))
        q = [[x / total for x in row] for row in q]
        n_masked = n_targets if masking else 0
        for _ in range(iters):
            for c in range(n_cols):
                s = sum(q[r][c] for r in range(len(rows)))
                for r in range(len(rows)):
                    q[r][c] *= (1.0 / (n_cols - n_masked)) / s
            for r in range(len(rows)):
                s = sum(q[r])
                q[r] = [x * (1.0 / len(rows)) / s for x in q[r]]
        p = [[x / sum(row) for x in row] for row in q[: n_targets * batch]]
        if top_k:
            for i in range(batch):
                mean = [sum(p[g * batch + i][c] for g in range(n_targets)) / n_targets
                        for c in range(n_cols)]
                keep = sorted(range(n_cols), key=lambda c: -mean[c])[:top_k]
                for g in range(n_targets):
                    row = [p[g * batch + i][c] if c in keep else 0.0 for c in range(n_cols)]
                    p[g * batch + i] = [x / sum(row) for x in row]

    loss = 0.0
    for g in range(n_targets):
        sources = [s for s in range(n_views) if s != g]
        for s in sources:
            for i in range(batch):
                for c in range(n_cols):
                    if not masked(i, c) and p[g * batch + i][c] > 0:
                        loss = loss - p[g * batch + i][c] * log_a[s * batch + i][c] / (
                            batch * len(sources) * n_targets)
    return loss


def _embeddings(seed, n_views, batch, dim, use_teacher):
    """Random float64 student (and teacher) embeddings, ``(n_views * batch, dim)``."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n_views * batch, dim, generator=g, dtype=torch.float64)
    teacher = torch.randn(n_views * batch, dim, generator=g, dtype=torch.float64) if use_teacher else None
    return student, teacher


CASES = [
    # teacher, masking, top_k
    (False, True, 0),
    (True, True, 0),
    (False, False, 0),
    (True, False, 0),
    (False, True, 4),
    (True, True, 3),
]


@pytest.mark.parametrize("use_teacher,masking,top_k", CASES)
def test_loss_and_gradients_match_the_loop_reference(use_teacher, masking, top_k):
    n_views, n_targets, batch, dim = 3, 2, 4, 5
    student, teacher = _embeddings(1, n_views, batch, dim, use_teacher)
    kwargs = dict(temperature=0.1, sinkhorn_eps=0.05, sinkhorn_iters=3, positive_masking=masking,
                  top_k=top_k)

    s1 = student.clone().requires_grad_(True)
    loss = BAMLoss(n_views, n_targets, **kwargs)(s1, teacher).loss
    loss.backward()

    s2 = student.clone().requires_grad_(True)
    ref = reference_bam(list(s2), None if teacher is None else list(teacher), n_views, n_targets,
                        0.1, 0.05, 3, masking, top_k)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-9, atol=1e-10)
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-7, atol=1e-10)


def test_without_teacher_gradient_flows_through_columns():
    """The official no-teacher loss: the columns (global views) are the student's, not detached."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    columns = torch.nn.functional.normalize(z[:4], dim=-1)
    spec = BAMSpec(n_views=3, n_targets=2)
    grads = torch.autograd.grad(bam_loss(torch.nn.functional.normalize(z, dim=-1), columns,
                                         z.detach(), columns.detach(), spec).loss, z)[0]
    detached = torch.autograd.grad(bam_loss(torch.nn.functional.normalize(z, dim=-1),
                                            columns.detach(), z.detach(), columns.detach(),
                                            spec).loss, z)[0]
    assert not torch.allclose(grads[:4], detached[:4])  # global rows also get column gradients
    assert torch.allclose(grads[4:], detached[4:])  # local rows are never columns


def test_sinkhorn_rows_sum_to_one_and_masked_entries_are_zero():
    g = torch.Generator().manual_seed(3)
    batch, n_views, n_targets = 8, 4, 2
    scores = torch.randn(n_views * batch, n_targets * batch, generator=g).clamp(-1, 1)
    mask = positive_mask(batch, n_views, n_targets)
    p = sinkhorn(scores, 0.05, 3, mask, n_masked=n_targets)
    assert torch.allclose(p.sum(dim=1), torch.ones(n_views * batch), atol=1e-5)
    assert (p[mask] == 0).all()
    assert (p[~mask] > 0).all()
    assert mask.sum(dim=1).eq(n_targets).all()


def test_sinkhorn_balances_the_columns():
    """Column masses move towards equal with iterations and reach it in the limit."""
    g = torch.Generator().manual_seed(4)
    batch, n_views, n_targets = 8, 4, 2
    scores = torch.randn(n_views * batch, n_targets * batch, generator=g, dtype=torch.float64)
    scores = torch.nn.functional.normalize(scores, dim=1)
    mask = positive_mask(batch, n_views, n_targets)
    expected = n_views * batch / (n_targets * batch)  # equal share of the rows' total mass

    def spread(p):
        return (p.sum(dim=0) - expected).abs().max().item()

    softmax = torch.softmax((scores / 0.05).masked_fill(mask, float("-inf")), dim=1)
    three = sinkhorn(scores, 0.05, 3, mask, n_targets)
    many = sinkhorn(scores, 0.05, 500, mask, n_targets)
    assert spread(three) < spread(softmax)
    assert spread(many) < 1e-6
    assert torch.allclose(many.sum(dim=1), torch.ones(n_views * batch, dtype=torch.float64))


def test_positive_mask_marks_own_global_views_across_processes():
    batch, n_views, n_targets, world, rank = 3, 4, 2, 2, 1
    mask = positive_mask(batch, n_views, n_targets, world, rank)
    assert mask.shape == (n_views * batch, n_targets * batch * world)
    for row in range(n_views * batch):
        i = row % batch
        expected = {g * batch * world + rank * batch + i for g in range(n_targets)}
        assert set(mask[row].nonzero().flatten().tolist()) == expected


def test_top_k_keeps_k_shared_columns_per_image():
    g = torch.Generator().manual_seed(5)
    p = torch.rand(2 * 5, 12, generator=g)
    p = p / p.sum(dim=1, keepdim=True)
    kept = keep_top_k(p, n_targets=2, k=4)
    assert torch.allclose(kept.sum(dim=1), torch.ones(10))
    nonzero = kept.ne(0).view(2, 5, 12)
    assert nonzero.sum(dim=-1).eq(4).all()
    assert torch.equal(nonzero[0], nonzero[1])  # both global views keep the same columns


@pytest.mark.parametrize("use_teacher,masking,top_k", CASES)
def test_blockwise_equals_full(use_teacher, masking, top_k):
    n_views, n_targets, batch, dim = 4, 2, 10, 6
    student, teacher = _embeddings(6, n_views, batch, dim, use_teacher)
    results = []
    for blockwise, block in ((False, None), (True, 3), (True, 1)):
        z = student.clone().requires_grad_(True)
        crit = BAMLoss(n_views, n_targets, positive_masking=masking, top_k=top_k,
                       blockwise=blockwise, block_images=block)
        out = crit(z, teacher)
        out.loss.backward()
        results.append((out.loss.detach(), z.grad, out.source_entropy, out.target_entropy))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_auto_switches_to_blocks_on_large_matrices(monkeypatch):
    import attnssl.losses.bam as module

    calls = []
    real = module.bam_loss_blockwise
    monkeypatch.setattr(module, "BLOCKWISE_AUTO_ENTRIES", 100)
    monkeypatch.setattr(module, "bam_loss_blockwise",
                        lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    crit = BAMLoss(2)
    crit(torch.randn(2 * 6, 4))  # 12 x 12 = 144 entries: blocks
    crit(torch.randn(2 * 4, 4))  # 8 x 8 = 64: full
    assert len(calls) == 1


def test_low_precision_embeddings_give_a_float32_loss():
    z = torch.randn(2 * 8, 16)
    crit = BAMLoss(2)
    reference = crit(z).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = crit(z.bfloat16()).loss
    assert low.dtype == torch.float32
    assert torch.allclose(low, reference, atol=0.05)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_views=2, n_global_views=3), "n_global_views"),
    (dict(n_views=2, normalization="batch"), "normalization"),
    (dict(n_views=2, blockwise="yes"), "blockwise"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BAMLoss(**kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="n_views"):
        BAMLoss(3)(torch.randn(8, 4))
    with pytest.raises(ValueError, match="teacher"):
        BAMLoss(2)(torch.randn(8, 4), torch.randn(8, 5))
    with pytest.raises(ValueError, match="top_k"):
        BAMLoss(2, top_k=100)(torch.randn(8, 4))


def test_a_scheduled_eps_given_per_call_is_the_one_used(generator):
    z = torch.randn(2 * 6, 4, generator=generator, dtype=torch.float64)
    per_call = BAMLoss(2, sinkhorn_eps=0.05)(z, sinkhorn_eps=0.2).loss
    assert per_call.item() == pytest.approx(BAMLoss(2, sinkhorn_eps=0.2)(z).loss.item(), rel=1e-12)
    assert per_call.item() != pytest.approx(BAMLoss(2, sinkhorn_eps=0.05)(z).loss.item(), rel=1e-3)


@pytest.mark.parametrize("iters", [0, 1, 10])
def test_any_number_of_sinkhorn_rounds_matches_the_loop_on_both_paths(iters):
    """0 rounds is the plain (masked) softmax target, the ablation of the balancing."""
    n_views, n_targets, batch, dim = 3, 2, 4, 5
    student, teacher = _embeddings(4, n_views, batch, dim, True)
    ref = reference_bam(list(student), list(teacher), n_views, n_targets, 0.1, 0.05, iters,
                        True, 0)
    for blockwise in (False, True):
        loss = BAMLoss(n_views, n_targets, temperature=0.1, sinkhorn_eps=0.05,
                       sinkhorn_iters=iters, blockwise=blockwise, block_images=1)(
            student, teacher).loss
        assert loss.item() == pytest.approx(ref.item(), rel=1e-9), blockwise
    if iters == 0:  # the target is each row's softmax over its unmasked columns
        from attnssl.functional.bam import positive_mask, sinkhorn

        z = torch.nn.functional.normalize(teacher, dim=-1)
        scores, mask = z @ z[: n_targets * batch].T, positive_mask(batch, n_views, n_targets)
        expected = (scores / 0.05).masked_fill(mask, float("-inf")).softmax(-1)
        torch.testing.assert_close(sinkhorn(scores, 0.05, 0, mask, n_targets), expected)


def test_partial_positive_masking_masks_only_the_drawn_images_on_both_paths():
    n_views, n_targets, batch, dim = 3, 2, 4, 5
    student, teacher = _embeddings(5, n_views, batch, dim, True)
    chosen = torch.tensor([True, False, False, True])
    ref = reference_bam(list(student), list(teacher), n_views, n_targets, 0.1, 0.05, 3, True, 0,
                        masked_images=chosen)
    for blockwise in (False, True):
        loss = BAMLoss(n_views, n_targets, blockwise=blockwise, block_images=1)(
            student, teacher, masked_images=chosen).loss
        assert loss.item() == pytest.approx(ref.item(), rel=1e-9), blockwise
    # all drawn is the official rule, none drawn is no masking
    everyone = BAMLoss(n_views, n_targets)(student, teacher).loss
    assert BAMLoss(n_views, n_targets)(student, teacher, masked_images=torch.ones(
        batch, dtype=torch.bool)).loss.item() == pytest.approx(everyone.item(), rel=1e-12)
    unmasked = BAMLoss(n_views, n_targets, positive_masking=False)(student, teacher).loss
    assert BAMLoss(n_views, n_targets)(student, teacher, masked_images=torch.zeros(
        batch, dtype=torch.bool)).loss.item() == pytest.approx(unmasked.item(), rel=1e-9)
