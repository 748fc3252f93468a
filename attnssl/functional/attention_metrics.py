"""What an attention map does, as numbers: entropy, mean distance, diversity across queries.

Maps are row-stochastic ``(..., queries, keys)`` tensors (a row is one query's attention). On
real ViTs the patch-to-patch block is read (:func:`patch_attention`); the theory paper's
measurements group queries by the area of the image they lie in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_attention(maps: torch.Tensor, prefix: int) -> torch.Tensor:
    """The patch-to-patch block of maps over ``[prefix tokens, patches]``, rows renormalised
    (the attention a patch pays to other patches, class tokens left out)."""
    block = maps[..., prefix:, prefix:]
    return block / block.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny)


def class_token_attention(maps: torch.Tensor, prefix: int, token: int = 0) -> torch.Tensor:
    """Class token ``token``'s attention to the patches, renormalised: ``(..., patches)``.

    The attention map DINO draws (``visualize_attention.py`` reads row 0 of the last layer).
    """
    row = maps[..., token, prefix:]
    return row / row.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)


def attention_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Mean over queries of ``H(a_i) = -sum_j a_ij log a_ij`` (nats): ``(...,)``.

    0 for one-hot rows, ``log(keys)`` for uniform rows.
    """
    logs = maps.clamp_min(torch.finfo(maps.dtype).tiny).log()
    return -(maps * logs).sum(dim=-1).mean(dim=-1)


def grid_positions(grid_h: int, grid_w: int, patch: float = 1.0) -> torch.Tensor:
    """``(grid_h * grid_w, 2)`` patch centres (row, column) in pixels, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.stack([rows, cols], dim=-1).reshape(-1, 2).double().add(0.5).mul(patch)


def mean_attention_distance(maps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``mean_i sum_j a_ij ||x_i - x_j||`` with ``positions (N, 2)`` of the queries and keys
    (the same tokens): ``(...,)``. Dosovitskiy et al.'s "attention distance" in pixels when
    positions are in pixels; 0 when every token attends to itself."""
    distances = torch.cdist(positions.double(), positions.double()).to(maps.dtype)
    return (maps * distances).sum(dim=-1).mean(dim=-1)


