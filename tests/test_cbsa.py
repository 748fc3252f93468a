"""CBSA, agent and MSSA attention, and the CBT block, against loop versions of their equations."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnssl.config import load_config
from attnssl.functional.cbsa import adaptive_pool_matrix, cbsa_heads, pooling_weights
from attnssl.nn.attention import (
    AgentAttention,
    CBSAAttention,
    MSSAAttention,
    attention_maps,
    token_layout,
)
from attnssl.nn.blocks import ISTA, CBTBlock
from attnssl.nn.vit import build_vit


def softmax_row(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def loop_cbsa(layer, x: torch.Tensor, grid: tuple[int, int], side: int, contract: bool = True,
              pool=None, cap: bool = True):
    """The four CBSA equations written out with scalar loops (float64), per image and head.

    Representatives come from torch's own ``AdaptiveAvgPool2d`` on the patch grid (computed
    independently of :func:`adaptive_pool_matrix`), or from ``pool(w) -> (B, m, dim)``.
    Returns the layer's output and the extraction maps ``A`` (B, h, m, N).
    """
    batch, tokens, dim = x.shape
    heads, p = layer.num_heads, layer.head_dim
    scale = p**-0.5
    w = layer.proj(x)
    if pool is None:
        prefix = tokens - grid[0] * grid[1]
        pooled = F.adaptive_avg_pool2d(
            w[:, prefix:].transpose(1, 2).reshape(batch, dim, *grid),
            (min(side, grid[0]), min(side, grid[1])) if cap else (side, side),
        ).flatten(2).transpose(1, 2)  # (B, m, dim)
    else:
        pooled = pool(w)
    m = pooled.shape[1]
    out = torch.zeros(batch, tokens, dim, dtype=x.dtype)
    maps = torch.zeros(batch, heads, m, tokens, dtype=x.dtype)
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * p, (h + 1) * p)
            W = w[b, :, cols].tolist()
            R0 = pooled[b, :, cols].tolist()
            dot = lambda u, v: sum(ui * vi for ui, vi in zip(u, v, strict=True))  # noqa: E731
            A = [softmax_row([dot(R0[i], W[n]) * scale for n in range(tokens)]) for i in range(m)]
            s_rep, s_x = layer.step_rep[h].item(), layer.step_x[h].item()
            R = [[R0[i][k] + s_rep * sum(A[i][n] * W[n][k] for n in range(tokens))
                  for k in range(p)] for i in range(m)]
            if contract:
                S = [softmax_row([dot(R[i], R[j]) * scale for j in range(m)]) for i in range(m)]
                C = [[sum(S[i][j] * R[j][k] for j in range(m)) for k in range(p)]
                     for i in range(m)]
            else:
                C = R
            for n in range(tokens):
                for k in range(p):
                    out[b, n, h * p + k] = s_x * sum(A[i][n] * C[i][k] for i in range(m))
            maps[b, h] = torch.tensor(A, dtype=x.dtype)
    return layer.to_out(out), maps


def make_layer(cls, dim=12, heads=3, prefix=1, side=2):
    torch.manual_seed(0)
    layer = cls(dim, num_heads=heads).double()
    layer.num_prefix_tokens = prefix
    if hasattr(layer, "pool_side"):
        layer.pool_side = side
    return layer


@pytest.mark.parametrize("grid,side,prefix", [((3, 3), 2, 1), ((4, 4), 3, 2), ((2, 2), 8, 1)])
@torch.no_grad()
def test_cbsa_matches_a_loop_over_its_equations(grid, side, prefix):
    layer = make_layer(CBSAAttention, prefix=prefix, side=side)
    x = torch.randn(2, prefix + grid[0] * grid[1], 12, dtype=torch.float64)
    expected, extraction = loop_cbsa(layer, x, grid, side)
    layer.record_attention = True
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    # the recorded maps are the official A^T A
    torch.testing.assert_close(layer.attention_maps, extraction.transpose(-2, -1) @ extraction,
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("grid", [(4, 4), (7, 7)])
@torch.no_grad()
def test_repeat_on_a_small_grid_pools_side_x_side_as_the_official_adaptive_pool(grid):
    layer = make_layer(CBSAAttention, side=8)
    layer.pool_small_grid = "repeat"
    x = torch.randn(2, 1 + grid[0] * grid[1], 12, dtype=torch.float64)
    expected, extraction = loop_cbsa(layer, x, grid, 8, cap=False)
    assert extraction.shape[2] == 64
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    layer.pool_small_grid = "cap"
    capped = layer(x)
    assert not torch.allclose(capped, expected, atol=1e-3)
    if grid == (4, 4):  # every patch is 4 of the 64 representatives: the broadcast is 4 times
        bias = layer.to_out.bias
        torch.testing.assert_close(expected - bias, 4 * (capped - bias), rtol=0, atol=1e-10)


@pytest.mark.parametrize("block,eps", [("vit", 1e-6), ("cbt", 1e-5)])
def test_cbt_backbones_take_the_official_layer_norm_eps(block, eps):
    cfg = load_config(None, ["model.attention=cbsa", f"model.block={block}"])
    vit = build_vit(cfg.model, 28, 1)
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 4 + 1 and {m.eps for m in norms} == {eps}


@torch.no_grad()
def test_agent_is_cbsa_without_the_contraction():
    layer = make_layer(AgentAttention, side=2)
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    expected, _ = loop_cbsa(layer, x, (3, 3), 2, contract=False)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
    cbsa = make_layer(CBSAAttention, side=2)
    cbsa.load_state_dict(layer.state_dict())
    assert (cbsa(x) - layer(x)).abs().max() > 1e-3  # the contraction does change the output


@torch.no_grad()
def test_cbsa_with_a_representative_per_token_and_identity_extraction_is_mssa():
    """m = N, P = I, A = P, R = R0 (and s_x = 1): softmax(W W^T scale) W, CRATE's MSSA."""
    mssa = make_layer(MSSAAttention, prefix=0)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    w = mssa.split_heads(mssa.proj(x))
    ones = torch.ones(3, 1, 1, dtype=torch.float64)
    out, extraction = cbsa_heads(w, torch.eye(9, dtype=torch.float64).unsqueeze(0), ones, ones,
                                 mssa.scale, extract=False)
    assert torch.equal(extraction[0, 0], torch.eye(9, dtype=torch.float64))
    torch.testing.assert_close(mssa.to_out(mssa.merge_heads(out)), mssa(x), rtol=0, atol=1e-12)
    # and MSSA itself, by a loop
    heads, p = 3, 4
    expected = torch.zeros_like(x)
    for b in range(2):
        for h in range(heads):
            wh = mssa.proj(x)[b, :, h * p:(h + 1) * p]
            for n in range(9):
                weights = softmax_row([float(wh[n] @ wh[j]) * p**-0.5 for j in range(9)])
                expected[b, n, h * p:(h + 1) * p] = sum(weights[j] * wh[j] for j in range(9))
    torch.testing.assert_close(mssa(x), mssa.to_out(expected), rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid,out", [((7, 7), (4, 4)), ((14, 14), (8, 8)), ((8, 6), (3, 5)),
                                      ((5, 5), (5, 5))])
