"""The attention layers in their own modules (linear, efficient, focused_linear, nystrom,
performer, sinkformer): each
against its paper's formula or properties, its recorded map, and its fit into timm ViTs
(weights shared with softmax, multi-crop, MAE, two class tokens)."""

import pytest
import torch
import torch.nn.functional as F

from attnssl.config import ModelSection
from attnssl.nn.attention import attention_maps, token_layout
from attnssl.nn.efficient_attention import efficient_attention
from attnssl.nn.focused_linear_attention import FocusedLinearAttention
from attnssl.nn.linear_attention import EPS, linear_attention
from attnssl.nn.mae import encode_visible
from attnssl.nn.vit import build_vit


def _qkv(generator, batch=2, heads=2, tokens=5, dim=3):
    return [torch.randn(batch, heads, tokens, dim, generator=generator, dtype=torch.float64)
            for _ in range(3)]


def test_linear_attention_follows_its_formula_query_by_query(generator):
    q, k, v = _qkv(generator)
    out = linear_attention(q, k, v)
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                sims = [phi(q[b, h, i]) @ phi(k[b, h, j]) for j in range(k.shape[2])]
                numerator = sum(s * v[b, h, j] for j, s in enumerate(sims))
                assert torch.allclose(out[b, h, i], numerator / (sum(sims) + EPS))


def test_efficient_attention_follows_its_formula_query_by_query(generator):
    q, k, v = _qkv(generator)
    out = efficient_attention(q, k, v)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            rho_k = torch.stack([k[b, h, :, d].softmax(0) for d in range(k.shape[3])], dim=1)
            for i in range(q.shape[2]):
                rho_q = q[b, h, i].softmax(0)
                weights = [sum(rho_q[d] * rho_k[j, d] for d in range(q.shape[3]))
                           for j in range(k.shape[2])]
                expected = sum(w * v[b, h, j] for j, w in enumerate(weights))
                assert torch.allclose(out[b, h, i], expected)


def loop_focused_linear(layer, x: torch.Tensor, side: int) -> torch.Tensor:
    """FLatten's layer written out token by token (float64): the focusing map over the whole
    width, each head's normalised sums over keys, the depthwise convolution of the values at
    every patch with zero padding, then the output projection."""
    batch, tokens, width = x.shape
    heads, d, prefix = layer.num_heads, layer.head_dim, tokens - side * side
    q, k, v = layer.qkv(x).reshape(batch, tokens, 3, width).unbind(2)
    scale = F.softplus(layer.feature_scale)

    def focus(row):
        row = (torch.clamp(row, min=0) + 1e-6) / scale
        cubed = torch.stack([value**3 for value in row])
        return cubed / cubed.norm() * row.norm()

    weight, bias, reach = layer.dwc.weight, layer.dwc.bias, layer.kernel_size // 2
    out = torch.zeros(batch, tokens, width, dtype=x.dtype)
    for b in range(batch):
        fq = [focus(q[b, i]) for i in range(tokens)]
        fk = [focus(k[b, j]) for j in range(tokens)]
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for i in range(tokens):
                sims = [fq[i][cols] @ fk[j][cols] for j in range(tokens)]
                mean_key = sum(fk[j][cols] for j in range(tokens)) / tokens
                numerator = sum(s * v[b, j, cols] for j, s in enumerate(sims)) / tokens
                out[b, i, cols] = numerator / (fq[i][cols] @ mean_key + 1e-6)
                if i < prefix:
                    continue
                row, col = divmod(i - prefix, side)
                for c in range(d):
                    total = bias[c]
                    for dr in range(-reach, reach + 1):
                        for dc in range(-reach, reach + 1):
                            r, s = row + dr, col + dc
                            if 0 <= r < side and 0 <= s < side:
                                total = total + weight[c, 0, dr + reach, dc + reach] * v[
                                    b, prefix + r * side + s, h * d + c]
                    out[b, i, h * d + c] += total
    return layer.proj(out)


