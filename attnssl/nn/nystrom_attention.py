"""Nystrom attention (Xiong et al., AAAI 2021, "Nystromformer").

Per head, ``m`` landmarks are the means of ``m`` consecutive segments of the queries and of the
keys (``Q~ = P Q``, ``K~ = P K``, ``P`` the segment-mean matrix), and softmax attention is
approximated through them:

    A ~= softmax(Q K~^T / sqrt(d)) pinv(softmax(Q~ K~^T / sqrt(d))) softmax(Q~ K^T / sqrt(d))

which costs ``O(N m)``. With every token its own landmark (``m = N``) the product is exactly
softmax attention, since ``S pinv(S) S = S``. The pseudo-inverse is the official iterative one
(github.com/mlpen/Nystromformer, ``iterative_inv``: ``Z <- Z (13 I - S Z (15 I - S Z (7 I -
S Z))) / 4`` from ``Z0 = S^T / (max_j sum_i S_ij max_i sum_j S_ij)``, 6 iterations). Unlike the
official code, sequences need not divide into the landmarks (segments differ by at most one
token) and there is no depthwise convolution on the values, so the layer keeps timm's ``qkv``
and ``proj`` and nothing else.
"""

from __future__ import annotations

import torch

from attnssl.nn.attention import QKVAttention, register_attention


def segment_means(tokens: int, landmarks: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``(m, N)``: row ``i`` averages the tokens ``floor(i N / m)`` to ``floor((i + 1) N / m) - 1``."""
    edges = torch.arange(landmarks + 1, device=device) * tokens // landmarks
    index = torch.arange(tokens, device=device)
    member = (index >= edges[:-1, None]) & (index < edges[1:, None])
    return member.to(dtype) / member.sum(dim=1, keepdim=True).to(dtype)


def iterative_pinv(s: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """The official Newton-Schulz-type pseudo-inverse of ``(..., m, m)`` softmax matrices."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    col = s.sum(dim=-2).amax(dim=-1)[..., None, None]
    row = s.sum(dim=-1).amax(dim=-1)[..., None, None]
    z = s.transpose(-2, -1) / (col * row)
    for _ in range(iters):
        sz = s @ z
        z = 0.25 * z @ (13 * eye - sz @ (15 * eye - sz @ (7 * eye - sz)))
    return z


def nystrom_attention_parts(q: torch.Tensor, k: torch.Tensor, scale: float, landmarks: int,
                            pinv_iters: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three factors ``(softmax(Q K~^T), pinv(softmax(Q~ K~^T)), softmax(Q~ K^T))``."""
    m = min(landmarks, q.shape[-2])
    pool = segment_means(q.shape[-2], m, q.dtype, q.device)
    q_l, k_l = pool @ q, pool @ k
    kernel_1 = (q @ k_l.transpose(-2, -1) * scale).softmax(dim=-1)
    kernel_2 = (q_l @ k_l.transpose(-2, -1) * scale).softmax(dim=-1)
    kernel_3 = (q_l @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    return kernel_1, iterative_pinv(kernel_2, pinv_iters), kernel_3


@register_attention("nystrom")
class NystromAttention(QKVAttention):
    """``model.attention=nystrom``: ``out = proj(F1 (F2 (F3 V)))`` with the factors of
    :func:`nystrom_attention_parts` and ``landmarks`` landmarks (16 here; the patch grids of
    the small backbones have 49 to 196 tokens). Maps: ``F1 F2 F3``."""

    landmarks = 16
    pinv_iters = 6

    def attend(self, q, k, v, want_map):
        with torch.autocast(q.device.type, enabled=False):  # the pseudo-inverse needs fp32
            f1, f2, f3 = nystrom_attention_parts(q.float(), k.float(), self.scale,
                                                 self.landmarks, self.pinv_iters)
            out = f1 @ (f2 @ (f3 @ v.float()))
        attn = (f1 @ f2 @ f3) if want_map else None
        return out.to(v.dtype), attn