def test_pool_matrix_is_torchs_adaptive_average_pool(grid, out):
    x = torch.randn(3, 2, *grid, dtype=torch.float64)
    expected = F.adaptive_avg_pool2d(x, out).flatten(2)
    matrix = adaptive_pool_matrix(*grid, *out).double()
    torch.testing.assert_close(x.flatten(2) @ matrix.T, expected, rtol=0, atol=1e-12)


def test_pooling_skips_class_tokens_and_uses_only_visible_patches():
    full = pooling_weights((4, 4), 2, prefix=2)
    assert full.shape == (1, 4, 18)
    assert torch.all(full[..., :2] == 0)
    torch.testing.assert_close(full.sum(-1), torch.ones(1, 4, dtype=torch.float64))
    visible = torch.tensor([[0, 1, 5, 15], [2, 3, 6, 7]])  # image 1 has no patch in cells 2, 3
    weights = pooling_weights((4, 4), 2, prefix=1, visible=visible)
    assert weights.shape == (2, 4, 5)
    cell = lambda g: (g // 4 // 2) * 2 + (g % 4) // 2  # noqa: E731
    for b in range(2):
        for r in range(4):
            members = [k for k, g in enumerate(visible[b].tolist()) if cell(g) == r]
            expected = torch.zeros(5, dtype=torch.float64)
            if members:
                expected[[1 + k for k in members]] = 1 / len(members)
            else:  # an empty cell takes the mean of all visible patches
                expected[1:] = 1 / 4
            torch.testing.assert_close(weights[b, r], expected)


@torch.no_grad()
def test_cbsa_on_visible_patches_pools_only_their_cells():
    """MAE's case: 2 class tokens and 5 of 16 patches of a 4x4 grid, pooled 2x2."""
    layer = make_layer(CBSAAttention, prefix=2, side=2)
    visible = torch.tensor([[0, 1, 5, 15, 10], [2, 3, 6, 7, 11]])  # image 1: cell 2 empty
    x = torch.randn(2, 2 + 5, 12, dtype=torch.float64)

    def pool_visible(w):
        reps = torch.zeros(2, 4, 12, dtype=torch.float64)
        for b in range(2):
            for r in range(4):
                members = [2 + k for k, g in enumerate(visible[b].tolist())
                           if (g // 4) // 2 == r // 2 and (g % 4) // 2 == r % 2]
                reps[b, r] = w[b, members or list(range(2, 7))].mean(0)
        return reps

    expected, _ = loop_cbsa(layer, x, (4, 4), 2, pool=pool_visible)
    with token_layout(layer, (4, 4), visible):
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


@torch.no_grad()
def test_a_layout_of_all_cells_in_another_order_permutes_the_output():
    layer = make_layer(CBSAAttention, side=2)
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    order = torch.stack([torch.randperm(9), torch.randperm(9)])
    shuffled = torch.cat([x[:, :1], x[:, 1:].gather(1, order[..., None].expand(-1, -1, 12))], 1)
    with token_layout(layer, (3, 3), order):
        out = layer(shuffled)
    expected = layer(x)
    torch.testing.assert_close(out[:, 0], expected[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        out[:, 1:], expected[:, 1:].gather(1, order[..., None].expand(-1, -1, 12)),
        rtol=0, atol=1e-12)
    assert layer.layout is None  # the layout holds only within the block


def test_a_grid_that_is_not_square_is_named():
    layer = make_layer(CBSAAttention)
    with pytest.raises(ValueError, match="square patch grid.*token_layout"):
        layer(torch.randn(1, 1 + 6, 12, dtype=torch.float64))


@torch.no_grad()
def test_ista_step_and_cbt_block_match_their_formulas():
    torch.manual_seed(0)
    ista = ISTA(6).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    D = ista.weight
    expected = torch.relu(x + 0.1 * (x @ D - x @ D.T @ D) - 0.1 * 0.1)  # rows: D^T x, D^T D x
    torch.testing.assert_close(ista(x), expected, rtol=0, atol=1e-12)
    block = CBTBlock(12, 3, attn_layer=CBSAAttention).double()
    block.attn.num_prefix_tokens = 1
    tokens = torch.randn(2, 10, 12, dtype=torch.float64)
    z = tokens + block.attn(block.norm1(tokens))
    torch.testing.assert_close(block(tokens), block.ista(block.norm2(z)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("attention", ["softmax", "softmax_explicit", "cbsa", "agent", "mssa"])
@pytest.mark.parametrize("block", ["vit", "cbt"])
def test_every_parameter_of_each_attention_gets_a_gradient(attention, block):
    cfg = load_config(None, [f"model.attention={attention}", f"model.block={block}",
                             "model.cbsa_pool=4"])
    torch.manual_seed(0)
    vit = build_vit(cfg.model, 28, 1)
    vit.forward_features(torch.randn(3, 1, 28, 28)).pow(2).mean().backward()
    for name, param in vit.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    maps = attention_maps(vit, torch.randn(2, 1, 28, 28))
    assert len(maps) == 4 and all(m.shape == (2, 4, 50, 50) for m in maps)


def test_cbsa_pools_the_configured_grid_and_handles_two_class_tokens():
    cfg = load_config(None, ["model.attention=cbsa", "model.cbsa_pool=3", "model.class_tokens=2"])
    vit = build_vit(cfg.model, 28, 1)
    layer = vit.blocks[0].attn
    assert layer.pool_side == 3 and layer.num_prefix_tokens == 2
    with torch.no_grad():
        tokens = vit.forward_features(torch.randn(2, 1, 28, 28))
    assert tokens.shape == (2, 51, 128) and torch.isfinite(tokens).all()


@torch.no_grad()
def test_learned_representatives_replace_the_pooling_and_need_no_grid():
    from attnssl.nn.cbsa_learned_attention import CBSALearnedAttention

    layer = make_layer(CBSALearnedAttention, side=2)
    assert layer.representatives.shape == (3, 4, 4)  # heads, side^2, head width
    learned = layer.representatives.double()
    as_tokens = learned.transpose(0, 1).reshape(1, 4, 12)  # (1, m, heads * head width)
    for tokens in (1 + 9, 1 + 7):  # a 3x3 grid, and 7 patches that form no grid at all
        x = torch.randn(2, tokens, 12, dtype=torch.float64)
        expected, extraction = loop_cbsa(layer, x, (0, 0), 2,
                                         pool=lambda w: as_tokens.expand(w.shape[0], -1, -1))
        layer.record_attention = True
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(layer.attention_maps,
                                   extraction.transpose(-2, -1) @ extraction, rtol=0, atol=1e-10)
    from attnssl.nn.vit import takes_weight_decay

    assert not takes_weight_decay("blocks.0.attn.representatives", layer.representatives)


@torch.no_grad()
def test_the_learned_representatives_start_at_the_configured_scale():
    """``model.cbsa_learned_std`` sets the start of every block's representatives; at timm's
    0.02 the first extraction ``softmax(R0 W^T scale)`` of freshly initialised tokens is uniform
    to 1e-3 nats (the layer starts as a mean of the tokens), at 1 it is not."""
    assert load_config(None, []).model.cbsa_learned_std == 0.02
    below_uniform = {}
    for std in (0.02, 1.0):
        cfg = load_config(None, ["model.attention=cbsa_learned", "model.cbsa_pool=4",
                                 f"model.cbsa_learned_std={std}"])
        torch.manual_seed(0)
        vit = build_vit(cfg.model, 28, 1)
        layers = [block.attn for block in vit.blocks]
        assert all(abs(layer.representatives.std().item() / std - 1) < 0.1 for layer in layers)
        layer, block = layers[0], vit.blocks[0]
        tokens = block.norm1(vit._pos_embed(vit.patch_embed(torch.randn(8, 1, 28, 28))))
        w = layer.split_heads(layer.proj(tokens))
        p = (layer.representatives.unsqueeze(0) @ w.transpose(-2, -1) * layer.scale).softmax(-1)
        below_uniform[std] = math.log(w.shape[-2]) + (p * p.log()).sum(-1).mean().item()
    assert below_uniform[0.02] < 1e-3 and below_uniform[1.0] > 1e-2
