"""Attention and collapse metrics on hand-made maps and embeddings with known answers."""

import math

import pytest
import torch

from attnssl.functional.attention_metrics import (
    alignment,
    attention_diversity,
    attention_entropy,
    attention_segmentation_jaccard,
    grid_positions,
    jaccard,
    mean_attention_distance,
    patch_attention,
    top_mass_mask,
    uniformity,
)

N = 6


def uniform_maps():
    return torch.full((N, N), 1.0 / N, dtype=torch.float64)


def one_hot_maps():
    return torch.eye(N, dtype=torch.float64)


def block_diagonal_maps():
    """Queries 0-2 attend uniformly to keys 0-2, queries 3-5 to keys 3-5."""
    maps = torch.zeros(N, N, dtype=torch.float64)
    maps[:3, :3] = 1 / 3
    maps[3:, 3:] = 1 / 3
    return maps


def test_entropy_of_known_maps():
    assert attention_entropy(uniform_maps()).item() == pytest.approx(math.log(N))
    assert attention_entropy(one_hot_maps()).item() == pytest.approx(0.0)
    assert attention_entropy(block_diagonal_maps()).item() == pytest.approx(math.log(3))
    stacked = torch.stack([uniform_maps(), one_hot_maps()])  # (layers/heads, N, N)
    torch.testing.assert_close(attention_entropy(stacked),
                               torch.tensor([math.log(N), 0.0], dtype=torch.float64))


def test_mean_distance_of_known_maps():
    positions = grid_positions(2, 3, patch=4.0)  # centres 4 px apart
    assert positions[0].tolist() == [2.0, 2.0] and positions[5].tolist() == [6.0, 10.0]
    assert mean_attention_distance(one_hot_maps(), positions).item() == pytest.approx(0.0)
    expected = sum(float(torch.dist(positions[i], positions[j]))
                   for i in range(N) for j in range(N)) / N / N
    assert mean_attention_distance(uniform_maps(), positions).item() == pytest.approx(expected)
    # block-diagonal: each row of the 2x3 grid attends within its own row of patches
    # (distances 0, 4, 8 from an end patch, 4, 0, 4 from the middle one)
    assert mean_attention_distance(block_diagonal_maps(), positions).item() == pytest.approx(
        (12 + 8 + 12) / 9)


def test_diversity_of_known_maps():
    assert attention_diversity(uniform_maps()).item() == pytest.approx(0.0)
    assert attention_diversity(one_hot_maps()).item() == pytest.approx(1.0)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # across the two areas the rows never overlap; within an area they are identical
    assert attention_diversity(block_diagonal_maps(), groups).item() == pytest.approx(1.0)
    # over all pairs: 6 of the 15 distinct pairs (within a block) are identical rows
    assert attention_diversity(block_diagonal_maps()).item() == pytest.approx(1 - 12 / 30)
    # batched maps with one grouping per item
    stacked = torch.stack([block_diagonal_maps(), uniform_maps()])
    torch.testing.assert_close(attention_diversity(stacked, torch.stack([groups, groups])),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))
    collapsed = torch.zeros(N, N, dtype=torch.float64)
    collapsed[:, 0] = 1  # every query attends to the same key
    assert attention_diversity(collapsed, groups).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="two queries in different groups"):
        attention_diversity(uniform_maps(), torch.zeros(N, dtype=torch.long))


def test_patch_attention_drops_class_tokens_and_renormalises():
    maps = torch.full((1 + N, 1 + N), 1.0 / (1 + N), dtype=torch.float64)
    torch.testing.assert_close(patch_attention(maps, 1), uniform_maps())


def test_alignment_and_uniformity_of_known_embeddings():
    z = torch.eye(4, dtype=torch.float64)
    assert alignment(z, 3 * z).item() == pytest.approx(0.0)  # scale does not matter
    assert alignment(z, z.roll(1, 0)).item() == pytest.approx(2.0)  # orthogonal: ||a-b||^2 = 2
    assert uniformity(torch.ones(5, 3, dtype=torch.float64)).item() == pytest.approx(0.0)
    assert uniformity(z).item() == pytest.approx(-4.0)  # every pair at squared distance 2


def test_top_mass_keeps_the_fewest_keys_holding_that_mass():
    attention = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    kept = top_mass_mask(attention, 0.6)
    assert kept[0].tolist() == [True, False, True, False]  # 0.5 + 0.3 >= 0.6, 0.5 alone not
    assert kept[1].sum() == 3  # uniform: two keys hold 0.5 < 0.6, three hold 0.75
    assert top_mass_mask(attention, 1.0).all()
    with pytest.raises(ValueError, match="attention mass must be in"):
        top_mass_mask(attention, 0.0)


