"""Performer attention, FAVOR+ (Choromanski et al., ICLR 2021, "Rethinking Attention with
Performers").

The softmax kernel ``exp(q.k / sqrt(d))`` is estimated with ``m`` positive orthogonal random
features: with ``x' = x / d^(1/4)`` and the rows ``w_r`` of a random projection,

    phi(x) = exp(w_r . x' - ||x'||^2 / 2) / sqrt(m)          (r = 1 .. m)
    out_i  = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j))

in ``O(N m d)``. The rows ``w_r`` are Gaussian, orthogonalised in blocks of ``d`` (QR) and
rescaled to the lengths of Gaussian vectors. Follows the official code
(github.com/google-research/google-research, ``performer/fast_attention``: the ``d^(-1/4)``
normaliser, a maximum subtracted inside the exponential for stability, a small constant added,
``1e-4`` here) with ``m = round(d log d)`` features, the usual PyTorch port's default. The
projection is redrawn from torch's generator every ``redraw_every`` training steps of the
layer (forward passes with gradients; the EMA teacher copies the student's); it is a buffer,
so checkpoints keep it and a resumed run continues with the same features. The layer keeps
timm's ``qkv`` and ``proj``.
"""

from __future__ import annotations

import math

import torch

from attnssl.nn.attention import QKVAttention, register_attention

STABILISER = 1e-4


def orthogonal_gaussian(features: int, dim: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``(features, dim)``: blocks of ``dim`` orthonormal rows (QR of Gaussian matrices, the
    signs of ``R``'s diagonal moved into ``Q`` so that each block is uniformly random), each
    row rescaled to the norm of an independent Gaussian vector (so its length is chi-distributed
    as an unstructured Gaussian row's)."""
    blocks = []
    for _ in range(math.ceil(features / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, device=device))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # signs fixed: Haar-distributed
    rows = torch.cat(blocks)[:features]
    norms = torch.randn(features, dim, device=device).norm(dim=1, keepdim=True)
    return (rows * norms).to(dtype)


def positive_features(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """``phi(x)`` of the module docstring, ``(..., N, m)``: the query's maximum is taken per
    token, the key's over the whole sequence (both cancel in the attention's normalisation)."""
    x = x * x.shape[-1] ** -0.25
    projected = x @ projection.transpose(-2, -1)
    half_norm = x.square().sum(dim=-1, keepdim=True) / 2
    dims = (-1,) if is_query else (-2, -1)
    shift = projected.amax(dim=dims, keepdim=True).detach()
    return (torch.exp(projected - half_norm - shift) + STABILISER) / math.sqrt(projection.shape[0])


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    projection: torch.Tensor) -> torch.Tensor:
    """``(B, h, N, d)`` queries, keys, values -> ``(B, h, N, d_v)``."""
    q_f, k_f = positive_features(q, projection, True), positive_features(k, projection, False)
    kv = k_f.transpose(-2, -1) @ v
    normaliser = q_f @ k_f.sum(dim=-2, keepdim=True).transpose(-2, -1)
    return (q_f @ kv) / normaliser


def favor_attention_map(q: torch.Tensor, k: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """The estimated attention ``phi(Q) phi(K)^T``, rows normalised, ``(B, h, N, N)``."""
    sim = positive_features(q, projection, True) @ positive_features(k, projection, False).transpose(-2, -1)
    return sim / sim.sum(dim=-1, keepdim=True)


@register_attention("performer")
class PerformerAttention(QKVAttention):
    """``model.attention=performer``: :func:`favor_attention` with ``round(d log d)`` features
    per head, redrawn every ``redraw_every`` (1000) training steps."""

    redraw_every = 1000

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        features = max(1, round(self.head_dim * math.log(self.head_dim)))
        self.register_buffer("projection", orthogonal_gaussian(features, self.head_dim))
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))

    def attend(self, q, k, v, want_map):
        if self.training and torch.is_grad_enabled():
            if self.training_steps > 0 and self.training_steps % self.redraw_every == 0:
                self.projection.copy_(orthogonal_gaussian(*self.projection.shape,
                                                          device=self.projection.device))
            self.training_steps += 1
        with torch.autocast(q.device.type, enabled=False):  # exponentials and a long sum
            projection = self.projection.float()
            out = favor_attention(q.float(), k.float(), v.float(), projection).to(v.dtype)
            attn = favor_attention_map(q.float(), k.float(), projection) if want_map else None
        return out, attn
