"""DINO: the loss against a loop over its formula, the centre, the schedules, the head, the method."""

import math

import numpy as np
import pytest
import torch

from attnssl.config import load_config
from attnssl.functional.dino import batch_center, teacher_temperature
from attnssl.losses.dino import DINOLoss
from attnssl.methods import build_method
from attnssl.nn.heads import DINOHead
from attnssl.nn.vit import build_vit


def loop_dino_loss(student, teacher, center, n_views, n_global, t_s, t_t):
    """``mean_{g, v != g} mean_i -sum_k p_g[i,k] log q_v[i,k]``, one scalar at a time, float64."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    batch, dim = student.shape[0] // n_views, student.shape[1]
    total, pairs = 0.0, 0
    for g in range(n_global):
        for v in range(n_views):
            if v == g:
                continue
            pair = 0.0
            for i in range(batch):
                t_row = [math.exp((teacher[g * batch + i, k] - center[0, k]) / t_t) for k in range(dim)]
                s_row = [math.exp(student[v * batch + i, k] / t_s) for k in range(dim)]
                t_sum, s_sum = sum(t_row), sum(s_row)
                pair += -sum(t_row[k] / t_sum * math.log(s_row[k] / s_sum) for k in range(dim))
            total += pair / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_views,n_global", [(2, 2), (5, 2), (3, 1)])
def test_dino_loss_matches_the_loop_and_moves_the_centre(n_views, n_global, generator):
    batch, dim = 3, 6
    student = torch.randn(n_views * batch, dim, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(n_global * batch, dim, generator=generator, dtype=torch.float64) * 3
    criterion = DINOLoss(dim, n_views, n_global, student_temp=0.1, teacher_temp=0.05,
                         center_momentum=0.9)
    center = torch.randn(1, dim, generator=generator)
    criterion.center.copy_(center)
    z = student.clone().requires_grad_(True)
    loss = criterion(z, teacher).loss
    expected = loop_dino_loss(student, teacher, center, n_views, n_global, 0.1, 0.05)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # gradient against autograd through the loop's formula
    ref = student.clone().requires_grad_(True)
    p = torch.softmax((teacher - center.double()) / 0.05, -1).view(n_global, batch, dim)
    q = torch.log_softmax(ref / 0.1, -1).view(n_views, batch, dim)
    pairs = [-(p[g] * q[v]).sum(-1).mean() for g in range(n_global) for v in range(n_views) if v != g]
    (sum(pairs) / len(pairs)).backward()
    loss.backward()
    assert torch.allclose(z.grad.double(), ref.grad, atol=1e-5)
    # centre: c <- 0.9 c + 0.1 * (mean teacher row)
    mean_row = [sum(teacher[i, k].item() for i in range(len(teacher))) / len(teacher)
                for k in range(dim)]
    expected_center = [0.9 * center[0, k].item() + 0.1 * mean_row[k] for k in range(dim)]
    assert criterion.center[0].tolist() == pytest.approx(expected_center, abs=1e-6)



def dinov2_sinkhorn_knopp(teacher, temp, iters):
    """DINOv2's teacher in its own notation: ``Q`` is prototypes x samples, prototype rows
    scaled to ``1/K``, sample columns to ``1/B``, then ``Q * B`` transposed; float64 loops."""
    rows = [[math.exp(teacher[i, k].item() / temp) for i in range(teacher.shape[0])]
            for k in range(teacher.shape[1])]
    n_protos, n_samples = len(rows), len(rows[0])
    total = sum(map(sum, rows))
    rows = [[x / total for x in row] for row in rows]
    for _ in range(iters):
        rows = [[x / sum(row) / n_protos for x in row] for row in rows]
        column_sums = [sum(row[i] for row in rows) for i in range(n_samples)]
        rows = [[x / column_sums[i] / n_samples for i, x in enumerate(row)] for row in rows]
    return torch.tensor([[rows[k][i] * n_samples for k in range(n_protos)] for i in range(n_samples)],
                        dtype=torch.float64)


def test_sinkhorn_centering_is_dinov2s_teacher_and_leaves_the_centre(generator):
    n_views, n_global, batch, dim = 4, 2, 5, 7
    student = torch.randn(n_views * batch, dim, generator=generator, dtype=torch.float64)
    teacher = torch.randn(n_global * batch, dim, generator=generator, dtype=torch.float64)
    criterion = DINOLoss(dim, n_views, n_global, teacher_temp=0.3, centering="sinkhorn",
                         sinkhorn_iters=3)
    targets = criterion.targets(teacher)
    expected = dinov2_sinkhorn_knopp(teacher, 0.3, 3)
    assert torch.allclose(targets, expected, atol=1e-12)
    assert torch.allclose(targets.sum(-1), torch.ones(n_global * batch, dtype=torch.float64))
    # balanced: every output dimension gets close to the same share of the batch's mass
    assert targets.sum(0).std() < (teacher / 0.3).softmax(-1).sum(0).std() / 3
    loss = criterion(student, teacher).loss
    p = expected.view(n_global, batch, dim)
    q = torch.log_softmax(student / 0.1, -1).view(n_views, batch, dim)
    pairs = [-(p[g] * q[v]).sum(-1).mean() for g in range(n_global) for v in range(n_views) if v != g]
    assert loss.item() == pytest.approx((sum(pairs) / len(pairs)).item(), rel=1e-10)
    assert torch.count_nonzero(criterion.center) == 0


def test_dino_rejects_an_unknown_centering():
    with pytest.raises(ValueError, match="centering must be 'ema' or 'sinkhorn'"):
        DINOLoss(8, 2, centering="mean")


def test_diagnostics_are_entropy_and_kl(generator):
    criterion = DINOLoss(5, 2, 2, teacher_temp=0.07)
    student = torch.randn(4, 5, generator=generator)
    teacher = torch.randn(4, 5, generator=generator)
    out = criterion(student, teacher)
    p = torch.softmax(teacher / 0.07, -1)
    q = torch.log_softmax(student / 0.1, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    kl = torch.stack([(p[g * 2:(g + 1) * 2] * (p[g * 2:(g + 1) * 2].log() - q[v * 2:(v + 1) * 2]))
                      .sum(-1).mean() for g, v in ((0, 1), (1, 0))]).mean()
    assert out.teacher_entropy.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert out.kl.item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    # the same logits for student and teacher at the same temperature: no divergence left
    same = DINOLoss(5, 2, 2, student_temp=0.1, teacher_temp=0.1)
    rows = torch.randn(2, 5, generator=generator)
    assert abs(same(torch.cat([rows, rows]), torch.cat([rows, rows])).kl.item()) < 1e-5


def test_weighted_batch_center_is_the_mean_of_weighted_rows():
    values = torch.tensor([[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]], dtype=torch.float64)
    assert batch_center(values)[0].tolist() == pytest.approx([104 / 3, 36.0])
    weights = torch.tensor([1.0, 1.0, 0.0])  # the third row is not valid
    assert batch_center(values, weights).tolist() == [[2.0, 4.0]]


def test_teacher_temperature_follows_the_official_linspace():
    schedule = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(10, 0.07)])
    ours = [teacher_temperature(e, 30, 0.04, 0.07) for e in range(40)]
    assert ours == pytest.approx(schedule.tolist())
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07  # no warm-up: the final value


def test_dino_head_has_unit_rows_and_fixed_scales():
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4, layers=3)
    weight = head.last_layer.weight
    assert torch.allclose(weight.norm(dim=1), torch.ones(32), atol=1e-6)
    scales = head.last_layer.parametrizations.weight.original0
    assert not scales.requires_grad
    assert DINOHead(8, 32, 16, 4, norm_last_layer=False).last_layer.parametrizations.weight \
        .original0.requires_grad
    out = head(torch.randn(2, 3, 8))  # any leading shape
    assert out.shape == (2, 3, 32)
    # the output is a cosine: |logit| <= 1
    assert out.abs().max() <= 1 + 1e-5


def _dino(overrides=()):
    cfg = load_config(None, ["method.name=dino", "method.out_dim=64", "method.head_hidden=32",
                             "method.head_bottleneck=16", "views.local_crops=2",
                             "views.local_size=16", "model.preset=null", "model.patch_size=8",
                             "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                             *overrides])
    torch.manual_seed(0)
    return build_method(cfg, build_vit(cfg.model, 32, 3)), cfg


def test_dino_step_freezes_the_last_layer_only_in_the_first_epoch(generator):
    method, _ = _dino()
    views = [torch.randn(4, 3, 32, 32, generator=generator) for _ in range(2)] + \
            [torch.randn(4, 3, 16, 16, generator=generator) for _ in range(2)]
    for step, frozen in ((0, True), (9, True), (10, False)):
        method.zero_grad()
        method.before_step(step, steps_per_epoch=10, total_steps=30)
        out = method(views)
        out["loss"].backward()
        method.before_optimizer_step()
        last = method.head.last_layer.parametrizations.weight.original1
        assert (last.grad is None) == frozen, step
        # every other student parameter has a gradient, no teacher parameter does
        assert all(p.grad is not None for n, p in method.named_parameters()
                   if p.requires_grad and "last_layer" not in n)
        assert all(p.grad is None for p in method.teacher.parameters())
    assert out["teacher_temp"].item() == pytest.approx(teacher_temperature(1, 30, 0.04, 0.07))


def test_dino_teacher_sees_only_the_global_views(generator):
    """Changing a local view changes the student's loss but not the teacher's targets."""
    method, _ = _dino(["method.center_momentum=1.0"])
    views = [torch.randn(2, 3, 32, 32, generator=generator) for _ in range(2)] + \
            [torch.randn(2, 3, 16, 16, generator=generator) for _ in range(2)]
    teacher = method._teacher_outputs(views)
    views[3] = torch.randn(2, 3, 16, 16, generator=generator)
    assert torch.equal(method._teacher_outputs(views), teacher)
    assert teacher.shape == (4, 64)


def test_evaluated_backbone_is_the_teacher():
    method, cfg = _dino()
    assert method.evaluation_backbone is method.teacher["backbone"]
    from attnssl.methods import evaluation_backbone_prefix

    assert evaluation_backbone_prefix(cfg.method) == "teacher.backbone."
    state = method.state_dict()
    assert any(k.startswith("teacher.backbone.") for k in state)


def test_a_scheduled_teacher_temperature_given_per_call_is_the_one_used(generator):
    student = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    teacher = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    per_call = DINOLoss(5, 2, 2, teacher_temp=0.04)(student, teacher, teacher_temp=0.07).loss
    fixed = DINOLoss(5, 2, 2, teacher_temp=0.07)(student, teacher).loss
    assert per_call.item() == pytest.approx(fixed.item(), rel=1e-12)