def test_segmentation_jaccard_of_known_attention():
    foreground = torch.zeros(2, 4, 4, dtype=torch.bool)
    foreground[:, :2, :2] = True  # the top-left patch of a 2x2 grid of 2-pixel patches
    on_object = torch.tensor([[0.9, 0.05, 0.03, 0.02]])
    off_object = torch.tensor([[0.02, 0.9, 0.05, 0.03]])
    scores = attention_segmentation_jaccard(torch.cat([on_object, off_object]), foreground, 2)
    assert scores.tolist() == [1.0, 0.0]
    half = attention_segmentation_jaccard(torch.tensor([[0.45, 0.45, 0.05, 0.05]]),
                                          foreground[:1], 2)
    assert half.item() == pytest.approx(0.5)  # 4 of the 8 predicted pixels are the object
    assert jaccard(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool)) == 1


def test_rollout_of_identity_attention_is_the_identity_and_follows_its_recursion(generator):
    from attnssl.functional.attention_metrics import attention_rollout

    eye = torch.eye(6, dtype=torch.float64).expand(2, 3, 6, 6)
    for r in attention_rollout([eye, eye, eye]):
        assert torch.allclose(r, torch.eye(6, dtype=torch.float64).expand(2, 6, 6))
    maps = [torch.rand(2, 3, 6, 6, generator=generator, dtype=torch.float64).softmax(-1)
            for _ in range(3)]
    rollouts = attention_rollout(maps)
    expected = torch.eye(6, dtype=torch.float64).expand(2, 6, 6)
    for layer, rollout in zip(maps, rollouts, strict=True):
        mixed = torch.zeros(2, 6, 6, dtype=torch.float64)
        for b in range(2):  # one entry at a time: (mean_h A + I) / 2, rows renormalised
            for i in range(6):
                row = [(sum(layer[b, h, i, j] for h in range(3)) / 3 + (i == j)) / 2
                       for j in range(6)]
                mixed[b, i] = torch.stack([torch.as_tensor(v) for v in row]) / sum(row)
        expected = mixed @ expected
        assert torch.allclose(rollout, expected)
        assert torch.allclose(rollout.sum(-1), torch.ones(2, 6, dtype=torch.float64))


def test_attention_flow_on_two_layer_chains_equals_the_hand_computed_max_flow():
    from attnssl.functional.attention_metrics import attention_flow, attention_rollout

    def maps(*layers):  # one image, one head; A~ = (A + I) / 2 for row-stochastic A
        return [torch.tensor(a, dtype=torch.float64).view(1, 1, len(a), len(a)) for a in layers]

    # identity below: token 0 reaches input j only through (1, j), so its flow is A~_2[0, j]
    chain = maps([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0.2, 0.3, 0.5], [0, 1, 0], [0, 0, 1]])
    assert attention_flow(chain)[0].tolist() == pytest.approx([0.6, 0.15, 0.25], abs=1e-9)
    # swapping below, A~_1 = 1/2 everywhere; above, A~_2 = [[.6, .4], [.3, .7]]: to each input
    # the paths through (1, 0) and (1, 1) carry min(.6, .5) + min(.4, .5) = 0.9
    crossed = maps([[0, 1], [1, 0]], [[0.2, 0.8], [0.6, 0.4]])
    assert attention_flow(crossed)[0].tolist() == pytest.approx([0.9, 0.9], abs=1e-9)
    # where rollout multiplies, giving 1/2 to each input
    assert attention_rollout(crossed)[-1][0, 0].tolist() == pytest.approx([0.5, 0.5])


def test_rank_collapse_residual_is_zero_for_identical_tokens_and_one_for_centred_ones(generator):
    from attnssl.functional.attention_metrics import rank_collapse_residual

    same = torch.randn(3, 1, 8, generator=generator).expand(3, 5, 8)
    assert torch.allclose(rank_collapse_residual(same), torch.zeros(3), atol=1e-6)
    centred = torch.randn(3, 5, 8, generator=generator)
    centred = centred - centred.mean(dim=1, keepdim=True)
    assert torch.allclose(rank_collapse_residual(centred), torch.ones(3))
    mixed = same + 0.1 * centred
    assert (rank_collapse_residual(mixed) < 0.5).all()


def test_effective_rank_of_maps_is_one_for_rank_one_and_n_for_orthogonal():
    from attnssl.functional.attention_metrics import map_effective_rank

    uniform = torch.full((5, 5), 0.2)  # every query attends the same way: rank one
    eye = torch.eye(5)
    block = torch.block_diag(torch.full((2, 2), 0.5), torch.full((3, 3), 1 / 3))  # two groups
    ranks = map_effective_rank(torch.stack([uniform, eye, block]).view(1, 3, 5, 5))
    assert ranks.shape == (1, 3)
    torch.testing.assert_close(ranks[0], torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))
