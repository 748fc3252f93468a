import pytest
import torch
import torch.nn.functional as F

from attnssl.eval.knn import knn_accuracy, weighted_knn_predict
from attnssl.eval.linear import linear_probe_accuracy
from attnssl.functional.schedules import cosine, warmup_cosine


def knn_loop(train, labels, query, num_classes, k, temperature):
    """DINO's weighted k-NN, one query at a time."""
    scores = torch.zeros(query.shape[0], num_classes)
    for q in range(query.shape[0]):
        sims = [(F.cosine_similarity(query[q], train[j], dim=0).item(), j)
                for j in range(train.shape[0])]
        for s, j in sorted(sims, reverse=True)[:k]:
            scores[q, labels[j]] += torch.exp(torch.tensor(s / temperature))
    return scores


def test_weighted_knn_matches_loop(generator):
    train = torch.randn(40, 5, generator=generator)
    labels = torch.randint(0, 3, (40,), generator=generator)
    query = torch.randn(7, 5, generator=generator)
    fast = weighted_knn_predict(train, labels, query, 3, k=6, temperature=0.1, chunk=3)
    assert torch.allclose(fast, knn_loop(train, labels, query, 3, 6, 0.1), rtol=1e-4)


def test_knn_separates_clusters_and_needs_k_points(generator):
    centres = torch.eye(4) * 5
    labels = torch.arange(4).repeat_interleave(10)
    train = centres[labels] + torch.randn(40, 4, generator=generator) * 0.3
    test = centres[labels] + torch.randn(40, 4, generator=generator) * 0.3
    assert knn_accuracy(train, labels, test, labels, 4, k=5) == 100.0
    with pytest.raises(ValueError, match="k=50 needs at least 50"):
        knn_accuracy(train, labels, test, labels, 4, k=50)


def test_linear_probe_learns_a_linear_rule_and_rejects_one_class(generator):
    x = torch.randn(600, 10, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).long()
    assert linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:], 2, epochs=30, lr=1e-2,
                                 batch_size=64) > 95
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        linear_probe_accuracy(x, torch.zeros(600, dtype=torch.long), x, y, 2)


def test_schedules_endpoints():
    assert warmup_cosine(0, 100, 10, 1.0, 0.1) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(10, 10, 0.04, 0.4) == pytest.approx(0.4)


def test_images_stored_larger_than_the_crops_are_evaluated_resized_and_centre_cropped():
    """Stored at 64 px, trained on 28 px crops: the evaluation resizes to round(28 / 0.875) = 32
    and keeps the centre 28 px, as the official Resize(256) + CenterCrop(224); stored at the
    crop size, the images are used as they are."""
    import torch.nn.functional as F

    from attnssl.eval.features import evaluation_images

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = evaluation_images(images, 28)
    assert out.shape == (2, 3, 28, 28) and out.dtype == torch.uint8
    expected = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True,
                             align_corners=False)[..., 2:30, 2:30]
    assert (out.float() - expected.round().clamp(0, 255)).abs().max() <= 1
    assert evaluation_images(images, 64) is images and evaluation_images(images, None) is images