@torch.no_grad()
def test_focused_linear_attention_follows_its_formula_token_by_token(generator):
    layer = FocusedLinearAttention(8, num_heads=2).double()
    layer.num_prefix_tokens = 1
    layer.feature_scale.normal_(generator=generator)
    layer.dwc.weight.normal_(generator=generator)
    x = torch.randn(2, 1 + 3 * 3, 8, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(layer(x), loop_focused_linear(layer, x, 3), rtol=0, atol=1e-9)
    layer.record_attention = True
    layer(x)
    assert torch.allclose(layer.attention_maps.sum(-1), torch.ones(2, 2, 10, dtype=torch.float64))


@torch.no_grad()
def test_focused_linear_on_a_reordered_grid_permutes_its_output(generator):
    layer = FocusedLinearAttention(8, num_heads=2).double()
    x = torch.randn(2, 1 + 16, 8, generator=generator, dtype=torch.float64)
    order = torch.stack([torch.randperm(16, generator=generator) for _ in range(2)])
    shuffled = torch.cat([x[:, :1], x[:, 1:].gather(1, order[..., None].expand(-1, -1, 8))], 1)
    with token_layout(layer, (4, 4), order):
        out = layer(shuffled)
    expected = layer(x)
    torch.testing.assert_close(out[:, 0], expected[:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, 1:], expected[:, 1:].gather(
        1, order[..., None].expand(-1, -1, 8)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("attention", ["linear", "efficient", "focused_linear", "nystrom",
                                       "performer", "sinkformer"])
def test_recorded_maps_sum_to_one_per_query_and_give_the_output(attention, generator):
    vit = build_vit(ModelSection(preset="vit_tiny_p4", attention=attention), 28, 1).eval()
    images = torch.randn(3, 1, 28, 28, generator=generator)
    maps = attention_maps(vit, images)
    assert len(maps) == 4 and maps[0].shape == (3, 4, 50, 50)
    # Nystrom's map goes through an approximate pseudo-inverse: rows sum to 1 only nearly, and
    # entries may be negative
    atol = 1e-2 if attention == "nystrom" else 1e-5
    for m in maps:
        assert torch.allclose(m.sum(-1), torch.ones(3, 4, 50), atol=atol)
        assert attention == "nystrom" or (m >= 0).all()
    if attention == "focused_linear":
        return  # its convolution adds a term beyond the map (the loop test above checks both)
    layer = vit.blocks[0].attn  # the map applied to the values is the layer's attention
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    x = vit.blocks[0].norm1(x)
    q, k, v = layer.qkv(x).reshape(3, 50, 3, 4, 32).permute(2, 0, 3, 1, 4).unbind(0)
    out = layer.proj((maps[0] @ v).transpose(1, 2).reshape(3, 50, 128))
    assert torch.allclose(layer(x), out, atol=1e-4)


OWN_PARAMETERS = {"performer": ("attn.projection", "attn.training_steps"),
                  "focused_linear": ("attn.feature_scale", "attn.dwc.weight", "attn.dwc.bias")}


@pytest.mark.parametrize("attention", ["linear", "efficient", "focused_linear", "nystrom",
                                       "performer", "sinkformer"])
def test_linear_layers_share_weights_with_softmax_and_fit_every_method(attention, generator):
    softmax = build_vit(ModelSection(preset="vit_tiny_p4"), 28, 1)
    other = build_vit(ModelSection(preset="vit_tiny_p4", attention=attention), 28, 1)
    # the same qkv and proj; Performer adds only its random features and their step count,
    # FLatten its feature scale and convolution
    missing, unexpected = other.load_state_dict(softmax.state_dict(), strict=False)
    own = OWN_PARAMETERS.get(attention, ())
    assert not unexpected and all(k.endswith(own) for k in missing)
    assert len(missing) == len(own) * 4
    softmax.load_state_dict({k: v for k, v in other.state_dict().items() if k not in missing})
    # multi-crop sizes, MAE's visible tokens, UDI's two class tokens; gradients flow
    assert other(torch.randn(2, 1, 12, 12, generator=generator)).shape == (2, 128)
    keep = torch.stack([torch.randperm(49, generator=generator)[:12] for _ in range(2)])
    tokens = encode_visible(other, torch.randn(2, 1, 28, 28, generator=generator), keep)
    assert tokens.shape == (2, 13, 128)
    two = build_vit(ModelSection(preset="vit_tiny_p4", attention=attention, class_tokens=2), 28, 1)
    loss = two.forward_features(torch.randn(2, 1, 28, 28, generator=generator)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in two.blocks[0].attn.parameters())


def test_sinkformer_is_softmax_after_zero_rounds_and_doubly_stochastic_after_many(generator):
    from attnssl.nn.sinkformer_attention import sinkhorn_attention

    logits = torch.randn(2, 3, 7, 7, generator=generator, dtype=torch.float64) * 2
    assert torch.allclose(sinkhorn_attention(logits, 0), logits.softmax(-1))
    balanced = sinkhorn_attention(logits, 200)
    ones = torch.ones(2, 3, 7, dtype=torch.float64)
    assert torch.allclose(balanced.sum(-1), ones, atol=1e-12)
    assert torch.allclose(balanced.sum(-2), ones, atol=1e-4)
    # each round keeps the map a diagonal rescaling of the kernel: A = diag(a) exp(L) diag(b)
    ratio = balanced / logits.exp()
    rank_one = ratio[..., :, :1] * ratio[..., :1, :] / ratio[..., :1, :1]
    assert torch.allclose(ratio, rank_one, rtol=1e-8)
    few = sinkhorn_attention(logits, 1)
    assert (few.sum(-2) - 1).abs().max() < (logits.softmax(-1).sum(-2) - 1).abs().max()


def test_nystrom_is_softmax_when_every_token_is_a_landmark(generator):
    from attnssl.nn.nystrom_attention import iterative_pinv, nystrom_attention_parts, segment_means

    pool = segment_means(7, 3)
    assert torch.allclose(pool.sum(-1), torch.ones(3)) and (pool > 0).sum(-1).tolist() == [2, 2, 3]
    q, k, _ = _qkv(generator, tokens=10, dim=4)
    f1, f2, f3 = nystrom_attention_parts(q, k, 0.5, landmarks=10, pinv_iters=50)
    assert torch.allclose(f1 @ f2 @ f3, (q @ k.transpose(-2, -1) * 0.5).softmax(-1), atol=1e-10)
    s = (q @ k.transpose(-2, -1)).softmax(-1)
    assert torch.allclose(s @ iterative_pinv(s, 50) @ s, s, atol=1e-10)  # S pinv(S) S = S
    f1, f2, f3 = nystrom_attention_parts(q, k, 0.5, landmarks=3)  # an approximation
    assert f1.shape[-1] == 3 and f3.shape[-2] == 3


def test_performer_estimate_converges_to_softmax_attention(generator):
    from attnssl.nn.performer_attention import favor_attention, orthogonal_gaussian

    q, k, v = _qkv(generator, batch=1, heads=1, tokens=6, dim=4)
    q, k = q / 2, k / 2  # scores of a trained layer's size: the estimator's variance stays small
    exact = (q @ k.transpose(-2, -1) / 2).softmax(-1) @ v  # 1/sqrt(4)
    torch.manual_seed(0)
    errors = {m: (favor_attention(q, k, v, orthogonal_gaussian(m, 4, torch.float64))
                  - exact).abs().max().item() for m in (4, 1024, 16384)}
    assert errors[16384] < 0.01 and errors[16384] < errors[1024] < errors[4]
    rows = orthogonal_gaussian(8, 4)
    block = rows[:4] / rows[:4].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(4), atol=1e-5)  # orthogonal in blocks


def test_performer_redraws_its_features_on_schedule_and_checkpoints_them():
    vit = build_vit(ModelSection(preset="vit_tiny_p4", attention="performer", depth=1), 28, 1)
    layer = vit.blocks[0].attn
    layer.redraw_every = 2
    first = layer.projection.clone()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():  # a teacher's forward or an evaluation: no training step
        vit(images)
    vit(images), vit(images)
    assert int(layer.training_steps) == 2 and torch.equal(layer.projection, first)
    vit(images)  # the third training step draws new features
    assert int(layer.training_steps) == 3 and not torch.equal(layer.projection, first)
    state = vit.state_dict()
    assert {"blocks.0.attn.projection", "blocks.0.attn.training_steps"} <= state.keys()
    again = build_vit(ModelSection(preset="vit_tiny_p4", attention="performer", depth=1), 28, 1)
    again.load_state_dict(state)
    assert torch.equal(again.blocks[0].attn.projection, layer.projection)