def attention_diversity(maps: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - mean cos(a_i, a_j)`` over pairs of distinct queries ``i != j``: ``(...,)``.

    With ``groups`` (one label per query, ``(..., queries)``: e.g. the area a patch lies in)
    only pairs in different groups count, as in the theory paper. 0 when all queries attend
    alike (collapse onto one place, or uniform attention), 1 when their attention never
    overlaps.
    """
    rows = F.normalize(maps, dim=-1)
    similarity = rows @ rows.transpose(-2, -1)
    queries = maps.shape[-2]
    if groups is None:
        pairs = ~torch.eye(queries, dtype=torch.bool, device=maps.device)
    else:
        pairs = groups.unsqueeze(-1) != groups.unsqueeze(-2)
    counts = pairs.sum(dim=(-2, -1))
    if (counts == 0).any():
        raise ValueError("attention diversity needs at least two queries in different groups")
    return 1 - (similarity * pairs).sum(dim=(-2, -1)) / counts


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): ``E ||f(x) - f(y)||^alpha`` over positive pairs of L2-normalised
    embeddings (row i of ``z1`` with row i of ``z2``); 0 when views agree exactly."""
    return (F.normalize(z1, dim=-1) - F.normalize(z2, dim=-1)).norm(dim=-1).pow(alpha).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): ``log E exp(-t ||f(x) - f(y)||^2)`` over distinct pairs of
    L2-normalised embeddings; 0 when all collapse to one point, lower is more uniform."""
    sq = torch.pdist(F.normalize(z, dim=-1)).pow(2)
    return sq.mul(-t).exp().mean().log()


def top_mass_mask(attention: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """Boolean mask of the smallest set of keys holding ``mass`` of each row's attention
    (DINO's ``threshold`` in ``visualize_attention.py``): with values sorted ascending and
    normalised, keep those whose cumulative sum passes ``1 - mass``."""
    if not 0 < mass <= 1:
        raise ValueError(f"attention mass must be in (0, 1], got {mass}")
    values, order = attention.sort(dim=-1)
    cumulative = (values / values.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
    keep_sorted = cumulative > (1 - mass)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def jaccard(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|P and T| / |P or T|`` per item over the last two (pixel) dimensions; 1 when both are
    empty."""
    inter = (predicted & target).flatten(-2).sum(-1).double()
    union = (predicted | target).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def attention_segmentation_jaccard(cls_attention: torch.Tensor, foreground: torch.Tensor,
                                   patch: int, mass: float = 0.6) -> torch.Tensor:
    """Jaccard of the thresholded class-token attention against a foreground mask.

    ``cls_attention (B, H/p * W/p)`` (the class token's attention to the patches, row-major),
    ``foreground (B, H, W)`` boolean. The top-``mass`` patches are upsampled to pixels
    (each patch covers its ``p x p`` pixels) and compared with the mask: ``(B,)``.
    """
    batch, height, width = foreground.shape
    grid = top_mass_mask(cls_attention, mass).view(batch, height // patch, width // patch)
    pixels = grid.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return jaccard(pixels, foreground)


def residual_attention(layer: torch.Tensor) -> torch.Tensor:
    """``A~ = rownorm(0.5 A + 0.5 I)`` of a layer's head-averaged map, ``(B, heads, N, N)`` ->
    ``(B, N, N)``: the residual connection counted as attention to oneself (Abnar & Zuidema)."""
    mixed = 0.5 * layer.mean(dim=1) + 0.5 * torch.eye(layer.shape[-1], dtype=layer.dtype,
                                                       device=layer.device)
    return mixed / mixed.sum(dim=-1, keepdim=True)


def attention_rollout(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"):
    ``R_1 = A~_1`` and ``R_l = A~_l R_{l-1}`` with :func:`residual_attention`'s ``A~_l``.
    ``maps`` are ``(B, heads, N, N)`` per layer; returns each layer's ``R_l``, ``(B, N, N)``,
    whose rows say how much of each input token reaches each token after ``l`` layers."""
    rollout, out = None, []
    for layer in maps:
        mixed = residual_attention(layer)
        rollout = mixed if rollout is None else mixed @ rollout
        out.append(rollout)
    return out


def attention_flow(maps: list[torch.Tensor], source: int = 0) -> torch.Tensor:
    """Attention flow (Abnar & Zuidema 2020; samiraabnar/attention_flow): the maximum flow
    from token ``source`` after the last layer to each input token, in the graph with a node
    per token and layer boundary and an edge from token ``i`` above layer ``l`` to token ``j``
    below it of capacity ``A~_l[i, j]`` (:func:`residual_attention`).

    ``maps`` are ``(B, heads, N, N)`` per layer; returns ``(B, N)`` flows, each at most 1 (the
    source's capacity out). Solved by networkx's preflow-push, one problem per input token:
    about ``N`` max-flows over ``L N^2`` edges per image (seconds for 4 layers of 50 tokens),
    so the analysis runs it on a few images.
    """
    import networkx as nx
    from networkx.algorithms.flow import preflow_push

    mixed = [residual_attention(layer.double()).cpu() for layer in maps]
    depth, tokens = len(mixed), mixed[0].shape[-1]
    flows = torch.zeros(mixed[0].shape[0], tokens, dtype=torch.float64)
    for b in range(flows.shape[0]):
        graph = nx.DiGraph()
        for layer, matrix in enumerate(mixed):
            rows = matrix[b].tolist()
            graph.add_edges_from(((layer + 1, i), (layer, j), {"capacity": rows[i][j]})
                                 for i in range(tokens) for j in range(tokens))
        for j in range(tokens):
            flows[b, j] = nx.maximum_flow_value(graph, (depth, source), (0, j),
                                                flow_func=preflow_push)
    return flows


def rank_collapse_residual(tokens: torch.Tensor) -> torch.Tensor:
    """How far a layer's tokens ``X (B, N, D)`` are from the nearest matrix of identical rows,
    ``1 x^T`` (Dong et al. 2021, "Attention is Not All You Need": rank collapse is this residual
    going to 0 with depth), relative to their size: ``||X - 1 mean(X)^T||_F / ||X||_F`` per
    image (the Frobenius norm, for which the nearest ``1 x^T`` is the mean token; the paper
    bounds the composite l1,inf norm). 0: every token is the same."""
    centred = tokens - tokens.mean(dim=1, keepdim=True)
    return centred.flatten(1).norm(dim=1) / tokens.flatten(1).norm(dim=1).clamp_min(1e-12)


def map_effective_rank(maps: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli 2007) of each attention map ``(..., N, N)``: ``exp(H(p))``
    with ``p = sigma / sum(sigma)`` over the map's singular values (float64); 1 for a rank-one
    map, N for an orthogonal one. Returns the leading shape ``(...)``."""
    sigma = torch.linalg.svdvals(maps.double())
    p = sigma / sigma.sum(-1, keepdim=True).clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.exp(-(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1))
